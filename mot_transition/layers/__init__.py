"""The four feed-forward layers. Each maps (x (B, S, d), token_mask (B, S) | None) to
(y (B, S, d), router_logits (B*S, E) | None)."""

from torch import nn

from ..config import MoTConfig
from .dense import DenseFFN
from .expert_choice import ExpertChoice
from .experts import ExpertLayer, group_across_batch, ungroup
from .mot import MixtureOfTokens
from .token_choice import TokenChoice, load_balancing_loss, router_z_loss

FFN_CLASSES = {
    "dense": DenseFFN,
    "mot": MixtureOfTokens,
    "token_choice": TokenChoice,
    "expert_choice": ExpertChoice,
}


def build_ffn(config: MoTConfig, layer_idx: int) -> nn.Module:
    return FFN_CLASSES[config.ffn_type_of_layer(layer_idx)](config)


__all__ = [
    "DenseFFN", "ExpertChoice", "ExpertLayer", "MixtureOfTokens", "TokenChoice", "FFN_CLASSES",
    "build_ffn", "group_across_batch", "ungroup", "load_balancing_loss", "router_z_loss",
]
