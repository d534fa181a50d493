#!/usr/bin/env bash
# The GPU check of issue 10 (item 4), for a session that is lent a GPU machine: the CUDA tests and
# benchmarks/gpu.py, in one call. It installs nothing: it runs with the machine's own Python, which
# on this workplace's device image already holds torch, transformers, tokenizers, safetensors, typer,
# rich and pytest (our declared ranges admit its versions). Results go to $OUT (default gpu-check/).
#
#   device run:  bash scripts/gpu-check.sh          (about 8 minutes on an H100, before the FSDP run was added)
set -o pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt" || exit 1
python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest-cuda.log"
python3 benchmarks/gpu.py --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
# FSDP2 on one GPU: tiny-token-choice trained whole and sharded in a process group of one (bf16 gathers)
python3 scripts/gpu_fsdp_check.py --out "$OUT" 2>&1 | tee "$OUT/fsdp.log"
