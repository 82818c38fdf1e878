#!/usr/bin/env bash
# Runs tests/sdk/openai_sdk.py (the official openai SDK) against `ember serve` on the demo model.
# Needs python3 with venv; the SDK comes from PyPI into target/sdk-venv (reused between runs).
# Without python3 or PyPI it says SKIPPED and why, and exits 0; any test failure exits 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
EMBER=${EMBER:-target/debug/ember}
VENV=${SDK_VENV:-target/sdk-venv}
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    echo "SKIPPED openai SDK test: python3 -m venv is not available"; exit 0
  fi
fi
if ! "$VENV/bin/python" -c "import openai, pydantic" 2>/dev/null; then
  if ! timeout 300 "$VENV/bin/pip" install -q "openai>=1.40" "pydantic>=2" >/dev/null 2>&1; then
    echo "SKIPPED openai SDK test: cannot install openai and pydantic from PyPI"; exit 0
  fi
fi
[ -x "$EMBER" ] || cargo build -q -p ember-cli
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
EMBED_PORT=$(free_port)
"$EMBER" serve --served-model-name demo --port "$PORT" > target/sdk-serve.log 2>&1 &
SERVER=$!
"$EMBER" serve --model models/qwen3-embedding-tiny --dtype float32 --served-model-name embed \
  --port "$EMBED_PORT" > target/sdk-serve-embed.log 2>&1 &
EMBED_SERVER=$!
trap 'kill $SERVER $EMBED_SERVER 2>/dev/null || true' EXIT
for port in "$PORT" "$EMBED_PORT"; do
  for _ in $(seq 600); do
    curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null && kill -0 $EMBED_SERVER 2>/dev/null \
      || { cat target/sdk-serve.log target/sdk-serve-embed.log; exit 1; }
    sleep 0.1
  done
done
"$VENV/bin/python" tests/sdk/openai_sdk.py "http://127.0.0.1:$PORT/v1" demo \
  "http://127.0.0.1:$EMBED_PORT/v1" embed models/qwen3-embedding-tiny/reference.json
