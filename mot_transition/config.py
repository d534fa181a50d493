"""MoTConfig: one config for dense, Mixture of Tokens, Token Choice and Expert Choice models.

Field names follow the Mixture-of-Tokens port to transformers (GPT-2 style: `n_embd`, `n_layer`,
...), with the usual aliases (`hidden_size`, `num_hidden_layers`, ...). See docs/design.md §7.1.

Two block styles (docs/design.md §8.2): `block="gpt2"` (LayerNorm with bias, learned positions, two-matrix
MLPs and experts) and `block="llama"` (RMSNorm, rotary positions, no biases, SwiGLU in the dense
MLP and in every expert, per-head RMSNorm of queries and keys).
"""

from dataclasses import dataclass

from transformers import PreTrainedConfig

FFN_TYPES = ("dense", "mot", "token_choice", "expert_choice")
EXPERT_FFN_TYPES = ("mot", "token_choice", "expert_choice")
GROUPING_FFN_TYPES = ("mot", "expert_choice")  # group g batch rows at the same position (design.md §2.5)
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
    expert_size: int | None = None  # None = flop-matched: 4 * n_embd * group_size / n_expert (2/3 of it for SwiGLU)
    mot_temperature: float = 1.0
    emit_softmax_over_experts: bool = False
    use_discrete_routing: bool = False
    num_experts_per_tok: int = 1
    capacity_factor: float | None = None  # None = dropless
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    # Token Choice balancing without an auxiliary loss (DeepSeek-V3): a per-expert bias on the router's
    # probabilities picks the top k (the gates stay the unbiased probabilities); after every optimizer step
    # the trainer moves it by this much towards the under-loaded experts. 0 = off (no bias)
    router_bias_update_rate: float = 0.0
    output_router_logits: bool = False

    # How transformers' distributed loading shards the model (`from_pretrained(...,
    # distributed_config=DistributedConfig(tp_size=..., ep_size=..., fsdp_size=...))`, docs/design.md §12).
    # FSDP2: one unit per block, the embeddings, the final norm kept whole (the LM head adds its own rule).
    base_model_fsdp_plan = {"wte": "free_full_weight", "h.*": "free_full_weight", "ln_f": "keep_full_weight"}

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor parallel: the embedding by vocabulary rows, the attention projections by output rows
        (gathered after: the fused q|k|v projection does not split into heads by contiguous rows), the
        dense MLP by its hidden width and the expert layers by expert, each MLP's partial outputs summed.
        The "mot_*" styles are ours (parallel_plans.py)."""
        plan = {
            "wte": "embedding_rowwise",
            "h.*.attn.c_attn": "colwise_gather_output",
            "h.*.attn.c_proj": "colwise_gather_output",
            "h.*.mlp": "mot_feed_forward",
            "h.*.mlp.w1": "packed_rowwise" if self.gated else "rowwise",  # (d, f) or (d, [gate | up]): by columns
            "h.*.mlp.w2": "colwise",  # (f, d): by rows
        }
        if self.ffn_type in EXPERT_FFN_TYPES and self.moe_layers:
            plan |= {"h.*.mlp.lin1": "mot_expert_rows", "h.*.mlp.lin2": "mot_expert_rows"}  # by expert (dim 0)
            if self.ffn_type == "token_choice":
                plan["h.*.mlp.experts"] = "mot_routed_experts"
        return plan

    @property
    def base_model_ep_plan(self) -> dict[str, str] | None:
        """Expert parallel, Token Choice only: each rank holds a block of whole experts and the tokens
        travel to them (transformers' token dispatch). MoT and Expert Choice experts are sharded under
        the tensor parallel plan instead (their router picks tokens per expert, there is nothing to dispatch)."""
        if self.ffn_type != "token_choice" or not self.moe_layers:
            return None
        return {"h.*.mlp.experts": "ep_dispatch_experts", "h.*.mlp.lin1": "grouped_gemm", "h.*.mlp.lin2": "grouped_gemm"}

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
        """Expert width whose MoT FLOPs per token equal a dense FFN of width 4d (design.md §3.6); with
        SwiGLU experts, of a SwiGLU FFN of width 8d/3 (the same FLOPs: three matrices instead of two),
        rounded to a multiple of 8 (design.md §8.3)."""
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
        """Each field alone against its declared rule (MODEL_RULES): its type and range, finite
        numbers only. ValueError naming the field."""
        for name, rule in MODEL_RULES.items():
            rule.check(name, getattr(self, name, None))

    def check(self) -> None:
        """Raise a ValueError naming the field for any value that cannot work: each field against
        its rule, then the fields together."""
        need = _need
        self._check_values()
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


@dataclass(frozen=True)
class Rule:
    """What one field accepts, declared once and enforced everywhere the field is given (config,
    recipe, command line): a kind, for numbers a range (finite only: NaN and infinities pass no
    range check honestly), or a set of choices; `optional` allows None."""

    kind: type  # int, float (an int is accepted), bool, str or list
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound itself excluded
    high_open: bool = False
    optional: bool = False
    choices: tuple = ()
    item: type | None = None  # the kind of a list's items

    def check(self, key: str, value):
        """`value` as this rule's kind (an int given for a float becomes a float; a tuple for a
        list, a list), or a one-line ValueError: "KEY must be DESCRIPTION, got VALUE"."""
        if value is None and self.optional:
            return None
        ok, result = self._accepts(value)
        if not ok:
            shown = as_written(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"{key} must be {self.describe()}, got {shown}")
        return result

    def read(self, key: str, value):
        """`check` for a value as a person wrote it (a recipe file, a KEY=VALUE override, a grid
        file): where a list is expected, one item alone is the list of that item (`report_to =
        "tensorboard"` is `["tensorboard"]`). A Python caller's value goes through `check`, as given."""
        if self.kind is list and value is not None and not isinstance(value, (list, tuple)) and self._accepts([value])[0]:
            value = [value]
        return self.check(key, value)  # refused: said with the value as it was written

    def accepts(self, value) -> bool:
        """Whether `check` would take `value`."""
        return (value is None and self.optional) or self._accepts(value)[0]

    def _accepts(self, value):
        if self.kind is list:
            if not isinstance(value, (list, tuple)):
                return False, None
            items = [Rule(self.item, self.low, self.high, self.low_open, self.high_open)._accepts(v) for v in value]
            return all(ok for ok, _ in items), [v for _, v in items]
        if self.kind is bool or self.kind is str:
            return isinstance(value, self.kind) and (not self.choices or value in self.choices), value
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False, None
        if not -(2**63) < value < 2**63 or (self.kind is float and not -1e308 < value < 1e308):  # NaN, inf, huge
            return False, None
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok, float(value) if self.kind is float else value

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.kind is list:
            text = f"a list of {Rule(self.item, self.low, self.high, self.low_open, self.high_open).describe().removeprefix('an ').removeprefix('a ')}"
            text = text.replace("integer", "integers", 1).replace("number", "numbers", 1).replace("string", "strings", 1)
        else:
            text = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[self.kind]
            low, high = _number(self.low), _number(self.high)
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {low}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {high}"
        return text + (" or none" if self.optional else "")


