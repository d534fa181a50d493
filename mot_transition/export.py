"""Export to a native transformers architecture (docs/design.md §8.4): a "llama"-style checkpoint becomes a
directory that plain transformers loads, with no import of this package, and that serving engines
which know the architecture can serve.

    ours ("llama" block style)               Qwen3-MoE / Qwen3
    transformer.wte                      ->  model.embed_tokens (lm_head tied as ours is)
    h.i.ln_1, h.i.ln_2, ln_f             ->  input_layernorm, post_attention_layernorm, model.norm
    h.i.attn.c_attn (3d, d)              ->  self_attn.q_proj, k_proj, v_proj (its three row blocks)
    h.i.attn.c_proj, q_norm, k_norm      ->  self_attn.o_proj, q_norm, k_norm
    h.i.mlp.w1 (d, 2f) = [gate | up], w2 ->  mlp.gate_proj, mlp.up_proj, mlp.down_proj (dense blocks:
                                             `mlp_only_layers` of Qwen3-MoE)
    h.i.mlp.controller (d, E)            ->  mlp.gate.weight (E, d): the router. A Token Choice
                                             checkpoint's controller already holds controller_MoT / T
                                             (convert divides by the MoT temperature, design.md §9.1)
    h.i.mlp.lin1 (E, d, 2f), lin2        ->  mlp.experts: the installed transformers' own layout

The target model is built by the installed transformers, filled with the mapped tensors, and saved
by its own `save_pretrained`, which writes the experts in the layout its weight-conversion mapping
reads back (one tensor per expert and matrix on the Hub, as serving engines read it). Routing is
softmax over all experts, top k, weights not renormalised (`norm_topk_prob` as trained).
"""

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint_io import checkpoint_to_read, load_checked, load_config
from .config import MoTConfig
from .convert import COPIED_FILES
from .checks import check_writable_folder
from .destinations import check_destination, clean_after_killed_runs, staged
from .locks import reads, writes
from .jsonfiles import dumps, write_json

TARGETS = ("qwen3_moe", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportReport:
    """What the export did; saved as export_report.json beside the exported model."""

    source: str | None = None
    target: str = ""
    dtype: str = "float32"
    architecture: str = ""
    transformers_version: str = ""
    sparse_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    max_abs_logit_difference: float | None = None  # ours vs the exported model, float32, random prompts
    same_greedy_tokens: bool | None = None

    def to_json(self) -> str:
        return dumps(asdict(self), indent=2)


def check_exportable(config: MoTConfig, target: str, dropless: bool = False) -> None:
    """ValueError of one line, saying why and what to do, for a model that the target cannot
    represent exactly. `dropless`: accept a capacity factor (used in training only)."""
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)} or gguf")
    if config.block != "llama":
        raise ValueError(
            f"only the llama block style exports to {target}: this checkpoint is {config.block}-style (LayerNorm "
            "with bias, learned positions, two-matrix experts), which no native MoE architecture has; train with "
            "model.block=llama"
        )
    if not config.qk_norm:
        raise ValueError(f"{target} always normalises queries and keys and this model does not (qk_norm=false); train with model.qk_norm=true")
    if config.activation_function != "silu":
        raise ValueError(f"serving engines run {target} with SwiGLU (silu); this model's experts use {config.activation_function!r}")
    sparse = config.ffn_type != "dense" and bool(config.moe_layers)
    if target == "qwen3" and sparse:
        raise ValueError(f"qwen3 is dense and this model has {config.ffn_type} layers {config.moe_layers}; export a Token Choice model --to qwen3_moe")
    if target == "qwen3_moe":
        if not sparse:
            raise ValueError("this model has no expert layers; export it --to qwen3")
        if config.ffn_type == "mot":
            raise ValueError(
                "a Mixture of Tokens model mixes the tokens of different sequences, which no serving engine does; "
                "convert it to Token Choice first (mot-transition convert), then export"
            )
        if config.ffn_type == "expert_choice":
            raise ValueError("Expert Choice routing (experts pick tokens across a batch) has no native equivalent; convert or retrain as Token Choice")
        if config.router_bias_update_rate > 0:
            raise ValueError(
                "this model picks its experts with a learned selection bias (router_bias_update_rate="
                f"{config.router_bias_update_rate}), which Qwen3-MoE's routing has no place for; export is not possible"
            )
        if config.capacity_factor is not None and not dropless:
            raise ValueError(
                f"this model drops tokens past an expert's capacity in training (capacity_factor={config.capacity_factor}) "
                "and Qwen3-MoE never drops: the two agree at inference (ours is dropless there) but fine-tuning the "
                "export would differ; pass --dropless to export anyway"
            )


