"""Parameter counts of a model from its config alone (built on the meta device: no memory, no init).

"Active per token" counts the parameters whose multiply-adds one token pays for on average:
everything outside the expert layers, every controller, and the expert matrices times the share
of them a token uses: 1/g for MoT (E experts each process a mixture of g tokens), k/E for Token
Choice, capacity/g for Expert Choice. Embedding tables are counted in both (a lookup, no FLOPs,
but they are the parameters a token touches).
"""

import torch

from .config import MoTConfig


def expert_share(config: MoTConfig, ffn_type: str) -> float:
    """Fraction of an expert layer's lin1 / lin2 that one token's FLOPs correspond to."""
    if ffn_type == "mot":
        return 1.0 / config.group_size
    if ffn_type == "token_choice":
        return config.num_experts_per_tok / config.n_expert
    if ffn_type == "expert_choice":
        from .layers import ExpertChoice

        with torch.device("meta"):
            return ExpertChoice(config).capacity / config.group_size
    return 1.0


def parameter_counts(config: MoTConfig) -> dict:
    """{"total", "active_per_token", "by_kind": {kind: {"layers", "total", "active_per_token"}}}."""
    from .modeling import MoTLMHeadModel

    with torch.device("meta"):
        model = MoTLMHeadModel(config)
    by_kind: dict[str, dict] = {}

    def add(kind: str, total: int, active: float, layers: int = 0) -> None:
        row = by_kind.setdefault(kind, {"layers": 0, "total": 0, "active_per_token": 0})
        row["layers"] += layers
        row["total"] += total
        row["active_per_token"] += active

    trunk = model.transformer
    seen = set()
    for module in (trunk.wte, trunk.wpe, model.lm_head, trunk.ln_f):
        if module is None:  # no learned positions ("llama" style)
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                add("embeddings and final norm", p.numel(), p.numel())
    for idx, block in enumerate(trunk.h):
        rest = sum(p.numel() for name, p in block.named_parameters() if not name.startswith("mlp."))
        add("attention and norms", rest, rest, layers=1)
        kind = config.ffn_type_of_layer(idx)
        mlp = dict(block.mlp.named_parameters())
        if kind == "dense":
            total = sum(p.numel() for p in mlp.values())
            add("dense ffn", total, total, layers=1)
        else:
            experts = mlp["lin1"].numel() + mlp["lin2"].numel()
            controller = mlp["controller"].numel()
            add(f"{kind} ffn", experts + controller, controller + experts * expert_share(config, kind), layers=1)
    for row in by_kind.values():
        row["active_per_token"] = round(row["active_per_token"])
    return {
        "total": sum(row["total"] for row in by_kind.values()),
        "active_per_token": sum(row["active_per_token"] for row in by_kind.values()),
        "by_kind": by_kind,
    }
