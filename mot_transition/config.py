"""MoTConfig: one config for dense, Mixture of Tokens, Token Choice and Expert Choice models.

Field names follow the Mixture-of-Tokens port to transformers (GPT-2 style: `n_embd`, `n_layer`,
...), with the usual aliases (`hidden_size`, `num_hidden_layers`, ...). See SPEC.md section 2.

Two block styles (SPEC 5): `block="gpt2"` (LayerNorm with bias, learned positions, two-matrix
MLPs and experts) and `block="llama"` (RMSNorm, rotary positions, no biases, SwiGLU in the dense
MLP and in every expert, per-head RMSNorm of queries and keys).
"""

import math

from transformers import PreTrainedConfig

FFN_TYPES = ("dense", "mot", "token_choice", "expert_choice")
EXPERT_FFN_TYPES = ("mot", "token_choice", "expert_choice")
GROUPING_FFN_TYPES = ("mot", "expert_choice")  # group g batch rows at the same position (SPEC 1.1, 1.3)
BLOCK_STYLES = ("gpt2", "llama")


class MoTConfig(PreTrainedConfig):
    model_type = "mot"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "num_local_experts": "n_expert",
        "intermediate_size": "n_inner",
    }

    # transformer trunk: pre-norm, "gpt2" or "llama" style
    block: str = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # dense FFN width; None = 4 * n_embd ("gpt2"), 8/3 * n_embd ("llama", SwiGLU)
    activation_function: str | None = None  # None = "relu" ("gpt2"), "silu" ("llama": the gate of SwiGLU)
    rope_theta: float = 10000.0  # rotary positions ("llama")
    qk_norm: bool | None = None  # per-head RMSNorm of queries and keys; None = on for "llama", off for "gpt2"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    # feed-forward layers
    ffn_type: str = "mot"
    moe_layers: list[int] | None = None  # None = the second half of the blocks
    n_expert: int = 32
    group_size: int = 32
    expert_size: int | None = None  # None = flop-matched: 4 * n_embd * group_size / n_expert
    mot_temperature: float = 1.0
    emit_softmax_over_experts: bool = False
    use_discrete_routing: bool = False
    num_experts_per_tok: int = 1
    capacity_factor: float | None = None  # None = dropless
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_values()  # before anything is derived from them
        llama = self.block == "llama"
        for name, value in style_defaults(self.block).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.n_inner is None:
            self.n_inner = _multiple_of_8(8 * self.n_embd / 3) if llama else 4 * self.n_embd
        if self.moe_layers is None:
            self.moe_layers = list(range(self.n_layer // 2, self.n_layer))
        else:
            self.moe_layers = sorted(set(self.moe_layers))
        if self.expert_size is None and self.ffn_type in EXPERT_FFN_TYPES and self.group_size >= 1 and self.n_expert >= 1:
            self.expert_size = self.flop_matched_expert_size()
        self.check()

    @property
    def gated(self) -> bool:
        """Whether the dense MLP and the experts are SwiGLU (three matrices, "llama") rather than
        two-matrix (`act(x W1) W2`, "gpt2")."""
        return self.block == "llama"

    def flop_matched_expert_size(self) -> int:
        """Expert width whose MoT FLOPs per token equal a dense FFN of width 4d (SPEC 1.1); with
        SwiGLU experts, of a SwiGLU FFN of width 8d/3 (the same FLOPs: three matrices instead of two),
        rounded to a multiple of 8 (SPEC 5)."""
        formula, width = "4*n_embd*group_size/n_expert", 4 * self.n_embd * self.group_size / self.n_expert
        if self.gated:
            formula, width = "8*n_embd*group_size/(3*n_expert)", width * 2 / 3
        if width < 1:
            raise ValueError(
                f"flop-matched expert_size {formula} is below 1 for n_embd={self.n_embd}, "
                f"group_size={self.group_size}, n_expert={self.n_expert}; set expert_size explicitly"
            )
        return _multiple_of_8(width) if self.gated else int(width)

    def _check_values(self) -> None:
        """Each field alone: its type and range (finite numbers only). ValueError naming the field."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_expert", "group_size", "num_experts_per_tok"):
            _need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("n_inner", "expert_size"):
            value = getattr(self, name)
            _need(value is None or (_is_int(value) and value >= 1), f"{name} must be a positive integer or None, got {value!r}")
        moe_layers = self.moe_layers
        _need(
            moe_layers is None or (isinstance(moe_layers, (list, tuple)) and all(_is_int(i) for i in moe_layers)),
            f"moe_layers must be a list of block indices, got {moe_layers!r}",
        )
        positive = ("layer_norm_epsilon", "rope_theta", "mot_temperature")
        at_least_zero = ("initializer_range", "router_aux_loss_coef", "router_z_loss_coef")
        for name in positive + at_least_zero:
            value, what = getattr(self, name), "positive number" if name in positive else "number >= 0"
            _need(_is_number(value) and (value > 0 if name in positive else value >= 0), f"{name} must be a finite {what}, got {value!r}")
        _need(
            self.capacity_factor is None or (_is_number(self.capacity_factor) and self.capacity_factor > 0),
            f"capacity_factor must be a finite positive number or None, got {self.capacity_factor!r}",
        )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            _need(_is_number(getattr(self, name)) and 0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    def check(self) -> None:
        """Raise a ValueError naming the field for any value that cannot work."""
        need = _need
        self._check_values()
        need(self.block in BLOCK_STYLES, f"block must be one of {', '.join(BLOCK_STYLES)}, got {self.block!r}")
        need(self.ffn_type in FFN_TYPES, f"ffn_type must be one of {', '.join(FFN_TYPES)}, got {self.ffn_type!r}")
        need(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        need(
            self.block != "llama" or (self.n_embd // self.n_head) % 2 == 0,
            f"rotary positions turn pairs of dimensions: the head size n_embd / n_head = {self.n_embd // self.n_head} must be even",
        )
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layer]
        need(not bad, f"moe_layers index {bad[0] if bad else ''} is out of range for n_layer={self.n_layer} (valid: 0..{self.n_layer - 1})")
        need(
            self.num_experts_per_tok <= self.n_expert,
            f"num_experts_per_tok must be between 1 and n_expert={self.n_expert}, got {self.num_experts_per_tok}",
        )
        from transformers.activations import ACT2FN

        need(self.activation_function in ACT2FN, f"activation_function {self.activation_function!r} is unknown; try 'relu' or 'gelu'")

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' save, plus `auto_map` and the generated configuration_mot.py and
        modeling_mot.py beside config.json (remote_code.py), so that transformers loads the
        checkpoint without this package (`trust_remote_code=True`)."""
        remote_code, files = package_module("remote_code"), None
        if remote_code is not None:  # else this class runs as remote code: transformers copies its files itself
            try:
                files = remote_code.generated_sources()
            except ValueError as error:  # never fail a save (a training checkpoint) for want of these files
                import warnings

                warnings.warn(f"saving without the code that loads this checkpoint without mot-transition: {error}")
            else:
                self.auto_map = {**(getattr(self, "auto_map", None) or {}), **remote_code.AUTO_MAP}
        result = super().save_pretrained(save_directory, push_to_hub, **kwargs)
        if files is not None:
            remote_code.write_remote_code(save_directory, files)
        return result

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing to do: every save writes `auto_map` and the generated code (see save_pretrained).
        (Loaded as remote code, transformers' own way is kept.)"""
        if package_module("remote_code") is None:
            return super().register_for_auto_class(auto_class)

    def ffn_type_of_layer(self, layer_idx: int) -> str:
        """The feed-forward kind of block `layer_idx`: `ffn_type` for the MoE layers, dense otherwise."""
        return self.ffn_type if layer_idx in self.moe_layers else "dense"

    def mixes_batch_rows(self) -> bool:
        """Whether a row's output depends on the other rows of its batch: MoT or Expert Choice layers
        with group_size > 1."""
        return self.ffn_type in GROUPING_FFN_TYPES and self.group_size > 1 and bool(self.moe_layers)


def style_defaults(block: str) -> dict:
    """What a None `activation_function` and `qk_norm` mean for a block style."""
    llama = block == "llama"
    return {"activation_function": "silu" if llama else "relu", "qk_norm": llama}


def package_module(name: str):
    """The module `mot_transition.NAME`, or None where this file runs as the generated remote code
    (remote_code.py), which loads without the package. Imported by name: transformers scans remote
    code for import statements and would require the package."""
    if __name__ != "mot_transition.config":
        return None
    import importlib

    return importlib.import_module(f"mot_transition.{name}")


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (not a bool): NaN and infinities pass no range check honestly."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _multiple_of_8(width: float) -> int:
    """The multiple of 8 nearest to `width` (at least 8), or `width` rounded when below 8: widths that
    keep rows of the expert matrices aligned for grouped matmuls."""
    return max(8, 8 * round(width / 8)) if width >= 8 else max(1, round(width))


__all__ = ["MoTConfig", "BLOCK_STYLES", "FFN_TYPES", "EXPERT_FFN_TYPES", "GROUPING_FFN_TYPES"]
