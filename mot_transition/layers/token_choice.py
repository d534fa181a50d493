"""Token Choice sparse MoE (SPEC 1.2): every token picks its top-k experts by router probability.

    p      = softmax(x @ controller over the E experts)     (N, E), float32
    chosen = top-k of p; gate = p (or renormalised over the k)
    y      = sum over chosen e of gate_e * FFN_e(x)

Tokens are sorted by expert and each expert runs one matmul on its contiguous slice. In training a
`capacity_factor` caps each expert at ceil(cf * N * k / E) tokens, first come first served in order of
sequence position, then batch row, so that dropping stays causal (a dropped token passes through the
residual only); evaluation is always dropless, so a sequence's output does
not depend on the rest of the batch. Invalid tokens (attention-masked positions) are not routed.
"""

import math

import torch
import torch.nn.functional as F

from ..config import MoTConfig
from .experts import ExpertLayer


class TokenChoice(ExpertLayer):
    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        self.norm_topk_prob = config.norm_topk_prob

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        B, S, d = x.shape
        E, k = self.n_expert, self.top_k
        flat = x.reshape(-1, d)  # (N, d)
        logits = self.router_logits(flat)  # (N, E)
        gate, expert = torch.softmax(logits, dim=-1).topk(k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        # one row per (token, choice); sorted by expert, then by arrival: position first, batch row second
        expert = expert.reshape(-1)
        token = torch.arange(flat.shape[0], device=x.device).repeat_interleave(k)
        if token_mask is not None:
            expert = torch.where(token_mask.reshape(-1).repeat_interleave(k), expert, E)  # E = not routed
        arrival = (token % S) * B + token // S
        order = torch.argsort(expert * (B * S) + arrival)
        counts = torch.bincount(expert, minlength=E + 1)
        capacity_factor = self.capacity_factor if self.training else None  # eval is dropless
        if capacity_factor is None:
            order = order[: counts[:E].sum()]  # the not-routed bucket sorts last
            counts = counts[:E]
        else:
            n_routed = counts[:E].sum().item() // k
            capacity = math.ceil(capacity_factor * n_routed * k / E)
            sorted_expert = expert[order]
            rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[sorted_expert]
            order = order[(sorted_expert < E) & (rank < capacity)]
            counts = counts[:E].clamp(max=capacity)
        token, gate = token[order], gate.reshape(-1)[order]
        pieces = torch.split(flat[token], counts.tolist())
        out = torch.cat(
            [self.act(p @ w1) @ w2 for p, w1, w2 in zip(pieces, self.lin1.unbind(0), self.lin2.unbind(0))]
        )
        y = torch.zeros_like(flat).index_add_(0, token, out * gate[:, None].to(out.dtype))
        return y.view(B, S, d), logits


def load_balancing_loss(router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e over the valid tokens, from raw router logits (N, E).

    f_e is the fraction of tokens that chose expert e among their top k and P_e the mean router
    probability of e. Uniform routing gives top_k (as in Mixtral); a collapsed router gives up to E.
    """
    logits = router_logits.float()
    if token_mask is not None:
        logits = logits[token_mask.reshape(-1).bool()]
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, E).sum(dim=1).float()  # (N, E)
    return E * (chosen.mean(dim=0) * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean(logsumexp(logits)^2) over the valid tokens (ST-MoE's router z-loss)."""
    logits = router_logits.float()
    if token_mask is not None:
        logits = logits[token_mask.reshape(-1).bool()]
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
