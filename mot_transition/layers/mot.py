"""Mixture of Tokens (SPEC 1.1): every expert processes a softmax-weighted mixture of the tokens
of a group, and a group is g different batch rows at the same sequence position.

    logits = x @ controller / T                       (G, g, S, E)
    w      = softmax(logits over the g tokens)         merge weights, sum to 1 per expert
    m_e    = sum_j w[j, e] x_j                         (E, G*S, d)
    o_e    = FFN_e(m_e)                                (E, G*S, d)
    y_i    = sum_e w[i, e] o_e                         (G, g, S, d)

Invalid tokens (batch-padding rows, attention-masked positions) get weight exactly 0 in every
mixture and output 0; a group without a valid token contributes nothing and makes no NaN.
"""

import torch
import torch.nn.functional as F

from ..config import MoTConfig
from .experts import ExpertLayer, group_across_batch, ungroup


class MixtureOfTokens(ExpertLayer):
    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.group_size = config.group_size
        self.temperature = config.mot_temperature
        self.emit_softmax_over_experts = config.emit_softmax_over_experts
        self.use_discrete_routing = config.use_discrete_routing

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        B, S, d = x.shape
        xg, valid = group_across_batch(x, token_mask, self.group_size)  # (G, g, S, d), (G, g, S)
        G, g = xg.shape[:2]
        logits = self.router_logits(xg) / self.temperature  # (G, g, S, E)
        keep = valid[..., None]  # (G, g, S, 1)
        # finfo.min, not -inf: exp() gives an exact 0 beside a valid token, and a group of
        # invalid tokens only gives finite weights that `* keep` then zeroes (no NaN).
        masked = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        if self.use_discrete_routing:
            # each expert takes exactly one token of the group and returns its output to it
            merge = F.one_hot(masked.argmax(dim=1), g).movedim(-1, 1).to(logits.dtype) * keep
            emit = merge
        else:
            merge = torch.softmax(masked, dim=1) * keep
            emit = torch.softmax(masked, dim=-1) * keep if self.emit_softmax_over_experts else merge
        merge, emit = merge.to(x.dtype), emit.to(x.dtype)
        mixed = torch.einsum("gjse,gjsd->egsd", merge, xg).reshape(self.n_expert, G * S, d)
        out = self.experts(mixed).view(self.n_expert, G, S, d)
        yg = torch.einsum("gjse,egsd->gjsd", emit, out)
        router_logits = ungroup(logits, B).reshape(B * S, -1)
        return ungroup(yg, B), router_logits
