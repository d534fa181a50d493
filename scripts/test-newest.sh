#!/usr/bin/env bash
# Runs the test suite with the newest releases that pyproject.toml allows (torch stays on its CPU
# build), so that an upstream release that breaks us fails here before it reaches a user.
# First it resolves that set without installing it: when it is exactly requirements.lock, the
# locked run (scripts/test.sh) has already tested it and nothing more runs. Otherwise, or with
# MOT_NEWEST_ALWAYS=1, it builds a throw-away venv (scripts/venv-newest.sh) and runs the suite there.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# every extra of pyproject.toml (dev, plot, the trackers)
extras=$(python3 -c 'import tomllib; print(",".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]))')
torch=${TORCH:-$(sed -n 's/^torch==//p' requirements.lock)}
report=$(mktemp -t mot-newest-report-XXXXXX.json)
venv=$(mktemp -d -t mot-newest-XXXXXX)
trap 'rm -rf "$report" "$venv"' EXIT
if [ -z "${MOT_NEWEST_ALWAYS:-}" ]; then
    python3 -m pip install -q --dry-run --ignore-installed --report "$report" -e ".[$extras]" "torch==$torch"
    if python3 - "$report" <<'PY'
import json, re, sys

def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()

newest = {key(item["metadata"]["name"]): item["metadata"]["version"].split("+")[0] for item in json.load(open(sys.argv[1]))["install"]}
newest.pop("mot-transition", None)
locked = dict(line.strip().split("==") for line in open("requirements.lock") if line.strip() and not line.startswith("#"))
locked = {key(name): version for name, version in locked.items()}
changed = sorted(f"{name} {locked.get(name, '-')} -> {newest.get(name, '-')}" for name in newest.keys() | locked.keys() if newest.get(name) != locked.get(name))
if changed:
    print("newest allowed releases differ from requirements.lock: " + ", ".join(changed))
    sys.exit(1)
print(f"newest allowed releases are exactly requirements.lock ({len(locked)} packages): the locked run tested them")
PY
    then
        exit 0
    fi
fi
TORCH=$torch bash scripts/venv-newest.sh "$venv"
bash scripts/versions.sh "$venv/bin/python" "newest releases"
# transformers' distributed mixins (tensor / expert parallel, FSDP: 2 gloo processes a test, most of the
# suite's time) test our plans against transformers and torch: with the locked releases of both, the
# locked run has already run them
skip=()
newest_transformers=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')
if [ "$newest_transformers" = "$(sed -n 's/^transformers==//p' requirements.lock)" ]; then
    echo "transformers $newest_transformers and torch $torch are the locked releases: tests/test_transformers_distributed.py ran in the locked run"
    # the same for the trainer's own torchrun runs (DDP / FSDP / HSDP equal to one process, resharded
    # resumes, two nodes): the locked run ran them with these releases of torch and transformers
    skip=(--ignore=tests/test_transformers_distributed.py -m "not torchrun")
fi
"$venv/bin/python" -m pytest -n auto "${skip[@]}" "$@"
