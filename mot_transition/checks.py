"""Checks made before the expensive part of a command: that a destination can be written, that a
tokenizer folder loads, that a JSON file is JSON. Each failure is one line naming the file or the
option as the user typed it (the CLI prints it as `error: ...`, exit 1)."""

import json
import os
import tempfile
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
JSON_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a library's may run over several), else its type's name."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def check_writable_folder(path: str | Path, option: str, shown: str | Path | None = None) -> None:
    """`path` (a folder to create or to write in) can be written: the nearest existing folder on the
    way to it is a folder and takes a new file (tried, not guessed from permission bits, which root
    ignores and a read-only mount does not show). The error names `option` and `shown` (default `path`)."""
    path = Path(path).expanduser()
    shown = path if shown is None else shown
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {shown}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".mot-transition-write-test-")
    except OSError as error:
        raise PermissionError(f"{option} {shown}: cannot write in {existing} ({error.strerror or one_line(error)})") from None
    os.close(fd)
    os.unlink(probe)


def check_writable_file(path: str | Path, option: str, example: str = "scores.json", replace: bool = True) -> None:
    """`path` (a file to write) is not a folder and its folder can be written; with `replace` False, it
    does not exist yet either (the user's --force sets `replace`). `example`: the file name a folder's
    error suggests."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; give a file name, e.g. {path / example}")
    if not replace and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{option} {path} already exists; pass --force to replace it")
    check_writable_folder(path.parent, option, shown=path)


def check_device(name: str, option: str):
    """The torch.device `name` names, when this machine has it; else one line naming `option`."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {name!r} is not a device; give cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option} {name!r}: no CUDA device is available here; use cpu")
        if device.index is not None and device.index >= count:
            has = "one CUDA device, cuda:0" if count == 1 else f"{count} CUDA devices, cuda:0 to cuda:{count - 1}"
            raise ValueError(f"{option} {name!r}: this machine has {has}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {name!r}: no MPS device is available here; use cpu")
    elif device.type != "cpu":
        raise ValueError(f"{option} {name!r}: runs on cpu, cuda, cuda:N or mps only")
    return device


def read_json(path: str | Path, what: str = ""):
    """The JSON value in `path`, or a one-line ValueError naming the file (and the line and column
    where it stops being JSON; JSON nested past Python's recursion limit too)."""
    path = Path(path)
    label = f"{what}: {path}" if what else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{label} is not UTF-8 text, so not JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        empty = " (the file is empty)" if not text.strip() else ""
        raise ValueError(f"{label} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}{empty}") from None
    except RecursionError:
        raise ValueError(f"{label} is not JSON this reads: nested deeper than Python's recursion limit") from None


def load_tokenizer_folder(path: str | Path, what: str):
    """A tokenizer folder loaded with AutoTokenizer from the folder alone (never the Hub), or one line
    naming it: not a folder, no tokenizer file in it, a JSON file in it that is not JSON (named, with
    its line), or the library's own refusal. `what` names it as the user gave it (`--tokenizer PATH`,
    `the checkpoint CKPT`)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {path} is not a folder" if not path.exists() else f"{what}: {path} is a file, not a folder")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{what}: {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    for name in JSON_TOKENIZER_FILES:
        if (path / name).is_file():
            read_json(path / name, what)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # the library's refusals come as many types, some of them many lines long
        raise ValueError(f"{what}: the tokenizer in {path} does not load: {one_line(error)}") from None


__all__ = ["one_line", "check_writable_folder", "check_writable_file", "check_device", "read_json", "load_tokenizer_folder"]