POSITIVE_INT, POSITIVE, AT_LEAST_ZERO = Rule(int, low=1), Rule(float, low=0, low_open=True), Rule(float, low=0)
PROBABILITY = Rule(float, low=0, high=1, high_open=True)
FLAG, OPTIONAL_FLAG = Rule(bool), Rule(bool, optional=True)
MODEL_RULES: dict[str, Rule] = {
    "block": Rule(str, choices=BLOCK_STYLES),
    "vocab_size": POSITIVE_INT, "n_positions": POSITIVE_INT, "n_embd": POSITIVE_INT, "n_layer": POSITIVE_INT,
    "n_head": POSITIVE_INT, "n_inner": Rule(int, low=1, optional=True),
    "activation_function": Rule(str, optional=True),  # its name is checked against transformers' ACT2FN in check()
    "rope_theta": POSITIVE, "qk_norm": OPTIONAL_FLAG,
    "resid_pdrop": PROBABILITY, "embd_pdrop": PROBABILITY, "attn_pdrop": PROBABILITY,
    "layer_norm_epsilon": POSITIVE, "initializer_range": AT_LEAST_ZERO,
    "use_cache": FLAG, "tie_word_embeddings": FLAG,
    "bos_token_id": Rule(int, low=0, optional=True), "pad_token_id": Rule(int, low=0, optional=True),
    "ffn_type": Rule(str, choices=FFN_TYPES),
    "moe_layers": Rule(list, item=int, low=0, optional=True),  # each below n_layer: checked in check()
    "n_expert": POSITIVE_INT, "group_size": POSITIVE_INT, "expert_size": Rule(int, low=1, optional=True),
    "mot_temperature": POSITIVE, "emit_softmax_over_experts": FLAG, "use_discrete_routing": FLAG,
    "num_experts_per_tok": POSITIVE_INT, "capacity_factor": Rule(float, low=0, low_open=True, optional=True),
    "norm_topk_prob": FLAG, "router_aux_loss_coef": AT_LEAST_ZERO, "router_z_loss_coef": AT_LEAST_ZERO,
    "router_bias_update_rate": AT_LEAST_ZERO, "output_router_logits": FLAG,
}


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


def as_written(value) -> str:
    """A value as a person writes it in a recipe, a KEY=VALUE override or a grid file (TOML's words,
    which a message quotes back to them): none, true / false, 'text', 1e-05, [2, 3], {n_embd = 64};
    never Python's None, True or a type's name."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(as_written(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {as_written(v)}" for k, v in value.items()) + "}"
    for kind in (str, int, float):  # 'text' is a TOML string too; nan and inf are TOML's spelling
        if isinstance(value, kind):
            return repr(kind(value))  # numpy's float64(1.0) as 1.0
    return str(value)


def _number(value) -> str:
    """A bound as a user reads it: 1048576 rather than 1.04858e+06, 0.5 as 0.5."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _multiple_of_8(width: float) -> int:
    """The multiple of 8 nearest to `width` (at least 8), or `width` rounded when below 8: widths that
    keep rows of the expert matrices aligned for grouped matmuls."""
    return max(8, 8 * round(width / 8)) if width >= 8 else max(1, round(width))


__all__ = ["MoTConfig", "Rule", "MODEL_RULES", "as_written", "BLOCK_STYLES", "FFN_TYPES", "EXPERT_FFN_TYPES", "GROUPING_FFN_TYPES"]
