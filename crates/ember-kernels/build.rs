//! With the `cuda` feature: compiles each `kernels/*.cu` (repo root) with nvcc into one fatbin
//! holding SASS for every architecture of `EMBER_CUDA_ARCHS` (default 80,90,100) plus PTX of the
//! newest, for `src/cuda.rs` to embed. ptxas's registers and spills per kernel and architecture go
//! to `$OUT_DIR/ptxas-resource-usage.txt` and are printed as cargo warnings; a spill is flagged.
//! Without the feature it does nothing, so the crate builds on machines with no CUDA at all.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "80,90,100";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "EMBER_CUDA_ARCHS", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernels = manifest.join("../../kernels");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // A directory: cargo rescans all of it, headers included.
    println!("cargo:rerun-if-changed={}", kernels.display());

    let nvcc = find_nvcc();
    let archs = arch_list();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", kernels.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    let mut report = String::new();
    for src in &sources {
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel file names are UTF-8");
        let fatbin = out_dir.join(format!("{name}.fatbin"));
        let log = compile(&nvcc, &archs, &kernels, src, &fatbin);
        for usage in parse_ptxas(&log) {
            let line = usage.describe(name);
            let flag = if usage.spill_stores + usage.spill_loads > 0 {
                "SPILL "
            } else {
                ""
            };
            println!("cargo:warning={flag}{line}");
            writeln!(report, "{flag}{line}").expect("writing to a String");
        }
    }
    let report_path = out_dir.join("ptxas-resource-usage.txt");
    std::fs::write(&report_path, report)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", report_path.display()));
}

/// `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` from PATH.
fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return nvcc.into();
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let nvcc = Path::new(&home).join("bin/nvcc");
        if nvcc.exists() {
            return nvcc;
        }
    }
    "nvcc".into()
}

/// Compute capabilities to build for, from `EMBER_CUDA_ARCHS` (`80,90,100`).
fn arch_list() -> Vec<u32> {
    let spec = env::var("EMBER_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let archs: Vec<u32> = spec
        .split(',')
        .map(|a| {
            a.trim().parse().unwrap_or_else(|_| {
                panic!("EMBER_CUDA_ARCHS={spec:?}: {a:?} is not a compute capability like 90")
            })
        })
        .collect();
    assert!(
        !archs.is_empty(),
        "EMBER_CUDA_ARCHS is empty; unset it for {DEFAULT_ARCHS}"
    );
    archs
}

/// Runs nvcc on one source and returns its ptxas log; panics with nvcc's output when it fails.
fn compile(nvcc: &Path, archs: &[u32], include: &Path, src: &Path, fatbin: &Path) -> String {
    let mut cmd = Command::new(nvcc);
    cmd.args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v"])
        .arg("-I")
        .arg(include);
    let newest = archs.iter().max().expect("arch list is not empty");
    for arch in archs {
        // SASS for each; PTX too for the newest, so a newer GPU can JIT it.
        let code = if arch == newest {
            format!("[sm_{arch},compute_{arch}]")
        } else {
            format!("sm_{arch}")
        };
        cmd.arg(format!("-gencode=arch=compute_{arch},code={code}"));
    }
    cmd.arg("-o").arg(fatbin).arg(src);
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}); install the toolchain with scripts/install-cuda-toolchain.sh \
             and export what it prints, or build without the `cuda` feature",
            nvcc.display()
        )
    });
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "nvcc failed on {}:\n{log}",
        src.display()
    );
    log
}

/// What ptxas reported for one kernel on one architecture.
struct PtxasUsage {
    function: String,
    arch: String,
    registers: u32,
    stack_bytes: u32,
    spill_stores: u32,
    spill_loads: u32,
}

impl PtxasUsage {
    fn describe(&self, module: &str) -> String {
        format!(
            "ptxas {module}::{} {}: {} registers, {} B stack, {} B spill stores, {} B spill loads",
            self.function,
            self.arch,
            self.registers,
            self.stack_bytes,
            self.spill_stores,
            self.spill_loads
        )
    }
}

/// Parses `-Xptxas -v` output: "Compiling entry function 'f' for 'sm_90'", then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
fn parse_ptxas(log: &str) -> Vec<PtxasUsage> {
    let mut found = Vec::new();
    let mut current: Option<PtxasUsage> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let function = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            current = Some(PtxasUsage {
                function,
                arch,
                registers: 0,
                stack_bytes: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(usage) = current.as_mut() {
            if line.contains("bytes stack frame") {
                usage.stack_bytes = number_before(line, "bytes stack frame");
                usage.spill_stores = number_before(line, "bytes spill stores");
                usage.spill_loads = number_before(line, "bytes spill loads");
            } else if line.contains("Used ") && line.contains(" registers") {
                usage.registers = number_before(line, "registers");
                found.extend(current.take());
            }
        }
    }
    found
}

/// The integer just before `label` in `line` ("12 bytes spill stores" -> 12), 0 if absent.
fn number_before(line: &str, label: &str) -> u32 {
    line.find(label)
        .map(|end| &line[..end])
        .and_then(|head| {
            head.split(|c: char| !c.is_ascii_digit())
                .rfind(|s| !s.is_empty())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
