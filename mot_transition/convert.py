"""Conversion of a trained Mixture of Tokens checkpoint into a Token Choice checkpoint (docs/design.md §9).

    MoT                         Token Choice
    lin1, lin2              ->  lin1, lin2 (lin2 times a fitted scale with calibration)
    controller              ->  controller / T, so that router logits equal MoT logits
    every other tensor      ->  the same tensor
    ffn_type="mot", g       ->  ffn_type="token_choice", k = max(1, round(E / g)) by default

The mapping works on state dicts (`mot_to_token_choice`) and on checkpoint directories
(`convert_checkpoint`), which reads and writes tensor by tensor: unchanged tensors are copied as
raw bytes, so peak memory stays near the size of the largest tensor, whatever the model's size.
"""

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint_io import check_finite, check_tensors, checkpoint_to_read, expected_shapes, load_config, read_header, tensor_table, weight_files  # noqa: F401  (expected_shapes: also this module's API)
from .config import MoTConfig
from .counts import parameter_counts
from .data.tokenizer import ready_for_generation
from .checks import check_writable_folder
from .destinations import check_destination, clean_after_killed_runs, staged
from .locks import reads, writes
from .jsonfiles import dumps, read_json_object
from .options import check_options

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "generation_config.json")


@dataclass
class ConversionReport:
    """What the conversion did, tensor by tensor; saved as conversion_report.json."""

    source: str | None = None
    tensors: list[dict] = field(default_factory=list)  # {"name", "action", "detail"}
    config_changes: dict[str, list] = field(default_factory=dict)  # field -> [before, after]
    parameters_before: dict[str, int] = field(default_factory=dict)
    parameters_after: dict[str, int] = field(default_factory=dict)
    calibration: dict | None = None  # {"batches", "scales", "mse_before", "mse_after"} per MoE layer
    recipe: dict | None = None  # the MoT run's recipe, when the source is a training checkpoint
    files: list[str] = field(default_factory=list)  # what the conversion wrote: what --force may replace

    def to_json(self) -> str:
        return dumps(asdict(self), indent=2)


def default_top_k(config: MoTConfig) -> int:
    """k that keeps FLOPs per token: a MoT token costs E/g experts' worth."""
    return max(1, round(config.n_expert / config.group_size))


def token_choice_config(config: MoTConfig, num_experts_per_tok: int | None = None, capacity_factor: float | None = None) -> MoTConfig:
    """The Token Choice config of a MoT config. Raises ValueError for a top-k out of range."""
    if config.ffn_type != "mot":
        raise ValueError(f"only a MoT checkpoint can be converted, this one has ffn_type={config.ffn_type!r}")
    if not config.moe_layers:
        raise ValueError("a MoT model with no MoT layer (moe_layers is empty) has nothing to convert: every block is dense")
    check_options(top_k=num_experts_per_tok, capacity_factor=capacity_factor)
    k = default_top_k(config) if num_experts_per_tok is None else num_experts_per_tok
    if k > config.n_expert:
        raise ValueError(f"--top-k must be between 1 and the number of experts ({config.n_expert}), got {k}")
    fields = config.to_dict()
    fields.update(ffn_type="token_choice", num_experts_per_tok=k, capacity_factor=capacity_factor)
    for key in ("model_type", "transformers_version"):
        fields.pop(key, None)
    return MoTConfig(**fields)


def moe_layer_of(name: str) -> int | None:
    """The block index of an expert tensor name `...h.{i}.mlp.{controller|lin1|lin2}`, else None."""
    parts = name.split(".")
    if len(parts) >= 4 and parts[-2] == "mlp" and parts[-1] in ("controller", "lin1", "lin2") and parts[-3].isdigit():
        return int(parts[-3])
    return None


def changes(name: str, config: MoTConfig, scales: dict[int, float]) -> bool:
    """Whether the conversion changes this tensor (the controller unless T = 1; lin2 when scaled)."""
    layer, kind = moe_layer_of(name), name.rsplit(".", 1)[-1]
    return layer is not None and ((kind == "controller" and config.mot_temperature != 1.0) or (kind == "lin2" and layer in scales))


def transform(name: str, tensor: torch.Tensor, config: MoTConfig, scales: dict[int, float]) -> tuple[torch.Tensor | None, str]:
    """The Token Choice tensor for one MoT tensor: (new tensor, or None when carried unchanged; detail)."""
    layer, kind = moe_layer_of(name), name.rsplit(".", 1)[-1]
    if layer is not None and kind == "controller":
        if config.mot_temperature == 1.0:
            return None, "router = controller / T with T = 1: unchanged"
        rounded = "" if tensor.dtype in (torch.float32, torch.float64) else f", rounded to {str(tensor.dtype).removeprefix('torch.')}"
        return (tensor.double() / config.mot_temperature).to(tensor.dtype), f"router = controller / T, T = {config.mot_temperature:g}{rounded}"
    if layer is not None and kind == "lin2" and layer in scales:
        return tensor * scales[layer], f"lin2 * {scales[layer]:.4f} (calibration scale)"
    return None, "unchanged"


