"""Export a converted (Token Choice) llama-style checkpoint to GGUF, the file format of llama.cpp and
of what is built on it (llama-cpp-python, ollama, LM Studio), so that stock llama.cpp runs it with
exactly our routing. Needs the `gguf` package (`pip install 'mot-transition[gguf]'`).

Which llama.cpp architecture, and why (docs/serving.md has the long form): ours is Qwen3's block
(RMSNorm, rotary positions in Qwen's half-split layout, SwiGLU, per-head q/k RMSNorm) with dense
FFN layers at any positions and Token Choice layers routed by a softmax over all experts, top k,
the k weights used as they are (`norm_topk_prob=False`, or renormalised when True). llama.cpp's
`qwen3moe` has no dense layers and always renormalises; the architectures with leading dense
layers (glm4moe, dots1, deepseek2, ...) allow dense layers only before the first MoE layer. Its
`hy_v3` graph reads every one of our choices from the file: a layer is a MoE layer exactly when it
has a router tensor, the gating function (softmax) and renormalisation are metadata, and it uses
NEOX (half-split) rotary positions and per-head q/k norms. It always adds a shared expert to a
MoE layer's output; we write one whose matrices are all zero, which adds exactly 0
(silu(0 x) * (0 x) = 0, then 0 W = 0).

    ours                                   GGUF (hy_v3), numpy shape (out, in)
    transformer.wte                    ->  token_embd.weight (and the output head when tied)
    lm_head (untied only)              ->  output.weight
    h.i.ln_1, h.i.ln_2, ln_f           ->  blk.i.attn_norm, blk.i.ffn_norm, output_norm
    h.i.attn.c_attn rows q | k | v     ->  blk.i.attn_q, attn_k, attn_v (no permutation: NEOX rope)
    h.i.attn.c_proj, q_norm, k_norm    ->  blk.i.attn_output, attn_q_norm, attn_k_norm
    h.i.mlp.w1 (d, 2f) = [gate | up]   ->  blk.i.ffn_gate, ffn_up (f, d); w2 -> ffn_down (d, f)
    h.i.mlp.controller (d, E)          ->  blk.i.ffn_gate_inp (E, d), kept in float32
    h.i.mlp.lin1 (E, d, 2f), lin2      ->  blk.i.ffn_gate_exps, ffn_up_exps (E, f, d), ffn_down_exps (E, d, f)
    (none)                             ->  blk.i.ffn_{gate,up,down}_shexp: zeros, width SHARED_WIDTH

Output types: f32, f16, bf16, q8_0 for the matrices (norms, the router and 1-D tensors stay f32,
as llama.cpp's own converter keeps them; a matrix whose rows are not a multiple of 32 cannot be
q8_0 and is written f16, and the report says which). The tokenizer goes with it (byte-level BPE,
GPT-2 pre-tokenizer), refused in one line when llama.cpp would tokenise differently.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint_io import checkpoint_to_read, load_checked
from .config import MoTConfig
from .jsonfiles import dumps
from .locks import reads, writes

ARCH = "hy_v3"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
SHARED_WIDTH = 32  # the zero shared expert's width: any; 32 keeps it one q8_0 block
MARK = "mot_transition.source"  # written in every file we export: --force replaces only those
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@dataclass
class GGUFReport:
    source: str | None = None
    outtype: str = "f16"
    architecture: str = ARCH
    gguf_version: str = ""
    sparse_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    f16_instead_of_q8_0: list[str] = field(default_factory=list)  # rows not a multiple of 32

    def to_json(self) -> str:
        return dumps(asdict(self), indent=2)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("exporting to GGUF needs the gguf package: pip install 'mot-transition[gguf]'") from None
    return gguf


def check_gguf_exportable(config: MoTConfig, dropless: bool = False) -> None:
    """A one-line ValueError for a model llama.cpp's hy_v3 cannot run exactly as we do."""
    from .export import check_exportable

    if config.ffn_type == "dense" or not config.moe_layers:
        raise ValueError("this model has no expert layers: export it --to qwen3 and convert that with llama.cpp's own "
                         "convert_hf_to_gguf.py (a dense Qwen3 is what llama.cpp's qwen3 runs)")
    check_exportable(config, "qwen3_moe", dropless)  # the llama block, q/k norms, SwiGLU, Token Choice, dropless


