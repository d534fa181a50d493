"""Writing a checkpoint directory safely: the work happens in a staging directory beside the
destination, which is renamed into place only when complete; an existing destination is replaced
only with --force and only when this toolkit wrote it; what a killed run left behind is tidied."""

import ctypes
import errno
import json
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """`dst` may be new, an empty directory, or (with `force`) a checkpoint this toolkit wrote; never
    anything else, which `--force` would otherwise delete."""
    s, d, here = src.resolve(), dst.resolve(), Path.cwd().resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ValueError(f"the destination {dst} would overwrite or nest with the source {src}; choose another directory")
    if d == here or d in here.parents:
        raise ValueError(f"the destination {dst} is the current directory or holds it; choose a new directory")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    if not force:
        raise FileExistsError(f"{dst} already exists; pass --force to replace it")
    if any(dst.iterdir()):
        problem = not_ours(dst)
        if problem:
            raise FileExistsError(f"{dst} is not a conversion or export this toolkit wrote ({problem}), and --force "
                                  "replaces only those; choose another destination")


REPORTS = ("conversion_report.json", "export_report.json", "consolidation_report.json")
# what a conversion wrote before its report listed its files: the checkpoint's own files
_CHECKPOINT_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "configuration_mot.py",
                     "modeling_mot.py", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "conversion_report.json"}


def not_ours(folder: Path) -> str | None:
    """None when `folder` is a conversion or export this toolkit wrote and holds nothing else: its
    report (conversion_report.json, export_report.json) is a JSON object whose `files` are exactly
    the folder's entries, and its config.json a JSON object (of model_type "mot" for a conversion).
    A conversion written before reports listed their files may hold only a checkpoint's files.
    Else what is wrong, in a few words: what --force would otherwise delete."""
    report_name = next((name for name in REPORTS if (folder / name).is_file()), None)
    if report_name is None:
        return f"it has neither {' nor '.join(REPORTS)}"
    try:
        report, config = json.loads((folder / report_name).read_text()), json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return f"its {report_name} or config.json is missing or not JSON"
    if not isinstance(report, dict) or not isinstance(config, dict):
        return f"its {report_name} or config.json is not a JSON object"
    if report_name == REPORTS[0] and config.get("model_type") != "mot":
        return "its config.json is not of model_type \"mot\""
    entries = {path.name for path in folder.iterdir()}
    files = report.get("files")
    if files is None and report_name == REPORTS[0]:  # before conversions listed their files
        extra = sorted(n for n in entries - _CHECKPOINT_FILES if not n.endswith(".safetensors") or (folder / n).is_dir())
        return f"it also holds {extra[0]}, which a conversion does not write" if extra else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return f"its {report_name} lists no files"
    if entries - set(files):
        return f"it also holds {sorted(entries - set(files))[0]}, which its {report_name} does not list"
    if set(files) - entries:
        return f"{sorted(set(files) - entries)[0]}, listed in its {report_name}, is missing"
    return None


def beside(dst: Path, kind: str, pid: int | None = None) -> Path:
    """The hidden directory `.NAME.KIND-PID` beside `dst` that a conversion or export works in:
    `converting` (its staging) or `old` (the previous `dst`, moved aside while the new one is renamed in)."""
    return dst.parent / f".{dst.name}.{kind}-{os.getpid() if pid is None else pid}"


def clean_after_killed_runs(dst: Path) -> None:
    """Tidy what a killed conversion left beside `dst`: its staging directory is removed, and an old
    `dst` it had moved aside is put back when `dst` itself is missing. Only for processes that no
    longer run; a conversion still running keeps its files."""
    for path in sorted(dst.parent.iterdir()) if dst.parent.is_dir() else ():
        kind, _, pid = path.name.removeprefix(f".{dst.name}.").rpartition("-")
        if kind not in ("converting", "old") or not pid.isdigit() or path != beside(dst, kind, int(pid)):
            continue
        if _running(int(pid)):
            continue
        if kind == "old" and not dst.exists():
            os.replace(path, dst)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        pass
    return True


def replace_directory(staging: Path, dst: Path) -> None:
    """Move the finished `staging` directory to `dst`, replacing an old `dst` only once it is complete:
    in one atomic exchange where the system has one (Linux), so that `dst` is at every instant the
    old directory or the new one; elsewhere the old one is moved aside first (put back by the next
    run if a kill lands between the two renames)."""
    if not dst.exists():
        os.replace(staging, dst)
        return
    if _exchange(staging, dst):
        shutil.rmtree(staging, ignore_errors=True)  # now the old one; a kill here leaves it for the next run to remove
        return
    old = beside(dst, "old")
    os.replace(dst, old)
    try:
        os.replace(staging, dst)
    except BaseException:
        os.replace(old, dst)  # put the old destination back: never leave neither
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories `a` and `b` atomically (renameat2 with RENAME_EXCHANGE, Linux 3.15+, on
    the file systems that support it); False where it is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc 2.28+ (musl, macOS, ...)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def unprivate_safetensors(folder: Path) -> None:
    """Give the .safetensors files under `folder` that safetensors' writer made private the mode any
    other new file gets (`new_file_mode`). Its writer (0.8) creates a temporary file, mode 0600, and
    renames it into place: a checkpoint or export that the user's group, or a server running as another
    user, could then not read. Files of another mode are left alone."""
    mode = new_file_mode()
    if mode == 0o600:  # the user's umask keeps files private anyway
        return
    for path in folder.rglob("*.safetensors"):
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600:
            os.chmod(path, mode)


def new_file_mode() -> int:
    """The mode `open` gives a new file in this process: 0o666 less the umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """This process's umask, read where Linux tells it without changing it; elsewhere the one it had
    when this module was imported (set and restored then, before any thread of ours could create a file)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_IMPORT


def _umask_now() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_now()


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """`fig.savefig(path)` through a temporary file beside it and `os.replace`: a kill while drawing
    leaves the old image or none, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def staged(dst: Path):
    """A fresh staging directory beside `dst` to write into: renamed into place as `dst` when the
    block completes, removed when it raises (or is interrupted)."""
    staging = beside(dst, "converting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        unprivate_safetensors(staging)
        replace_directory(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
