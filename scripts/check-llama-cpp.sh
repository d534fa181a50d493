#!/usr/bin/env bash
# Checks the GGUF export against stock llama.cpp: installs llama-cpp-python from the package index
# into .venv (it builds llama.cpp from source: about 25 minutes on 2 cores, once; pip caches the
# wheel), trains the tiny llama-style MoT recipe, converts it to Token Choice, transition-tunes it,
# exports it to GGUF as f32, f16, bf16 and q8_0, and compares each file run by llama.cpp with our
# model: logits at every position of a few prompts, greedy continuations, tokenisation, held-out
# perplexity (mot_transition.llama_cpp_check); then measures what ggml's rounding of each matrix
# product's input costs (scripts/llama_cpp_rounding.py). Then runs the test suite's llama.cpp tests.
#
#   bash scripts/check-llama-cpp.sh [OUT]        # default OUT: runs/llama-cpp-check
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/llama-cpp-check}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
bash scripts/setup.sh
.venv/bin/python -c "import llama_cpp" 2>/dev/null || .venv/bin/python -m pip install -q "llama-cpp-python==$LLAMA_CPP_PYTHON"
mt=.venv/bin/mot-transition
[ -f "$OUT/mot/metrics.jsonl" ] && resume=--resume || resume=
$mt train tiny-llama --out "$OUT/mot" $resume
$mt convert "$OUT/mot" "$OUT/converted" --force
[ -d "$OUT/transition" ] && resume=--resume || resume=
$mt transition "$OUT/converted" --steps 24 --out "$OUT/transition" $resume
for t in f32 f16 bf16 q8_0; do
    $mt export "$OUT/transition" "$OUT/model-$t.gguf" --to gguf --outtype "$t" --force
done
.venv/bin/python -m mot_transition.llama_cpp_check "$OUT/transition" "$OUT"/model-{f32,f16,bf16,q8_0}.gguf
# where the f16, bf16 and q8_0 files part from ours: ggml's rounding of each product's input, tensor group by group
.venv/bin/python scripts/llama_cpp_rounding.py "$OUT/transition" "$OUT/rounding"
.venv/bin/python -m pytest -q tests/test_gguf.py -k llama_cpp