def check_gguf_tokenizer(folder: Path) -> dict:
    """The checkpoint's tokenizer.json, when llama.cpp's "gpt-2" pre-tokenizer and BPE tokenise
    exactly as it does; a one-line ValueError naming what differs otherwise."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no tokenizer.json: a GGUF file carries its tokenizer; save one beside the checkpoint")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON") from None
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"its model is {model.get('type')!r}, not BPE")
    if model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("its BPE uses byte_fallback, dropout or subword affixes")
    if spec.get("normalizer") is not None:
        problems.append("it has a normalizer (llama.cpp applies none)")
    byte_level = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    if not byte_level:
        problems.append("its pre-tokenizer is not ByteLevel with the GPT-2 pattern and no prefix space")
    if problems:
        raise ValueError(f"{path}: llama.cpp would tokenise differently: {problems[0]}")
    return spec


def _matrix_type(gguf, name: str, array: np.ndarray, outtype: str, keep_f32: tuple[str, ...] = ()):
    """(data, raw_dtype or None) of one tensor in the output type, and whether q8_0 fell back to f16."""
    Q = gguf.GGMLQuantizationType
    if (array.ndim == 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight") or outtype == "f32"
            or any(part in name for part in keep_f32)):
        return array.astype(np.float32), None, False
    if outtype == "f16" or (outtype == "q8_0" and array.shape[-1] % 32):
        return array.astype(np.float16), None, outtype == "q8_0"
    kind = Q.BF16 if outtype == "bf16" else Q.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), kind), kind, False


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF file, float32 numpy, by its GGUF name (the table in the module doc)."""
    config = model.config
    ours = {name: t.detach().to(torch.float32).cpu().numpy() for name, t in model.state_dict().items()}
    d = config.n_embd
    out = {"token_embd.weight": ours["transformer.wte.weight"], "output_norm.weight": ours["transformer.ln_f.weight"]}
    if not config.tie_word_embeddings:
        out["output.weight"] = ours["lm_head.weight"]
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}.", f"blk.{i}."
        qkv = ours[src + "attn.c_attn.weight"]
        out.update({
            dst + "attn_norm.weight": ours[src + "ln_1.weight"], dst + "ffn_norm.weight": ours[src + "ln_2.weight"],
            dst + "attn_q.weight": qkv[:d], dst + "attn_k.weight": qkv[d:2 * d], dst + "attn_v.weight": qkv[2 * d:],
            dst + "attn_output.weight": ours[src + "attn.c_proj.weight"],
            dst + "attn_q_norm.weight": ours[src + "attn.q_norm.weight"], dst + "attn_k_norm.weight": ours[src + "attn.k_norm.weight"],
        })
        if config.ffn_type_of_layer(i) == "dense":
            w1 = ours[src + "mlp.w1"]
            f = w1.shape[1] // 2
            out.update({dst + "ffn_gate.weight": w1[:, :f].T, dst + "ffn_up.weight": w1[:, f:].T,
                        dst + "ffn_down.weight": ours[src + "mlp.w2"].T})
        else:
            lin1, lin2 = ours[src + "mlp.lin1"], ours[src + "mlp.lin2"]
            f = lin1.shape[2] // 2
            out.update({
                dst + "ffn_gate_inp.weight": ours[src + "mlp.controller"].T,
                dst + "ffn_gate_exps.weight": lin1[:, :, :f].transpose(0, 2, 1), dst + "ffn_up_exps.weight": lin1[:, :, f:].transpose(0, 2, 1),
                dst + "ffn_down_exps.weight": lin2.transpose(0, 2, 1),
                dst + "ffn_gate_shexp.weight": np.zeros((SHARED_WIDTH, d), np.float32),
                dst + "ffn_up_shexp.weight": np.zeros((SHARED_WIDTH, d), np.float32),
                dst + "ffn_down_shexp.weight": np.zeros((d, SHARED_WIDTH), np.float32),
            })
    return {name: np.ascontiguousarray(array) for name, array in out.items()}


