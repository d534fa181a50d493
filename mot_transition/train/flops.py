"""FLOPs per token and model FLOPs utilisation (MFU), counted from the config the way papers count
"model FLOPs" (PaLM, appendix B): the matmuls a token pays for, 2 FLOPs per multiply-add,
training = 3 x forward (the backward pass costs twice the forward), nothing for embeddings'
lookups, norms, activations or softmaxes.

Per block, forward, per token (d = n_embd, S = sequence length, f = FFN width):
    attention projections   8 d^2                 (q, k, v and output)
    attention itself        4 d S                 (scores and weighted sum over the whole
                                                   sequence, PaLM's convention, not halved for causality)
    dense FFN               4 d f  (two-matrix)   6 d f  (SwiGLU: gate, up, down)
    MoT layer               2 d E (controller) + 2 d E (mixing g tokens into E) + 2 d E (emitting back)
                            + E / g expert FFNs of width expert_size
    Token Choice            2 d E (router) + k expert FFNs
    Expert Choice           2 d E (router) + E c / g expert FFNs (c = capacity per group)
and the LM head, 2 d V. Only the experts a token uses are counted.
"""

from __future__ import annotations

import math
import os

from ..counts import expert_share

# Dense bf16 tensor-core peak per device, FLOP/s, as the vendors list them (without sparsity).
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM (the name reads "NVIDIA H100 80GB HBM3")
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
}


def ffn_flops(config, width: int) -> float:
    """Forward FLOPs of one token through one FFN (an expert or the dense MLP) of this width."""
    return (6 if config.gated else 4) * config.n_embd * width


def forward_flops_per_token(config, seq_len: int) -> float:
    d, E = config.n_embd, config.n_expert
    total = 2 * d * config.vocab_size  # the LM head
    for i in range(config.n_layer):
        total += 8 * d * d + 4 * d * seq_len
        kind = config.ffn_type_of_layer(i)
        if kind == "dense":
            total += ffn_flops(config, config.n_inner)
        else:  # routing (MoT: also mixing into E and emitting back), then E x the share of the experts a token uses
            routing = (6 if kind == "mot" else 2) * d * E
            total += routing + E * expert_share(config, kind) * ffn_flops(config, config.expert_size)
    return float(total)


def training_flops_per_token(config, seq_len: int) -> float:
    """Forward and backward: three times the forward FLOPs."""
    return 3 * forward_flops_per_token(config, seq_len)


def peak_flops(device) -> float | None:
    """The device's dense bf16 peak in FLOP/s: MOT_TRANSITION_PEAK_TFLOPS when set, else from the
    table by the CUDA device's name; None when unknown (or on a CPU)."""
    if os.environ.get("MOT_TRANSITION_PEAK_TFLOPS"):
        text = os.environ["MOT_TRANSITION_PEAK_TFLOPS"]
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"MOT_TRANSITION_PEAK_TFLOPS must be a positive number of TFLOP/s, got {text!r}")
        return value * 1e12
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():  # most specific names first
        if key in name:
            return value
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the model FLOPs the step achieved over the device's peak."""
    return None if not peak else tokens_per_second * flops_per_token / peak


__all__ = ["forward_flops_per_token", "training_flops_per_token", "peak_flops", "mfu", "PEAK_BF16"]
