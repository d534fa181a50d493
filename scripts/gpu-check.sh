#!/usr/bin/env bash
# The GPU check, for a session that is lent a GPU machine, as one call: the CUDA tests, FSDP2 on one
# GPU, optionally a bare training step profiled and the data-rich study's GPU size, then benchmarks/gpu.py. It installs nothing: it runs
# with the machine's own Python, which on this workplace's device image already holds torch,
# transformers, tokenizers, safetensors, typer, rich and pytest. But its transformers (5.17 on 2026-12-04)
# is below our range (>=5.22) and MoTConfig does not build on it: carry the lock's transformers and what
# it needs as wheels and install them first (2026-12-04: transformers 5.25.0, huggingface_hub 2.4.0,
# kernels, tomlkit, httpx2, httpcore2, truststore, idna, click, regex, hf-xet): `bash scripts/gpu-carry.sh`
# downloads them into gpu-carry/whl and packs --study's corpus, and says how to use them on the device.
#
#   device run:  bash scripts/gpu-check.sh [--profile] [--study]
#
# OUT (default gpu-check/) receives versions.txt, check.log (every part's output), fsdp.json, gpu.md,
# with --profile profile.md (benchmarks/gpu_profile.py: why Token Choice trains slower than MoT) and, with --study, study.tgz (docs/study-data-rich-gpu/: the grid's results, one JSON file a run).
# BUDGET (seconds, default 540) bounds the whole: each part runs under the smaller of its own cap and
# what is left, so a part that hangs leaves the later ones their time, and a part cut short keeps
# what it wrote. DATA: a prepared corpus for benchmarks/gpu.py's training runs (default: the recipes'
# own, which prepares the built-in corpus with a 32,000-token BPE first); STEPS: their steps (300).
# --study needs the corpus of scripts/study-data-rich-gpu.sh in runs/corpora/linux-6.1-c-fifth.
set -o pipefail
for flag in "$@"; do
    case $flag in --profile|--study) ;; *) echo "error: unknown option $flag (known: --profile, --study)" >&2; exit 2 ;; esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-check}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
LOG="$OUT/check.log"

part() {  # part NAME CAP COMMAND...
    local name=$1 cap=$2 left=$((BUDGET - SECONDS)) start=$SECONDS
    shift 2
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 10 ]; then
        echo "== $name: not run, the budget is spent" | tee -a "$LOG"
        return
    fi
    echo "== $name (at most ${cap} s)" | tee -a "$LOG"
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
    echo "== $name: exit status ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
}

python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt" || exit 1
part "CUDA tests" 150 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
# FSDP2 on one GPU: tiny-token-choice trained whole and sharded in a process group of one (bf16 gathers)
part "FSDP on one GPU" 120 python3 scripts/gpu_fsdp_check.py --out "$OUT"
if [[ " $* " == *" --profile "* ]]; then
    part "a bare training step, profiled" 120 python3 benchmarks/gpu_profile.py --out "$OUT"
fi
if [[ " $* " == *" --study "* ]]; then
    part "study, GPU size" "${STUDY_CAP:-300}" env PY=python3 bash scripts/study-data-rich-gpu.sh
    tar -czf "$OUT/study.tgz" docs/study-data-rich-gpu 2>&1 | tee -a "$LOG"
fi
part "benchmarks/gpu.py" 420 python3 benchmarks/gpu.py --out "$OUT" --steps "${STEPS:-300}" ${DATA:+--data "$DATA"}