def mot_to_token_choice(
    state_dict: dict[str, torch.Tensor],
    config: MoTConfig,
    num_experts_per_tok: int | None = None,
    capacity_factor: float | None = None,
    calibration: list[torch.Tensor] | dict[int, float] | None = None,
) -> tuple[dict[str, torch.Tensor], MoTConfig, ConversionReport]:
    """Map a MoT state dict to a Token Choice one (no model is built without calibration).

    `calibration`: None; calibration batches of input ids (B, S), B a multiple of group_size,
    on which one scale per MoE layer is fitted (`fit_calibration_scales`); or such scales.
    Unchanged tensors are the same tensor objects as the input's.
    """
    tc_config = token_choice_config(config, num_experts_per_tok, capacity_factor)
    check_tensors({k: tuple(v.shape) for k, v in state_dict.items()}, config)
    report = new_report(config, tc_config)
    scales = {}
    if isinstance(calibration, dict):
        scales = {int(k): float(v) for k, v in calibration.items()}
        report.calibration = {"scales": scales}
    elif calibration is not None:
        report.calibration = fit_calibration_scales(state_dict, config, tc_config, calibration)
        scales = report.calibration["scales"]
    converted = {}
    for name, tensor in state_dict.items():
        new, detail = transform(name, tensor, config, scales)
        converted[name] = tensor if new is None else new
        report.tensors.append({"name": name, "action": "carried" if new is None else "transformed", "detail": detail})
    return converted, tc_config, report


def new_report(config: MoTConfig, tc_config: MoTConfig, source: str | None = None) -> ConversionReport:
    before, after = config.to_dict(), tc_config.to_dict()
    changes = {k: [before.get(k), after[k]] for k in after if before.get(k) != after[k] and k != "transformers_version"}
    counts_before, counts_after = parameter_counts(config), parameter_counts(tc_config)
    return ConversionReport(
        source=source,
        config_changes=changes,
        parameters_before={k: counts_before[k] for k in ("total", "active_per_token")},
        parameters_after={k: counts_after[k] for k in ("total", "active_per_token")},
    )


@torch.no_grad()
def fit_calibration_scales(state_dict, config: MoTConfig, tc_config: MoTConfig, batches: list[torch.Tensor]) -> dict:
    """One least-squares scale per MoE layer: s = <y_mot, y_tc> / <y_tc, y_tc> over the layer's
    inputs on the calibration batches (MoT grouped inference, Token Choice dropless). Returns
    {"batches", "scales", "mse_before", "mse_after"}, keyed by block index. Only running sums are
    kept, so memory does not grow with the number of batches."""
    from .layers import TokenChoice
    from .modeling import MoTLMHeadModel

    if not batches:
        raise ValueError("calibration needs at least one batch")
    model = MoTLMHeadModel(config).eval()
    model.load_state_dict(state_dict, strict=False)
    sums = {i: torch.zeros(4, dtype=torch.float64) for i in config.moe_layers}  # <m,t>, <t,t>, <m,m>, count
    routers = {}
    for i in config.moe_layers:
        mot_layer = model.transformer.h[i].mlp
        router = routers[i] = TokenChoice(tc_config).eval()
        router.lin1.copy_(mot_layer.lin1)
        router.lin2.copy_(mot_layer.lin2)
        router.controller.copy_((mot_layer.controller.double() / config.mot_temperature).to(mot_layer.controller.dtype))

    def accumulate(i, args, output):
        y_mot, y_tc = output[0].double(), routers[i](args[0])[0].double()
        sums[i] += torch.stack([(y_mot * y_tc).sum(), (y_tc * y_tc).sum(), (y_mot * y_mot).sum(), torch.tensor(float(y_mot.numel()))])

    hooks = [
        model.transformer.h[i].mlp.register_forward_hook(lambda module, args, output, i=i: accumulate(i, args, output))
        for i in config.moe_layers
    ]
    try:
        for ids in batches:
            if ids.shape[0] % config.group_size:
                raise ValueError(f"calibration batches need a multiple of group_size={config.group_size} rows, got {ids.shape[0]}")
            model(ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    scales, mse_before, mse_after = {}, {}, {}
    for i, (mt, tt, mm, count) in ((i, s.tolist()) for i, s in sums.items()):
        scale = mt / tt if tt > 0 else 1.0
        scales[i] = scale
        mse_before[i] = (mm - 2 * mt + tt) / count  # |m - t|^2
        mse_after[i] = (mm - 2 * scale * mt + scale * scale * tt) / count  # |m - s t|^2
    return {"batches": len(batches), "scales": scales, "mse_before": mse_before, "mse_after": mse_after}


@writes("dst", option="the destination")  # one writer per destination, for the whole conversion
@reads(lambda a: checkpoint_to_read(a["src"]))  # read under a reader's lock: never replaced meanwhile
def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    num_experts_per_tok: int | None = None,
    capacity_factor: float | None = None,
    calibration: list[torch.Tensor] | None = None,
    force: bool = False,
) -> ConversionReport:
    """Convert the MoT checkpoint directory `src` into a Token Choice checkpoint at `dst`.

    Everything is validated before anything is written; the output is assembled in a temporary
    directory beside `dst` and renamed into place; `src` is only read. An existing `dst` is
    refused unless `force` (and `dst` may never be `src` or lie inside or around it).
    """
    src, dst = Path(src), Path(dst)
    config = load_config(src)
    tc_config = token_choice_config(config, num_experts_per_tok, capacity_factor)
    table = tensor_table(src)  # every header checked against its file's size
    check_tensors({name: tuple(entry["shape"]) for name, (_, entry) in table.items()}, config, where=str(src))
    check_finite(src)
    clean_after_killed_runs(dst)
    check_destination(src, dst, force)
    check_writable_folder(dst.parent, "the destination", shown=dst)

    report = new_report(config, tc_config, source=str(src.resolve()))
    if (src / "training_state.json").is_file():  # transition tuning continues on the MoT run's data
        recipe = read_json_object(src / "training_state.json").get("recipe")
        report.recipe = recipe if isinstance(recipe, dict) else None
    scales = {}
    if calibration is not None:
        state_dict = {}
        for file in weight_files(src):
            with safe_open(file, "pt") as handle:
                state_dict.update({name: handle.get_tensor(name) for name in handle.keys()})
        report.calibration = fit_calibration_scales(state_dict, config, tc_config, calibration)
        scales = report.calibration["scales"]
        del state_dict

    with staged(dst) as staging:
        for file in weight_files(src):
            write_converted(file, staging / file.name, config, scales, report)
        index = src / "model.safetensors.index.json"
        if index.is_file():
            shutil.copy2(index, staging / index.name)
        tc_config.save_pretrained(staging)
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
        ready_for_generation(staging, tc_config.n_positions)  # also for checkpoints saved before tokenizers were
        report.files = sorted([path.name for path in staging.iterdir()] + ["conversion_report.json"])
        (staging / "conversion_report.json").write_text(report.to_json())
    return report


