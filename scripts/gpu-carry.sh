#!/usr/bin/env bash
# Makes gpu-carry/ (ignored by git), what a GPU session carries to the device machine for
# scripts/gpu-check.sh: the wheels its image lacks at our versions (gpu-carry/whl: the lock's
# transformers and what it needs beyond the image, for Python 3.12 on x86_64 Linux) and, for
# --study, the study's GPU-size corpus packed (gpu-carry/fifth.tar.xz, prepared first with
# scripts/study-data-rich-gpu.sh --prepare-only if runs/corpora/linux-6.1-c-fifth is not there).
#
#   bash scripts/gpu-carry.sh            # then, on the device (carry ["gpu-carry"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site gpu-carry/whl/*.whl
#   export PYTHONPATH=/tmp/site; mkdir -p runs/corpora && tar -xJf gpu-carry/fifth.tar.xz -C runs/corpora
#   OUT=$OUT DATA=runs/corpora/linux-6.1-c-fifth bash scripts/gpu-check.sh --profile --study
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu-carry
PACKAGES="transformers huggingface_hub kernels tomlkit httpx2 httpcore2 truststore idna click regex hf-xet"
pins=()
for name in $PACKAGES; do
    pin=$(grep -i "^${name}==" requirements.lock) || { echo "error: $name is not in requirements.lock" >&2; exit 1; }
    pins+=("$pin")
done
rm -rf "$CARRY.partial" && mkdir -p "$CARRY.partial/whl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d "$CARRY.partial/whl" "${pins[@]}"
if [ ! -f runs/corpora/linux-6.1-c-fifth/manifest.json ]; then
    bash scripts/study-data-rich-gpu.sh --prepare-only
fi
tar -cJf "$CARRY.partial/fifth.tar.xz" -C runs/corpora linux-6.1-c-fifth
rm -rf "$CARRY" && mv "$CARRY.partial" "$CARRY"
du -sh "$CARRY"/* | sed 's/^/  /'
echo "wrote $CARRY (the device run's carry is limited to 64 MiB in all)"
