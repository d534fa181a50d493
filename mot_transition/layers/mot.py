"""Mixture of Tokens (docs/design.md §3): every expert processes a softmax-weighted mixture of the tokens
of a group, and a group is g different batch rows at the same sequence position.

    logits = x @ controller / T                       (n, g, E), n = G*S groups of g tokens
    w      = softmax(logits over the g tokens)         merge weights, sum to 1 per expert
    m_e    = sum_j w[j, e] x_j                         (n, E, d)  one bmm: (n, E, g) @ (n, g, d)
    o_e    = FFN_e(m_e)                                (E, n, d)  one bmm per expert matrix
    y_i    = sum_e w[i, e] o_e                         (n, g, d)  one bmm: (n, g, E) @ (n, E, d)

The groups are laid out once as contiguous (g, d) blocks (`group_by_position`), so mixing and
emitting are batched matmuls over all groups, and the experts read the mixtures in place.

Invalid tokens (batch-padding rows, attention-masked positions) get weight exactly 0 in every
mixture and output 0; a group without a valid token contributes nothing and makes no NaN.
"""

import torch

from ..config import MoTConfig
from .experts import ExpertLayer, group_by_position, ungroup_by_position


class MixtureOfTokens(ExpertLayer):
    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.group_size = config.group_size
        self.temperature = config.mot_temperature
        self.emit_softmax_over_experts = config.emit_softmax_over_experts
        self.use_discrete_routing = config.use_discrete_routing

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        B, S = x.shape[:2]
        xg, keep = group_by_position(x, token_mask, self.group_size)  # (n, g, d), (n, g, 1) | None; n = G*S groups
        logits = self.router_logits(xg) / self.temperature  # (n, g, E) float32
        # finfo.min, not -inf: exp() gives an exact 0 beside a valid token, and a group of
        # invalid tokens only gives finite weights that `* keep` then zeroes (no NaN).
        masked = logits if keep is None else logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        if self.use_discrete_routing:
            # each expert takes exactly one token of the group and returns its output to it (a scatter,
            # not one_hot, which checks its ids on the host: a sync on a GPU)
            merge = emit = _kept(torch.zeros_like(masked).scatter_(1, masked.argmax(dim=1, keepdim=True), 1.0), keep)
        else:
            merge = _kept(torch.softmax(masked, dim=1), keep)  # over the g tokens of a group
            emit = _kept(torch.softmax(masked, dim=-1), keep) if self.emit_softmax_over_experts else merge
        if self.local_experts is not None:  # this rank's experts only; the ranks' outputs are summed (parallel_plans.py)
            merge, emit = merge[..., self.local_experts], emit[..., self.local_experts]
        merge, emit = merge.to(x.dtype), emit.to(x.dtype)
        mixed = torch.bmm(merge.transpose(1, 2), xg)  # (n, E, d): m_e = sum_j w[j, e] x_j
        out = self.experts(mixed.transpose(0, 1))  # (E, n, d), a strided view: no copy
        yg = torch.bmm(emit, out.transpose(0, 1))  # (n, g, d): y_i = sum_e w[i, e] o_e
        router_logits = ungroup_by_position(logits, B, S).reshape(B * S, -1)
        return ungroup_by_position(yg, B, S), router_logits


def _kept(weights: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return weights if keep is None else weights * keep
