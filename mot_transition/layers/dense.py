"""Dense feed-forward layer (docs/design.md §6): act(x @ w1) @ w2, width n_inner, no bias; the baseline.
With the "llama" block style it is SwiGLU (design.md §8.3): w1 (d, 2f) holds [gate | up] and the layer
computes (silu(x @ gate) * (x @ up)) @ w2."""

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

from ..config import MoTConfig
from .experts import activate


class DenseFFN(nn.Module):
    def __init__(self, config: MoTConfig):
        super().__init__()
        d, f = config.n_embd, config.n_inner
        self.gated = config.gated
        self.w1 = nn.Parameter(torch.empty(d, 2 * f if self.gated else f))
        self.w2 = nn.Parameter(torch.empty(f, d))
        self.act = ACT2FN[config.activation_function]
        self.reset_parameters(config.initializer_range, config.n_layer)

    @torch.no_grad()
    def reset_parameters(self, std: float, n_layer: int) -> None:
        init.normal_(self.w1, std=std)
        init.normal_(self.w2, std=std / math.sqrt(2 * n_layer))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        return activate(x @ self.w1, self.act, self.gated) @ self.w2, None
