#!/usr/bin/env bash
# The data-rich study's GPU size (recipes/study-data-rich-gpu.toml), on a machine with one CUDA GPU:
# prepares its corpus once (runs/corpora/linux-6.1-c-fifth), then runs the grid.
#
#   bash scripts/study-data-rich-gpu.sh --prepare-only    # the corpus alone (a CPU machine will do)
#   bash scripts/study-data-rich-gpu.sh                   # then the grid, on the GPU
#
# The corpus: every fifth (in path order) of the .c files that scripts/study-data-rich.sh prepares,
# tokenised with that corpus's tokenizer (so it needs runs/corpora/linux-6.1-c, or only its tokenizer/
# folder): 53M training tokens, enough for the 40M tokens of a Token Choice run without repeating one.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/linux-c-sources.sh  # linux_c_sources, VERSION (default 6.1.192-3)
CORPUS=runs/corpora/linux-6.1-c-fifth
TOKENIZER=runs/corpora/linux-6.1-c/tokenizer
PY=${PY:-.venv/bin/python}
if [ ! -f "$CORPUS/manifest.json" ]; then
    [ -d "$TOKENIZER" ] || { echo "error: $TOKENIZER is missing: run scripts/study-data-rich.sh (or copy its corpus's tokenizer/) first" >&2; exit 1; }
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    linux_c_sources "$src"
    # keep every fifth file in the order prepare reads a folder (sorted relative paths)
    (cd "$src/linux-source-6.1" && find . -name '*.c' | LC_ALL=C sort | awk 'NR % 5 != 1' | xargs -d '\n' rm -f)
    "$PY" -m mot_transition.cli prepare "$src/linux-source-6.1" --out "$CORPUS" --tokenizer "$TOKENIZER" --workers "${WORKERS:-1}"
fi
[ "${1:-}" = "--prepare-only" ] && exit 0
exec "$PY" -m mot_transition.cli study recipes/study-data-rich-gpu.toml --out runs/study-data-rich-gpu --quiet train.device=cuda