def write_converted(src_file: Path, dst_file: Path, config: MoTConfig, scales: dict[int, float], report: ConversionReport) -> None:
    """Stream one safetensors file: the header is copied (shapes and dtypes do not change), the
    unchanged tensors as raw bytes in chunks, the transformed ones one tensor at a time."""
    header = read_header(src_file)
    with open(src_file, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        raw_header = handle.read(header_length)
    data_start = 8 + header_length
    with safe_open(src_file, "pt") as tensors, open(src_file, "rb") as source, open(dst_file, "wb") as out:
        out.write(header_length.to_bytes(8, "little"))
        out.write(raw_header)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = entry["data_offsets"]
            tensor = tensors.get_tensor(name) if changes(name, config, scales) else None  # read only what changes
            new, detail = transform(name, tensor, config, scales)
            if new is None:
                source.seek(data_start + start)
                copy_bytes(source, out, end - start)
            else:
                out.write(new.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            report.tensors.append({"name": name, "action": "carried" if new is None else "transformed", "detail": detail})
        out.flush()
        os.fsync(out.fileno())


def copy_bytes(source, out, count: int, chunk: int = 64 << 20) -> None:
    """Copy `count` bytes from `source`'s position to `out`'s: in the kernel (copy_file_range, as
    shutil.copyfile does) where the system offers it, else through a buffer."""
    out.flush()
    src_at, out_at = source.tell(), out.tell()
    copied = 0
    if hasattr(os, "copy_file_range"):
        try:
            while copied < count:
                n = os.copy_file_range(source.fileno(), out.fileno(), min(chunk, count - copied), src_at + copied, out_at + copied)
                if n == 0:
                    raise ValueError(f"{source.name} ended early: truncated file")
                copied += n
        except OSError:  # not supported between these files: fall back to reading and writing
            pass
    source.seek(src_at + copied)
    out.seek(out_at + copied)
    while copied < count:
        data = source.read(min(chunk, count - copied))
        if not data:
            raise ValueError(f"{source.name} ended early: truncated file")
        out.write(data)
        copied += len(data)


@torch.no_grad()
def convert_model(model, num_experts_per_tok: int | None = None, capacity_factor: float | None = None,
                  calibration: list[torch.Tensor] | None = None):
    """In-memory conversion of a MoTLMHeadModel: a new Token Choice model sharing no storage with
    the old one, plus the report. Used by the in-run switch (`switch_at_step`) and by `study`,
    which measures the switch's spike (with `calibration` batches: the fitted scales too)."""
    from .modeling import MoTLMHeadModel

    state, tc_config, report = mot_to_token_choice(model.state_dict(), model.config, num_experts_per_tok, capacity_factor, calibration)
    converted = MoTLMHeadModel(tc_config).to(next(model.parameters()).device)
    converted.load_state_dict(state, strict=False)
    converted.train(model.training)
    return converted, report
