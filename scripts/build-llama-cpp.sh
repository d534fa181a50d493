#!/usr/bin/env bash
# Builds stock llama.cpp's command-line tools (llama-completion, llama-cli, llama-server, llama-perplexity) from the
# llama.cpp tree that llama-cpp-python's source distribution vendors (the package index is all this
# needs: no git clone), into DIR/bin. Needs cmake and ninja. Measured on 2 cores beside heavy other
# work: 64 minutes end to end (17 CPU minutes); 25 minutes with ninja -j1 on a quieter machine.
#
#   bash scripts/build-llama-cpp.sh [DIR]        # default DIR: runs/llama.cpp
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(realpath -m "${1:-runs/llama.cpp}")
VERSION=${LLAMA_CPP_PYTHON:-0.3.36}
for tool in cmake ninja; do
    command -v "$tool" >/dev/null || { echo "build-llama-cpp.sh needs $tool on PATH (pip install cmake ninja, or your system's packages)" >&2; exit 1; }
done
mkdir -p "$DIR"
# the whole source distribution stays together: vendor/llama.cpp's .git file points into the
# distribution's own .git/modules, which is how the tools learn their commit (0c1e570 for 0.3.36)
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -d "$SRC" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
    tar -xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
    mv "$tmp/llama_cpp_python-$VERSION" "$DIR/"
fi
cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
ninja -C "$SRC/build" llama-completion llama-cli llama-server llama-perplexity
mkdir -p "$DIR/bin"
for tool in llama-completion llama-cli llama-server llama-perplexity; do ln -sf "$SRC/build/bin/$tool" "$DIR/bin/$tool"; done
"$DIR/bin/llama-completion" --version 2>&1 | head -1
echo "built: $DIR/bin/llama-completion, llama-cli, llama-server, llama-perplexity"
