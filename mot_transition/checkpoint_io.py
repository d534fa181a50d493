"""Reading checkpoint directories safely: config, safetensors headers, tensors one at a time, the
tensors a config needs (`expected_shapes`, `check_tensors`), and where a training run keeps its
checkpoints (`list_checkpoints`, `latest_checkpoint`). It imports nothing of the package but the
config, so every other module may import it.

Every problem with a checkpoint reaches the user as a ValueError / FileNotFoundError of one line
that names the file and what is wrong with it, before anything is written anywhere.
"""

import json
import re
import struct
from pathlib import Path

from .config import MoTConfig

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def load_config(checkpoint: str | Path) -> MoTConfig:
    """The MoTConfig of a checkpoint directory, with a clear error if it is not one."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: it has no config.json")
    try:
        fields = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({error})") from None
    except RecursionError:  # [[[[...]]]] deeper than Python's recursion limit
        raise ValueError(f"{path / 'config.json'} is not valid JSON: nested deeper than Python's recursion limit") from None
    if not isinstance(fields, dict) or fields.get("model_type") != "mot":
        kind = fields.get("model_type") if isinstance(fields, dict) else None
        raise ValueError(f"{path} is not a mot-transition checkpoint (model_type is {kind!r}, expected 'mot')")
    fields.pop("model_type")
    try:
        return MoTConfig(**fields)
    except TypeError as error:  # a field of the wrong type, e.g. "n_embd": "big"
        raise ValueError(f"{path / 'config.json'} has a field of the wrong type ({error})") from None
    except ValueError as error:  # a field out of range: MoTConfig names it
        raise ValueError(f"{path / 'config.json'}: {str(error).strip().splitlines()[0]}") from None


def weight_files(checkpoint: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    path = Path(checkpoint)
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if (path / WEIGHTS_INDEX_NAME).is_file():
        try:
            index = json.loads((path / WEIGHTS_INDEX_NAME).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RecursionError):
            raise ValueError(f"{path / WEIGHTS_INDEX_NAME} is corrupted: no readable weight_map") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lacks the shard {missing[0]} that its index names")
        return [path / s for s in shards]
    if is_sharded(path):  # train.checkpoint_format = "sharded"
        raise ValueError(f"{path} is a sharded checkpoint (dcp/); make it whole first: mot-transition consolidate {path} OUT")
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path} holds pickled weights only; mot-transition reads safetensors only")
    raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}")


DCP_DIR = "dcp"  # a sharded training checkpoint's torch.distributed.checkpoint folder (train/sharded_checkpoint.py)


def is_sharded(checkpoint: str | Path) -> bool:
    """Whether `checkpoint` is a sharded checkpoint (DCP's metadata is its last file written)."""
    return (Path(checkpoint) / DCP_DIR / ".metadata").is_file()


def dcp_reader(checkpoint: str | Path):
    """A torch.distributed.checkpoint reader of a sharded checkpoint that unpickles its `.metadata`
    (DCP's one pickle; the tensors it reads with `weights_only=True`) with the classes of DCP's
    metadata allowed and nothing else: a checkpoint cannot run code when it is read."""
    import pickle

    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    allowed = {  # exact names only: a dotted name would reach the module's own imports (os.system)
        "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                                  "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if "." not in name:
                plain = module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)))
                if plain or name in allowed.get(module, ()):
                    return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")

    def check(found) -> None:
        """Only tensors (a byte entry would be unpickled by DCP with weights_only=False), stored in
        files of the dcp/ folder itself."""
        if type(found) is not Metadata or not isinstance(found.state_dict_metadata, dict):
            raise pickle.UnpicklingError("it is not DCP metadata")
        for key, entry in found.state_dict_metadata.items():
            if type(entry) is not TensorStorageMetadata:
                raise pickle.UnpicklingError(f"its entry {key!r} is not a tensor")
        for info in (found.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            if type(info) is not _StorageInfo or not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
                raise pickle.UnpicklingError("it names a data file outside its folder")

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            where = self._get_metadata_path(kwargs.get("rank")) if hasattr(self, "_get_metadata_path") else self.fs.concat_path(self.path, ".metadata")
            with self.fs.create_stream(where, "rb") as stream:  # (torch < 2.7 has no _get_metadata_path)
                found = Unpickler(stream).load()
            check(found)
            if getattr(found, "storage_meta", None) is None:
                found.storage_meta = StorageMeta()
            found.storage_meta.load_id = self.load_id
            return found

    return Reader(str(Path(checkpoint) / DCP_DIR))


def metadata(checkpoint: str | Path):
    """DCP's metadata of a sharded checkpoint: {key: TensorStorageMetadata}."""
    try:
        return dcp_reader(checkpoint).read_metadata().state_dict_metadata
    except Exception as error:  # a truncated, foreign or hostile .metadata: unpickling fails in many ways
        raise ValueError(f"{Path(checkpoint) / DCP_DIR / '.metadata'} is corrupted ({type(error).__name__}: {str(error)[:120]})") from None


def model_shapes(checkpoint: str | Path) -> dict[str, tuple[int, ...]]:
    """{weight name: shape} of a sharded checkpoint's model, from DCP's metadata alone."""
    saved = metadata(checkpoint)
    try:
        return {key[len("model."):]: tuple(int(n) for n in entry.size) for key, entry in saved.items() if key.startswith("model.")}
    except (TypeError, ValueError):
        raise ValueError(f"{Path(checkpoint) / DCP_DIR / '.metadata'} is corrupted (a tensor size that is not a shape)") from None


def read_header(file: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file ({name: {dtype, shape, data_offsets}}), checked
    against the file's size so that a truncated or corrupted file is caught before it is read."""
    size = file.stat().st_size

    def corrupted(why: str) -> ValueError:
        return ValueError(f"{file} is truncated or corrupted: {why}")

    if size < 8:
        raise corrupted(f"{size} bytes, too short for a safetensors header")
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8 or length > 100_000_000:
            raise corrupted(f"its header claims {length} bytes but the file has {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise corrupted("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupted("its header is not a table of tensors")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = 1
            for dim in shape:
                count *= int(dim)
            expected = count * DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise corrupted(f"the entry of {name!r} is malformed") from None
        if not (0 <= start <= end <= data_size) or end - start != expected:
            raise corrupted(f"tensor {name!r} lies outside the file or has the wrong byte size")
        spans.append((start, end, name))
    position = 0
    for start, end, name in sorted(spans):  # back to back, no gap, no overlap, up to the end
        if start != position:
            raise corrupted(f"tensor {name!r} starts at byte {start}, expected {position}")
        position = end
    if position != data_size:
        raise corrupted(f"its tensors cover {position} of {data_size} data bytes")
    return header


def tensor_table(checkpoint: str | Path) -> dict[str, tuple[Path, dict]]:
    """{tensor name: (file, header entry)} over every weight file of a checkpoint, all headers checked."""
    table = {}
    for file in weight_files(checkpoint):
        for name, entry in read_header(file).items():
            table[name] = (file, entry)
    return table


def expected_shapes(config: MoTConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of this config holds (tied embeddings stored once)."""
    import torch

    from .modeling import MoTLMHeadModel

    with torch.device("meta"):
        model = MoTLMHeadModel(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_tensors(shapes: dict[str, tuple[int, ...]], config: MoTConfig, where: str = "the checkpoint") -> None:
    """ValueError naming the first missing, unexpected or misshapen tensor against the config."""
    expected = expected_shapes(config)
    for name in sorted(expected):
        if name not in shapes and not (name == "lm_head.weight" and "transformer.wte.weight" in shapes):
            raise ValueError(f"{where} lacks the tensor {name} that its config needs")
    for name in sorted(shapes):
        if name not in expected and name != "lm_head.weight":
            raise ValueError(f"{where} has a tensor {name} that its config does not describe")
        if name in expected and tuple(shapes[name]) != expected[name]:
            raise ValueError(f"{where} has {name} of shape {tuple(shapes[name])}, its config needs {expected[name]}")


CHECKPOINTS = "checkpoints"  # a training run's checkpoints: RUN/checkpoints/step-NNNNNN/
STATE_JSON = "training_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a training run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_JSON).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a training run, or None if it has none."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the latest checkpoint of a training run directory."""
    path = Path(path)
    if (path / "config.json").is_file() or not (path / CHECKPOINTS).is_dir():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"the run directory {path} has no complete checkpoint yet")
    return latest


def checkpoint_to_read(path: str | Path) -> Path | None:
    """The checkpoint directory a command given `path` reads (for its reader's lock), or None when
    there is none: the command's own checks then say why."""
    try:
        return resolve_checkpoint(path)
    except (OSError, ValueError):
        return None


def checked_config(checkpoint: str | Path) -> MoTConfig:
    """The config of a checkpoint directory whose weight files were checked against it, headers
    only (no tensor is read): a missing, unexpected or misshapen tensor, or a damaged file, is a
    one-line error."""
    path = Path(checkpoint)
    config = load_config(path)
    table = tensor_table(path)
    check_tensors({name: tuple(entry["shape"]) for name, (_, entry) in table.items()}, config, where=str(path))
    return config


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            return name
    return None


def nonfinite_error(where, name: str) -> ValueError:
    return ValueError(f"{where}: tensor {name} holds NaN or infinite values; this checkpoint cannot be used (take an earlier one)")


def check_finite(checkpoint: str | Path) -> None:
    """Read the weight files of a checkpoint one tensor at a time (memory-mapped) and raise a
    one-line ValueError naming the first tensor that holds a NaN or an infinity."""
    from safetensors import safe_open

    for file in weight_files(checkpoint):
        with safe_open(file, "pt") as handle:
            bad = first_nonfinite((name, handle.get_tensor(name)) for name in handle.keys())
        if bad is not None:
            raise nonfinite_error(file, bad)


def load_checked(checkpoint: str | Path, model_class=None):
    """A model loaded from a checkpoint directory in float32 after every tensor was checked against
    its config (`checked_config`): a bad tensor is a one-line error instead of a silently
    re-initialised weight, and so is a weight holding NaN or infinite values."""
    if model_class is None:
        from .modeling import MoTLMHeadModel as model_class
    path = Path(checkpoint)
    checked_config(path)
    import torch
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the tensors were checked above: no "newly initialized" notes to fear
    try:
        model = model_class.from_pretrained(path, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    bad = first_nonfinite(model.state_dict().items())
    if bad is not None:
        raise nonfinite_error(path, bad)
    return model
