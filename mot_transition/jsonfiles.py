"""JSON files that are JSON: no NaN or Infinity (which `json.dumps` writes by default and no other
JSON reader accepts), and written atomically, so a reader never sees half a file."""

import json
import math
import os
from pathlib import Path


def dumps(obj, indent: int | None = 1, **kwargs) -> str:
    """`json.dumps` that refuses non-finite floats with a ValueError naming where the value is."""
    where = _nonfinite_at(obj, "")
    if where is not None:
        raise ValueError(f"refusing to write a non-finite number to JSON (at {where or 'the top level'})")
    return json.dumps(obj, indent=indent, allow_nan=False, **kwargs)


def write_json(path: str | Path, obj, indent: int | None = 1, **kwargs) -> Path:
    """Write `obj` to `path` through a temporary file beside it and `os.replace`: the file is either
    the old one or the complete new one, never half of either."""
    path = Path(path)
    if path.is_dir():  # os.replace would fail naming the temporary file, not this one
        raise IsADirectoryError(f"{path} is a folder; cannot write a JSON file there")
    text = dumps(obj, indent=indent, **kwargs) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words: "null", "a number", "an array", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), type(value).__name__)


def read_json_object(path: str | Path) -> dict:
    """The JSON object in `path`, or a one-line ValueError naming the file when it is not one."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is truncated or corrupted: not valid JSON") from None
    except RecursionError:
        raise ValueError(f"{path} is corrupted: JSON nested deeper than Python's recursion limit") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is corrupted: not a JSON object")
    return value


def _nonfinite_at(obj, path: str) -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _nonfinite_at(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


__all__ = ["dumps", "write_json", "read_json_object"]
