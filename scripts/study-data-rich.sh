#!/usr/bin/env bash
# The study in the data-rich regime (recipes/study-data-rich.toml), from a fresh machine or going on
# where it stopped: prepares the corpus once (runs/corpora/linux-6.1-c: 264M + 14M tokens, 9 min), then runs the
# grid, committing each finished run's results (docs/study-data-rich/) as it is written.
#
#   bash scripts/study-data-rich.sh               # 2 threads: a machine to itself
#   THREADS=1 setsid nice -n 19 bash scripts/study-data-rich.sh   # beside other work
#
# The corpus: every .c file of at most 200,000 bytes in the Linux kernel source of Debian's
# linux-source-6.1 package, version $VERSION (31,850 files, 567 MB, 10 of them exact copies; the
# 155 larger ones are mostly generated tables), prepared with a 2048-token byte-level BPE. Its fingerprint is the grid's
# corpus_fingerprint: another version of the package gives another one, which the study refuses.
set -euo pipefail
cd "$(dirname "$0")/.."
# `nice` alone does not yield to work in other sessions (another terminal): Linux's autogroups share the
# CPU between sessions first. Started as its own session (`setsid`), the script gives its group its niceness.
if [ "$(ps -o sid= -p $$ | tr -d ' ')" = "$$" ] && [ -w /proc/self/autogroup ]; then
    echo "$(nice)" > /proc/self/autogroup 2>/dev/null || true
fi
source scripts/linux-c-sources.sh  # linux_c_sources, VERSION (default 6.1.192-3)
CORPUS=runs/corpora/linux-6.1-c
THREADS=${THREADS:-2}
if [ ! -f "$CORPUS/manifest.json" ]; then
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    linux_c_sources "$src"
    .venv/bin/mot-transition prepare "$src/linux-source-6.1" --out "$CORPUS" --vocab-size 2048 --workers 1
fi
exec .venv/bin/mot-transition study recipes/study-data-rich.toml --out runs/study-data-rich --commit --quiet "train.threads=$THREADS"
