"""transformers' own common model tests (ModelTesterMixin, ConfigTester, TrainingTesterMixin) and its
distributed test mixins (TensorParallelTesterMixin, ExpertParallelTesterMixin, FSDPTesterMixin), for the
installed transformers version, fetched from the package registry and cached between runs.

The mixins are not in the wheel. The source distribution of the same version ships
tests/test_modeling_common.py, tests/test_configuration_common.py and tests/test_training_mixin.py,
but not three modules they import: tests/generation/test_utils.py (GenerationTesterMixin),
tests/exporters/test_export.py (ExportTesterMixin) and tests/utils/test_configuration_utils.py
(config_common_kwargs). Those get named placeholders here, so the mixins import; the tests behind
them cannot run from the registry, and our own suite covers generate() and torch.export instead.
Nothing of upstream's test code is kept in this repository. The distributed mixins import a module the
sdist does not ship either, `distributed_testing_utils`: ours (tests/distributed_testing_utils.py) is
placed beside them. A release whose sdist lacks one of the DISTRIBUTED_FILES (older ones do) still
unpacks; the test module that needs it is skipped, saying so.

    load(files) makes the package `upstream_tests` importable (the modules of `files` imported once), or
    skips the calling test module with the reason (offline, no such release on the index, a module the
    sdist lacks, `parameterized` missing).

Set MOT_TRANSITION_CACHE to move the cache (default ~/.cache/mot-transition), PIP_INDEX_URL to fetch
from another index (PEP 691 JSON), MOT_TRANSITION_NO_UPSTREAM_TESTS=1 to skip these tests.
"""

import hashlib
import importlib
import io
import json
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
import transformers

FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_training_mixin.py")
DISTRIBUTED_FILES = ("test_tensor_parallel_mixin.py", "test_expert_parallel_mixin.py", "test_fsdp_mixin.py")
HELPER = Path(__file__).with_name("distributed_testing_utils.py")  # ours, for the distributed mixins
MANIFEST = "lacks.json"  # the files of FILES + DISTRIBUTED_FILES that this version's sdist does not have
PLACEHOLDERS = {
    "generation/test_utils.py": (
        "class GenerationTesterMixin:\n"
        '    """Placeholder: the sdist does not ship tests/generation/; generate() is tested in our own suite."""\n'
    ),
    "exporters/test_export.py": (
        "class ExportTesterMixin:\n"
        '    """Placeholder: the sdist does not ship tests/exporters/; torch.export is tested in our own suite."""\n'
    ),
    "utils/test_configuration_utils.py": (
        "# Placeholder: the sdist does not ship tests/utils/; ConfigTester.check_config_arguments_init is not run.\n"
        "config_common_kwargs = {}\n"
    ),
}
PACKAGE = "upstream_tests"


def _cache_root() -> Path:
    env = os.environ.get("MOT_TRANSITION_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "mot-transition"
    return base / "transformers-tests" / transformers.__version__


def _sdist(version: str) -> bytes:
    """The sdist of transformers `version` from the index (PEP 691 JSON), checked against its sha256."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(f"{index}/transformers/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    name = f"transformers-{version}.tar.gz"
    entry = next((f for f in files if f["filename"] == name), None)
    if entry is None:
        raise LookupError(f"{index} has no {name}")
    with urllib.request.urlopen(entry["url"], timeout=300) as response:
        data = response.read()
    expected = entry.get("hashes", {}).get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{name} from {index} does not match its sha256")
    return data


def _unpack(data: bytes, version: str, root: Path) -> None:
    """Write the package `upstream_tests` (the files this sdist has, the placeholders and the list of
    those it lacks) under root, atomically; a package unpacked before the list existed is replaced."""
    staging = root.with_name(root.name + f".partial-{os.getpid()}")
    package = staging / PACKAGE
    package.mkdir(parents=True)
    lacks = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        names = set(archive.getnames())
        for file in FILES + DISTRIBUTED_FILES:
            name = f"transformers-{version}/tests/{file}"
            if name not in names:
                lacks.append(file)
                continue
            (package / file).write_bytes(archive.extractfile(name).read())
    for path, text in {"__init__.py": "", **PLACEHOLDERS}.items():
        target = package / path
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / "__init__.py").touch()
        target.write_text(text)
    (package / MANIFEST).write_text(json.dumps(lacks))
    if root.exists():  # unpacked by an older version of this module, without the list: set aside
        try:
            root.rename(root.with_name(root.name + f".stale-{os.getpid()}"))
        except OSError:
            pass  # another process moved it first
    try:
        staging.rename(root)
    except OSError:  # another process unpacked it first
        shutil.rmtree(staging)
        if not (root / PACKAGE / MANIFEST).is_file():
            raise
    for stale in root.parent.glob(root.name + ".stale-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _place_helper(package: Path) -> None:
    """Our `distributed_testing_utils` beside the mixins, refreshed when ours has changed."""
    target, text = package / "distributed_testing_utils.py", HELPER.read_text()
    if not target.is_file() or target.read_text() != text:
        temporary = target.with_name(f".{target.name}.{os.getpid()}")
        temporary.write_text(text)
        os.replace(temporary, target)


def load(files: tuple[str, ...] = FILES) -> None:
    """Import transformers' test modules `files` (of FILES and DISTRIBUTED_FILES) for the installed version,
    fetching them once; skip the calling test module with the reason where that cannot be done."""
    if os.environ.get("MOT_TRANSITION_NO_UPSTREAM_TESTS"):
        pytest.skip("MOT_TRANSITION_NO_UPSTREAM_TESTS is set", allow_module_level=True)
    if importlib.util.find_spec("parameterized") is None:
        pytest.skip("transformers' common tests need `parameterized` (the dev extra installs it)", allow_module_level=True)
    version = transformers.__version__
    root = _cache_root()
    if not (root / PACKAGE / MANIFEST).is_file():
        try:
            _unpack(_sdist(version), version, root)
        except Exception as error:  # offline, no such release on the index, a changed sdist layout
            pytest.skip(f"transformers {version}'s common tests could not be fetched: {error}", allow_module_level=True)
    lacks = sorted(set(files) & set(json.loads((root / PACKAGE / MANIFEST).read_text())))
    if lacks:
        pytest.skip(f"transformers {version}'s sdist has no tests/{', tests/'.join(lacks)}", allow_module_level=True)
    _place_helper(root / PACKAGE)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        for file in files:
            importlib.import_module(f"{PACKAGE}.{file.removesuffix('.py')}")
    except ImportError as error:  # the sdist of this version imports something it does not ship
        pytest.skip(f"transformers {version}'s common tests do not import: {error}", allow_module_level=True)