def target_config(config: MoTConfig, target: str):
    """The transformers config of the export target (Qwen3MoeConfig or Qwen3Config)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    dense_layers = [i for i in range(config.n_layer) if config.ffn_type_of_layer(i) == "dense"]
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.n_inner,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_head,
        head_dim=config.n_embd // config.n_head, hidden_act=config.activation_function,
        max_position_embeddings=config.n_positions, initializer_range=config.initializer_range,
        rms_norm_eps=config.layer_norm_epsilon, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, attention_bias=False,
        attention_dropout=config.attn_pdrop, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, architectures=["Qwen3MoeForCausalLM" if target == "qwen3_moe" else "Qwen3ForCausalLM"],
    )
    if target == "qwen3":
        return Qwen3Config(**common)
    return Qwen3MoeConfig(
        **common, num_experts=config.n_expert, num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.expert_size, norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1,
        mlp_only_layers=dense_layers, router_aux_loss_coef=config.router_aux_loss_coef,
    )


@writes("dst", option="the destination")  # one writer per destination, for the whole export
@reads(lambda a: checkpoint_to_read(a["src"]))  # read under a reader's lock: never replaced meanwhile
def export_checkpoint(
    src: str | Path, dst: str | Path, target: str = "qwen3_moe", force: bool = False, dropless: bool = False,
    verify: bool = True, dtype: str = "float32",
) -> ExportReport:
    """Export the checkpoint `src` (llama style) to `dst`, a directory that plain transformers loads
    as the `target` architecture, with the tokenizer; tensors in `dtype` (float32, bfloat16 or
    float16). With `verify`, the written directory is loaded back by transformers and must give our
    logits (max abs difference <= 1e-4, computed in float32, random prompts; for a half-precision
    export, against our model with its weights rounded the same way) and our greedy tokens, or
    nothing is written. Written in a staging directory beside `dst` and renamed into place; `dst` is
    replaced only with `force` and only if this toolkit wrote it."""
    import transformers

    from .checkpoint_io import resolve_checkpoint
    from .data.tokenizer import ready_for_generation

    src, dst = resolve_checkpoint(src), Path(dst)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = load_config(src)
    check_exportable(config, target, dropless)
    clean_after_killed_runs(dst)
    check_destination(src, dst, force)
    check_writable_folder(dst.parent, "the destination", shown=dst)
    model = load_checked(src).eval()
    if dtype != "float32":  # the reference of the check: our model with the export's rounded weights
        model = model.to(DTYPES[dtype]).float()
    native = to_native(model, target, dropless).to(DTYPES[dtype])
    report = ExportReport(
        source=str(src.resolve()), target=target, dtype=dtype, architecture=type(native).__name__,
        transformers_version=transformers.__version__,
        sparse_layers=[i for i in range(config.n_layer) if config.ffn_type_of_layer(i) != "dense"],
        dense_layers=[i for i in range(config.n_layer) if config.ffn_type_of_layer(i) == "dense"],
    )
    with staged(dst) as staging:
        native.save_pretrained(staging)
        del native
        for name in COPIED_FILES:
            if name != "generation_config.json" and (src / name).is_file():
                shutil.copy2(src / name, staging / name)
        if (staging / "tokenizer_config.json").is_file():
            ready_for_generation(staging, config.n_positions)
            _portable_tokenizer_class(staging / "tokenizer_config.json")
        if verify:
            report.max_abs_logit_difference, report.same_greedy_tokens = compare_with_export(model, staging)
            if report.max_abs_logit_difference > 1e-4 or not report.same_greedy_tokens:
                raise ValueError(
                    f"the exported model loaded back by transformers differs from ours (max abs logit difference "
                    f"{report.max_abs_logit_difference:.2e}, same greedy tokens: {report.same_greedy_tokens}); nothing was written"
                )
        report.files = sorted(path.name for path in staging.iterdir()) + ["export_report.json"]
        (staging / "export_report.json").write_text(report.to_json())
    return report


def _portable_tokenizer_class(path: Path) -> None:
    """Name the tokenizer class as every transformers release knows it: transformers 5 writes
    `TokenizersBackend`, which 4.x (still pinned by llama.cpp's GGUF converter, for one) cannot
    load; `PreTrainedTokenizerFast` is the same class in 5.x."""
    fields = json.loads(path.read_text())
    if fields.get("tokenizer_class") == "TokenizersBackend":
        fields["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json(path, fields, indent=2, ensure_ascii=False)


@torch.no_grad()
def compare_with_export(model, exported: str | Path, prompts: int = 4, length: int = 32, new_tokens: int = 8, seed: int = 0):
    """(max abs logit difference, same greedy tokens) between `model` and the directory `exported`
    loaded by transformers' Auto class, in float32, on random prompts."""
    from transformers import AutoModelForCausalLM

    native = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    model = model.float().eval()
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    new_tokens = min(new_tokens, config.n_positions // 2)
    length = max(1, min(length, config.n_positions - new_tokens))
    ids = torch.randint(0, config.vocab_size, (prompts, length), generator=generator)
    difference = (model(ids).logits - native(ids).logits).abs().max().item()
    greedy = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=config.pad_token_id or 0)
    same = all(
        torch.equal(model.generate(ids[i : i + 1], **greedy), native.generate(ids[i : i + 1], **greedy)) for i in range(prompts)
    )
    return difference, same


@torch.no_grad()
def to_native(model, target: str = "qwen3_moe", dropless: bool = False):
    """The transformers model (Qwen3MoeForCausalLM or Qwen3ForCausalLM) computing what `model`, a
    llama-style MoTLMHeadModel, computes; its tensors are copies, in the dtype of `model`."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    config = model.config
    check_exportable(config, target, dropless)
    native_config = target_config(config, target)
    with torch.device("meta"):
        native = (Qwen3MoeForCausalLM if target == "qwen3_moe" else Qwen3ForCausalLM)(native_config)
    ours = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    state = {"model.embed_tokens.weight": ours["transformer.wte.weight"], "model.norm.weight": ours["transformer.ln_f.weight"]}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = ours["lm_head.weight"]
    d = config.n_embd
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = ours[src + "attn.c_attn.weight"].split(d, dim=0)
        state.update({
            dst + "input_layernorm.weight": ours[src + "ln_1.weight"],
            dst + "post_attention_layernorm.weight": ours[src + "ln_2.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": ours[src + "attn.c_proj.weight"],
            dst + "self_attn.q_norm.weight": ours[src + "attn.q_norm.weight"],
            dst + "self_attn.k_norm.weight": ours[src + "attn.k_norm.weight"],
        })
        if config.ffn_type_of_layer(i) == "dense":
            gate, up = ours[src + "mlp.w1"].chunk(2, dim=1)  # (d, f) each
            state.update({
                dst + "mlp.gate_proj.weight": gate.T, dst + "mlp.up_proj.weight": up.T,
                dst + "mlp.down_proj.weight": ours[src + "mlp.w2"].T,
            })
        else:
            experts = native.model.layers[i].mlp.experts
            gate_up, down = _expert_layout(experts, ours[src + "mlp.lin1"], ours[src + "mlp.lin2"])
            state.update({
                dst + "mlp.gate.weight": ours[src + "mlp.controller"].T,
                dst + "mlp.experts.gate_up_proj": gate_up, dst + "mlp.experts.down_proj": down,
            })
    state = {name: tensor.contiguous().clone() for name, tensor in state.items()}
    missing, unexpected = native.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:  # a transformers release whose Qwen3 differs from what this mapping knows
        raise ValueError(
            f"the installed transformers' {type(native).__name__} has tensors this export does not know "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); please report it with your transformers version"
        )
    if config.tie_word_embeddings:
        native.tie_weights()
    with torch.device(model.device):  # its buffers (rotary frequencies) were built on the meta device: build them again
        native.model.rotary_emb = type(native.model.rotary_emb)(native_config)
    return native.eval()


def _expert_layout(experts, lin1: torch.Tensor, lin2: torch.Tensor):
    """Our lin1 (E, d, 2f) = [gate | up] and lin2 (E, f, d) in the layout of the installed
    transformers' experts module: transposed or not (`is_transposed`), gate and up concatenated or
    interleaved (`is_concatenated`), as its experts-implementation decorator declares them."""
    transposed = getattr(experts, "is_transposed", False)
    if not getattr(experts, "is_concatenated", True):  # [gate_0, up_0, gate_1, up_1, ...]
        gate, up = lin1.chunk(2, dim=-1)
        lin1 = torch.stack((gate, up), dim=-1).flatten(-2)
    gate_up, down = (lin1, lin2) if transposed else (lin1.transpose(1, 2), lin2.transpose(1, 2))
    if tuple(gate_up.shape) != tuple(experts.gate_up_proj.shape) or tuple(down.shape) != tuple(experts.down_proj.shape):
        raise ValueError(
            f"the installed transformers lays out experts as {tuple(experts.gate_up_proj.shape)} / "
            f"{tuple(experts.down_proj.shape)}, not as this export expects; please report it with your transformers version"
        )
    return gate_up, down
