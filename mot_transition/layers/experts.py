"""What the three expert layers share: one parameterisation and the cross-batch grouping.

Mixture of Tokens, Token Choice and Expert Choice all own the same tensors (SPEC 1), so a
checkpoint of one kind loads into the others:

    controller (d, E)     MoT controller / router
    lin1       (E, d, f)  first matrix of every expert
    lin2       (E, f, d)  second matrix of every expert

Expert e computes FFN_e(z) = act(z @ lin1[e]) @ lin2[e], no bias.
"""

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

from ..config import MoTConfig


class ExpertLayer(nn.Module):
    """Base of the expert layers: owns controller, lin1, lin2 and applies the experts."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        d, E, f = config.n_embd, config.n_expert, config.expert_size
        self.n_expert = E
        self.controller = nn.Parameter(torch.empty(d, E))
        self.lin1 = nn.Parameter(torch.empty(E, d, f))
        self.lin2 = nn.Parameter(torch.empty(E, f, d))
        self.act = ACT2FN[config.activation_function]
        self.reset_parameters(config.initializer_range, config.n_layer)

    @torch.no_grad()
    def reset_parameters(self, std: float, n_layer: int) -> None:
        init.normal_(self.controller, std=std)
        init.normal_(self.lin1, std=std)
        # residual projection, scaled as GPT-2 does for the second matrix of every block
        init.normal_(self.lin2, std=std / math.sqrt(2 * n_layer))

    def experts(self, tokens: torch.Tensor) -> torch.Tensor:
        """All experts at once on their own token sets: (E, n, d) -> (E, n, d)."""
        return torch.bmm(self.act(torch.bmm(tokens, self.lin1)), self.lin2)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x @ controller in at least float32: router math never runs in half precision."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return x.to(dtype) @ self.controller.to(dtype)


def group_across_batch(x: torch.Tensor, token_mask: torch.Tensor | None, group_size: int):
    """Group g different batch rows at the same position (SPEC 1.1).

    x (B, S, d), token_mask (B, S) bool or None  ->  xg (G, g, S, d), valid (G, g, S), with
    G = ceil(B / g). Rows added to fill the last group, and masked positions, are invalid and
    zeroed (with `where`, so that a NaN or inf under the mask cannot leak into a mixture).
    """
    B, S, d = x.shape
    valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if token_mask is None else token_mask.bool()
    pad = (-B) % group_size
    if pad:
        x = torch.cat([x, x.new_zeros(pad, S, d)])
        valid = torch.cat([valid, valid.new_zeros(pad, S)])
    G = x.shape[0] // group_size
    valid = valid.view(G, group_size, S)
    xg = torch.where(valid[..., None], x.view(G, group_size, S, d), 0.0)
    return xg, valid


def ungroup(yg: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(G, g, S, d) -> (B, S, d), dropping the rows added to fill the last group."""
    G, g, S, d = yg.shape
    return yg.reshape(G * g, S, d)[:batch_size]
