#!/usr/bin/env python3
"""Print the markdown summary of benches/peers/compare.sh's raw JSON (usage: summarize.py OUT_DIR)."""
import glob
import json
import os
import re
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "out")
ENGINES = ["ember", "vllm", "llamacpp", "mistralrs", "transformers"]


def load(name):
    p = os.path.join(OUT, name)
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return f"{x:,.{nd}f}" if abs(x) < 1000 else f"{x:,.0f}"


def ratio(x, ref):
    return f"{x / ref:.2f}×" if x and ref else "–"


def ember_avg_latency(out_len):
    """Seconds of one `ember bench latency` iteration: JSON avg_latency, else the printed line."""
    j = load(f"lat_ember_out{out_len}.json")
    if j and "avg_latency" in j:
        return float(j["avg_latency"])
    try:
        txt = open(os.path.join(OUT, f"lat_ember_out{out_len}.txt")).read()
    except OSError:
        return None
    m = re.search(r"Avg latency \(ms\):\s*([0-9.eE+-]+)", txt)
    if m:
        return float(m.group(1)) / 1e3
    m = re.search(r"Avg latency:\s*([0-9.eE+-]+)\s*s", txt)
    return float(m.group(1)) if m else None


def latency_rows():
    rows = {}
    v = load("versions.json") or {}
    # ember: `ember bench latency` at output len 1 and M. Its JSON has the prefill step and the mean decode
    # step measured directly; the two-point numbers (as for vLLM/transformers) are shown next to them.
    lens = sorted({int(re.search(r"out(\d+)\.", os.path.basename(p)).group(1))
                   for p in glob.glob(os.path.join(OUT, "lat_ember_out*.txt")) + glob.glob(os.path.join(OUT, "lat_ember_out*.json"))})
    if lens:
        m = lens[-1]
        jm = load(f"lat_ember_out{m}.json") or {}
        n = jm.get("input_len") or v.get("input_len")
        l1, lm = ember_avg_latency(1), ember_avg_latency(m)
        two = None
        if l1 and lm and lm > l1 and m > 1:
            two = ((n / l1) if n else None, (m - 1) / (lm - l1))
        if "decode_tokens_per_second" in jm:
            rows["ember"] = dict(prefill=jm.get("prefill_tokens_per_second"), decode=jm["decode_tokens_per_second"],
                                 how=f"bench latency in {n} out {m}, direct (prefill step, mean decode step)"
                                     + (f"; two-point {fmt(two[0])} / {fmt(two[1])}" if two else ""))
        elif two:
            rows["ember"] = dict(prefill=two[0], decode=two[1],
                                 how=f"bench latency two-point, lat(N,1)={l1:.3f}s lat(N,{m})={lm:.3f}s")
    for e in ("vllm", "transformers"):
        j = load(f"lat_{e}.json")
        if j:
            rows[e] = dict(prefill=j["prefill_tok_s"], decode=j["decode_tok_s"],
                           how=f"in {j['input_len']} out {j['output_len']}, greedy {j.get('greedy_tokens', [])[:6]}")
    j = load("lat_llamacpp.json")
    if isinstance(j, list):
        pp = [r for r in j if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0]
        tg = [r for r in j if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
        rows["llamacpp"] = dict(prefill=pp[0]["avg_ts"] if pp else None, decode=tg[0]["avg_ts"] if tg else None,
                                how=(f"llama-bench pp{pp[0]['n_prompt'] if pp else '?'} tg{tg[0]['n_gen'] if tg else '?'}"
                                     f" t{(pp or tg or [{}])[0].get('n_threads', '?')}"))
    return rows


def active_bytes_per_token(ckpt):
    """Bytes of weights one decode step reads (all but idle experts and the embedding table), f32."""
    try:
        cfg = json.load(open(os.path.join(ckpt, "config.json")))
        idx = json.load(open(os.path.join(ckpt, "model.safetensors.index.json")))
        n = idx["metadata"].get("total_parameters")
        if n is None:
            return None
        E = cfg.get("num_experts") or cfg.get("num_local_experts")
        k, H, I, L = cfg["num_experts_per_tok"], cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_hidden_layers"]
        active = n - L * (E - k) * 3 * H * I - cfg["vocab_size"] * H
        return active * 4
    except (OSError, KeyError, ValueError, TypeError):
        return None


def main():
    v = load("versions.json") or {}
    print("## Peer comparison\n")
    print(f"Date {v.get('date', '?')}, host {v.get('host', '?')} ({v.get('nproc', '?')} cores, {v.get('cpu', '?')}), "
          f"threads {v.get('threads', '?')}, checkpoint `{v.get('checkpoint', '?')}`.\n")
    print("Versions:")
    for e in ENGINES:
        print(f"- {e}: {v.get(e, '?')}")
    if "vllm_cpu_omp_threads_bind" in v:
        print(f"- vLLM VLLM_CPU_OMP_THREADS_BIND={v['vllm_cpu_omp_threads_bind']}")
    print()

    bw = {t: load(f"membw_t{t}.json") for t in (1, 2, 4, 8, 16)}
    bw = {t: j for t, j in bw.items() if j}
    ab = active_bytes_per_token(v.get("checkpoint", ""))
    if bw:
        print("### Memory bandwidth (benches/peers/membw.c, best of 5)\n")
        print("| threads | buffer MiB | read GB/s | copy GB/s (bytes copied/s) | write GB/s | decode bound at read GB/s |")
        print("|---|---|---|---|---|---|")
        for t, j in sorted(bw.items()):
            bound = f"{j['read_gbs'] * 1e9 / ab:.1f} tok/s ({ab / 1e9:.2f} GB/token f32)" if ab else "–"
            print(f"| {j['threads']} | {j['buffer_mib']} | {j['read_gbs']:.2f} | {j['copy_gbs']:.2f} | {j['write_gbs']:.2f} | {bound} |")
        print()

    rows = latency_rows()
    if rows:
        ref = rows.get("ember", {})
        print("### Single stream (batch 1)\n")
        print("| engine | prefill tok/s | decode tok/s | prefill vs ember | decode vs ember | how |")
        print("|---|---|---|---|---|---|")
        for e in ENGINES:
            if e in rows:
                r = rows[e]
                print(f"| {e} | {fmt(r['prefill'])} | {fmt(r['decode'])} | {ratio(r['prefill'], ref.get('prefill'))} "
                      f"| {ratio(r['decode'], ref.get('decode'))} | {r['how']} |")
        print()

    runs = []
    for p in sorted(glob.glob(os.path.join(OUT, "serve_*_c*_client-*.json"))):
        m = re.match(r"serve_(\w+?)_c(\d+)_client-(\w+)\.json", os.path.basename(p))
        j = load(os.path.basename(p))
        if m and j:
            runs.append((m.group(1), int(m.group(2)), m.group(3), j))
    if runs:
        print("### Serving (random dataset, --ignore-eos, temperature 0)\n")
        out_len = v.get("serve_out")

        def nominal(j):
            # --ignore-eos: every request makes exactly serve_out tokens. Clients that recount tokens from the text
            # (vLLM's client does with llama-server, whose usage rides on a chunk that also has choices) misreport.
            if out_len and j.get("duration"):
                return j.get("completed", 0) * out_len / j["duration"]
            return j.get("output_throughput")

        print("| engine | client | concurrency | prompts ok/failed | in/out tokens (client count) | req/s | "
              "output tok/s (client) | output tok/s (completed × out_len) | mean TTFT ms | mean TPOT ms | "
              "vs ember (same client, C) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        ref = {(c, cl): nominal(j) for e, c, cl, j in runs if e == "ember"}
        order = {e: i for i, e in enumerate(ENGINES)}
        for e, c, cl, j in sorted(runs, key=lambda r: (r[2], r[1], order.get(r[0], 9))):
            n = j.get("completed", 0) or 1
            io = f"{j.get('total_input_tokens', 0) / n:.0f}/{j.get('total_output_tokens', 0) / n:.0f}"
            print(f"| {e} | {cl} | {c} | {j.get('completed', '?')}/{j.get('failed', '?')} | {io} "
                  f"| {fmt(j.get('request_throughput'), 2)} | {fmt(j.get('output_throughput'))} | {fmt(nominal(j))} "
                  f"| {fmt(j.get('mean_ttft_ms'))} | {fmt(j.get('mean_tpot_ms'))} "
                  f"| {ratio(nominal(j), ref.get((c, cl)))} |")
        print()
        cross = [(c, cl, j) for e, c, cl, j in runs if e == "ember"]
        cs = {c for c, cl, j in cross if cl == "ember"} & {c for c, cl, j in cross if cl == "vllm"}
        for c in sorted(cs):
            a = next(j for cc, cl, j in cross if cc == c and cl == "ember")
            b = next(j for cc, cl, j in cross if cc == c and cl == "vllm")
            print(f"Client check on ember serve, C={c}: output tok/s ember client {fmt(a.get('output_throughput'))} vs "
                  f"vLLM client {fmt(b.get('output_throughput'))} ({ratio(a.get('output_throughput'), b.get('output_throughput'))}); "
                  f"mean TTFT {fmt(a.get('mean_ttft_ms'))} vs {fmt(b.get('mean_ttft_ms'))} ms; "
                  f"mean TPOT {fmt(a.get('mean_tpot_ms'))} vs {fmt(b.get('mean_tpot_ms'))} ms.\n")
    for e in ENGINES:
        h = load(f"hello_{e}.json")
        if h and h.get("choices"):
            print(f"- {e} server greedy text: {h['choices'][0].get('text', '')[:80]!r}")


if __name__ == "__main__":
    main()