def write_gguf(model, tokenizer: dict, path: Path, outtype: str = "f16", source: str | None = None,
               keep_f32: tuple[str, ...] = ()) -> GGUFReport:
    """Write `model` (a llama-style Token Choice MoTLMHeadModel) and `tokenizer` (tokenizer.json,
    checked) to the GGUF file `path`, as is (the caller makes it atomic). `keep_f32`: parts of
    tensor names kept in float32 whatever `outtype` (for measuring what each tensor's rounding
    costs, scripts/llama_cpp_rounding.py; not an output type llama.cpp's converter makes)."""
    gguf = _gguf()
    config = model.config
    check_gguf_exportable(config, dropless=True)
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    from importlib.metadata import version

    report = GGUFReport(source=source, outtype=outtype, gguf_version=version("gguf"),
                        sparse_layers=[i for i in range(config.n_layer) if config.ffn_type_of_layer(i) != "dense"],
                        dense_layers=[i for i in range(config.n_layer) if config.ffn_type_of_layer(i) == "dense"])
    w = gguf.GGUFWriter(str(path), ARCH)
    head = config.n_embd // config.n_head
    w.add_name(Path(source).name if source else "mot-transition model")
    w.add_string(MARK, source or "")
    w.add_block_count(config.n_layer)
    w.add_context_length(config.n_positions)
    w.add_embedding_length(config.n_embd)
    w.add_feed_forward_length(config.n_inner)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_head)
    w.add_key_length(head)
    w.add_value_length(head)
    w.add_rope_dimension_count(head)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.layer_norm_epsilon))
    w.add_expert_count(config.n_expert)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_feed_forward_length(config.expert_size)
    w.add_expert_shared_feed_forward_length(SHARED_WIDTH)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_expert_weights_norm(bool(config.norm_topk_prob))
    w.add_expert_weights_scale(1.0)
    _add_tokenizer(w, tokenizer, config)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(file_type)
    for name, array in gguf_tensors(model).items():
        data, raw, fell_back = _matrix_type(gguf, name, array, outtype, keep_f32)
        if fell_back:
            report.f16_instead_of_q8_0.append(name)
        w.add_tensor(name, data, raw_dtype=raw)
        report.tensors += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    report.bytes = Path(path).stat().st_size
    return report


def _add_tokenizer(w, spec: dict, config: MoTConfig) -> None:
    """tokenizer.json's BPE as llama.cpp's "gpt2" model with the "gpt-2" pre-tokenizer."""
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab.setdefault(content, token["id"])
    size = config.vocab_size
    if max(vocab.values()) >= size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {size} embeddings")
    tokens, types = [f"[PAD{i}]" for i in range(size)], [5] * size  # 5: unused (the model's padding rows)
    for content, i in vocab.items():
        tokens[i] = content
        types[i] = 3 if content in added and added[content].get("special") else (4 if content in added else 1)
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for setter, token_id in ((w.add_bos_token_id, config.bos_token_id), (w.add_eos_token_id, config.eos_token_id),
                             (w.add_pad_token_id, config.pad_token_id)):
        if token_id is not None:
            setter(int(token_id))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def is_our_gguf(path: Path) -> bool:
    """A GGUF file this toolkit wrote (it carries MARK)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        return MARK in _gguf().GGUFReader(str(path)).fields
    except (OSError, ValueError, IndexError):
        return False


def _destination(dst: str | Path) -> Path:
    """The GGUF file to lock: its folder must exist (the lock would make it)."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"the folder of {dst} does not exist")
    return dst


@writes(lambda a: _destination(a["dst"]))  # one writer per GGUF file, for the whole export
@reads(lambda a: checkpoint_to_read(a["src"]))  # read under a reader's lock: never replaced meanwhile
def export_gguf(src: str | Path, dst: str | Path, outtype: str = "f16", force: bool = False, dropless: bool = False) -> GGUFReport:
    """Export the checkpoint `src` to the GGUF file `dst` (written beside it and renamed into place:
    never half a file). An existing `dst` is replaced only with `force`, and only when this toolkit
    wrote it. The report is also saved as `dst` + `.json`."""
    from .checkpoint_io import load_config, resolve_checkpoint

    src, dst = resolve_checkpoint(src), Path(dst)
    if dst.suffix != ".gguf":
        raise ValueError(f"the GGUF destination must be a file name ending in .gguf, got {dst}")
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if dst.exists():
        if not force:
            raise FileExistsError(f"{dst} already exists; pass --force to replace it")
        if not dst.is_file() or not is_our_gguf(dst):
            raise FileExistsError(f"{dst} is not a GGUF file this toolkit wrote, and --force replaces only those; choose another destination")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"the folder of {dst} does not exist")
    _gguf()
    config = load_config(src)
    check_gguf_exportable(config, dropless)
    tokenizer = check_gguf_tokenizer(src)
    model = load_checked(src).float().eval()
    staging = dst.with_name(f".{dst.name}.writing-{os.getpid()}")
    try:
        report = write_gguf(model, tokenizer, staging, outtype, str(src.resolve()))
        with open(staging, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(staging, dst)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    from .jsonfiles import write_json

    write_json(dst.with_name(dst.name + ".json"), json.loads(report.to_json()))
    return report


__all__ = ["ARCH", "OUTTYPES", "GGUFReport", "check_gguf_exportable", "check_gguf_tokenizer", "gguf_tensors", "write_gguf",
           "export_gguf", "is_our_gguf"]
