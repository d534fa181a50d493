"""Self-attention of both block styles, rotary positions and the style's normalisation (docs/design.md §8)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .config import MoTConfig


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v written out, so that the attention weights can be returned.
    query (B, h, S, hd), key and value (B, h, T, hd); attention_mask boolean (B, 1, S, T) (True =
    attend), additive float, or None for plain causal attention. A query that may attend nothing (a
    left-padding position) gets weights 0 and outputs 0, as torch's SDPA gives it. Returns
    ((B, S, h, hd), weights)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, h, S, T)
    if attention_mask is None:
        S, T = scores.shape[-2:]
        attention_mask = torch.ones(S, T, dtype=torch.bool, device=scores.device).tril(T - S)
    lowest, attention_mask = torch.finfo(scores.dtype).min, attention_mask[..., : key.shape[-2]]
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, lowest)
    else:
        scores = scores + attention_mask
    blind = scores.amax(dim=-1, keepdim=True) <= lowest / 2  # every key masked
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).masked_fill(blind, 0.0).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class MoTAttention(nn.Module):
    """Causal multi-head self-attention through transformers' attention interface: `eager` (ours,
    above; returns the weights) or any registered implementation (`sdpa` by default). One fused
    projection `c_attn` to queries, keys and values ("gpt2" style: with bias; "llama": without, and
    with rotary positions), `c_proj` back; with `qk_norm`, per-head RMSNorm of queries and keys
    (before the rotation, as Qwen3 does)."""

    is_causal = True
    num_key_value_groups = 1

    def __init__(self, config: MoTConfig, layer_idx: int):
        super().__init__()
        self.config, self.n_head, self.layer_idx = config, config.n_head, layer_idx
        head_dim, bias = config.n_embd // config.n_head, config.block == "gpt2"
        self.scaling = head_dim**-0.5
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps=config.layer_norm_epsilon) if config.qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=config.layer_norm_epsilon) if config.qk_norm else None
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self, x, attn_mask, cache: Cache | None, output_attentions: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **attention_kwargs,
    ):
        """`position_embeddings`: (cos, sin) of the rotary positions, each (B or 1, S, head_dim), or None."""
        B, S, d = x.shape
        qkv = self.c_attn(x).view(B, S, 3, self.n_head, d // self.n_head)
        if self.q_norm is None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, h, S, hd)
        else:
            q, k, v = qkv.unbind(2)
            q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if position_embeddings is not None:
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings, unsqueeze_dim=1)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        y, weights = attention(
            self, q, k, v, attn_mask, dropout=self.attn_pdrop if self.training else 0.0, scaling=self.scaling,
            **attention_kwargs,
        )
        return self.resid_dropout(self.c_proj(y.reshape(B, S, d))), weights


def rotary_embedding(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(cos, sin) of rotary positions (RoPE, rotate-half layout, as Llama and Qwen3), each
    (B or 1, S, head_dim), computed in float32 (float64 for a float64 model) and cast to `dtype`."""
    exact = torch.promote_types(dtype, torch.float32)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).to(exact) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = position_ids[..., None].to(exact) * inv_freq  # (B, S, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), computed as Llama and Qwen3 compute it (in float32, the
    product with the weight in the input's dtype), except that a float64 input stays in float64."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def build_norm(config: MoTConfig, size: int) -> nn.Module:
    """The block style's normalisation: LayerNorm with bias ("gpt2") or RMSNorm ("llama")."""
    if config.block == "llama":
        return RMSNorm(size, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(size, eps=config.layer_norm_epsilon)
