"""Expert Choice (docs/design.md §5), for comparison runs: within each group of g tokens (g batch rows at
the same position, as in MoT) every expert picks its top-`capacity` tokens by router score and
returns its output to them, weighted by that score.

    score  = softmax(x @ controller over the E experts)     (G, g, S, E)
    chosen = top-c tokens of the group for every expert     (G, c, S, E)
    y_i    = sum over experts e that chose i of score[i, e] * FFN_e(x_i)

capacity c = ceil(capacity_factor * g * k / E), capacity_factor 1 when unset, at most g.
Invalid tokens score below every valid one and receive weight 0.
"""

import math

import torch

from ..config import MoTConfig
from .experts import ExpertLayer, group_across_batch, ungroup


class ExpertChoice(ExpertLayer):
    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.group_size = config.group_size
        factor = config.capacity_factor or 1.0
        self.capacity = min(config.group_size, math.ceil(factor * config.group_size * config.num_experts_per_tok / config.n_expert))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        B, S, d = x.shape
        c = self.capacity
        xg, valid = group_across_batch(x, token_mask, self.group_size)  # (G, g, S, d), (G, g, S)
        G, g = xg.shape[:2]
        logits = self.router_logits(xg)  # (G, g, S, E)
        score = torch.softmax(logits, dim=-1) * valid[..., None]
        ranking = torch.where(valid[..., None], score, -1.0)  # invalid tokens are chosen last
        chosen = ranking.topk(c, dim=1).indices  # (G, c, S, E)
        weight = score.gather(1, chosen)  # (G, c, S, E)
        if self.local_experts is not None:  # this rank's experts only; the ranks' outputs are summed (parallel_plans.py)
            chosen, weight = chosen[..., self.local_experts], weight[..., self.local_experts]
        # flat token index of every choice, expert-major: (E, G, c, S)
        rows = torch.arange(G, device=x.device).view(G, 1, 1, 1) * g + chosen
        flat_index = (rows * S + torch.arange(S, device=x.device).view(1, 1, S, 1)).permute(3, 0, 1, 2)
        E = chosen.shape[-1]
        tokens = xg.reshape(G * g * S, d)[flat_index.reshape(-1)].view(E, -1, d)
        out = self.experts(tokens) * weight.permute(3, 0, 1, 2).reshape(E, -1, 1).to(x.dtype)
        y = torch.zeros(G * g * S, d, dtype=x.dtype, device=x.device).index_add_(0, flat_index.reshape(-1), out.reshape(-1, d))
        router_logits = ungroup(logits, B).reshape(B * S, -1)
        return ungroup(y.view(G, g, S, d), B), router_logits
