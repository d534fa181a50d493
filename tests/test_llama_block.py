"""The "llama" block style (docs/design.md §8.2) against a plain transcription: RMSNorm, rotary positions
(pairs (i, i + hd/2) rotated by pos * theta^(-2i/hd)), per-head RMSNorm of queries and keys, no
biases, SwiGLU in the dense MLP and in every expert. Float64, one sequence at a time."""

import math

import pytest
import torch

from conftest import plain_ffn, tiny_config
from mot_transition import MoTLMHeadModel
from mot_transition.counts import parameter_counts


def rms(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rotate(x, theta):
    """x (S, hd): the pair (i, i + hd/2) of position s turned by the angle s * theta^(-2i/hd)."""
    S, hd = x.shape
    out = torch.empty_like(x)
    for s in range(S):
        for i in range(hd // 2):
            angle = s * theta ** (-2 * i / hd)
            a, b = x[s, i], x[s, i + hd // 2]
            out[s, i] = a * math.cos(angle) - b * math.sin(angle)
            out[s, i + hd // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def reference_logits(model, ids):
    """The llama-style model on one sequence ids (S,), written out from its state dict."""
    config, p = model.config, dict(model.named_parameters())
    eps, d, h = config.layer_norm_epsilon, config.n_embd, config.n_head
    hd, S = d // h, ids.shape[0]
    x = p["transformer.wte.weight"][ids]
    for i in range(config.n_layer):
        pre = f"transformer.h.{i}."
        a = rms(x, p[pre + "ln_1.weight"], eps)
        q, k, v = (a @ p[pre + "attn.c_attn.weight"].T).split(d, dim=-1)
        heads = []
        for j in range(h):
            part = slice(j * hd, (j + 1) * hd)
            qj = rotate(rms(q[:, part], p[pre + "attn.q_norm.weight"], eps), config.rope_theta)
            kj = rotate(rms(k[:, part], p[pre + "attn.k_norm.weight"], eps), config.rope_theta)
            scores = (qj @ kj.T) / math.sqrt(hd) + torch.full((S, S), float("-inf"), dtype=x.dtype).triu(1)
            heads.append(torch.softmax(scores, dim=-1) @ v[:, part])
        x = x + torch.cat(heads, dim=-1) @ p[pre + "attn.c_proj.weight"].T
        m = rms(x, p[pre + "ln_2.weight"], eps)
        if config.ffn_type_of_layer(i) == "dense":
            y = plain_ffn(m, p[pre + "mlp.w1"], p[pre + "mlp.w2"], gated=True)
        else:  # Token Choice, token by token
            y = torch.zeros_like(m)
            for t in range(S):
                probs = torch.softmax(m[t] @ p[pre + "mlp.controller"], dim=-1)
                for e in probs.topk(config.num_experts_per_tok).indices.tolist():
                    y[t] += probs[e] * plain_ffn(m[t], p[pre + "mlp.lin1"][e], p[pre + "mlp.lin2"][e], gated=True)
        x = x + y
    return rms(x, p["transformer.ln_f.weight"], eps) @ p["transformer.wte.weight"].T


@pytest.mark.parametrize("ffn_type", ["dense", "token_choice"])
def test_llama_style_model_equals_plain_transcription(ffn_type):
    model = MoTLMHeadModel(tiny_config(ffn_type, block="llama", rope_theta=500.0, n_layer=3, moe_layers=[1, 2])).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name:
                param.uniform_(0.5, 1.5)  # norms away from 1, so that a missing one shows
    ids = torch.randint(0, 61, (9,))
    with torch.no_grad():
        ours = model(ids[None]).logits[0]
        expected = reference_logits(model, ids)
    assert torch.allclose(ours, expected, atol=1e-10, rtol=0)


def test_llama_style_has_no_bias_and_no_learned_positions():
    model = MoTLMHeadModel(tiny_config("mot", block="llama"))
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.endswith(".bias") for name in names)
    assert not any("wpe" in name for name in names)
    assert any(name.endswith("attn.q_norm.weight") for name in names)
    assert MoTLMHeadModel(tiny_config("mot", block="llama", qk_norm=False)).transformer.h[0].attn.q_norm is None


@pytest.mark.parametrize("ffn_type", ["dense", "mot", "token_choice", "expert_choice"])
def test_parameter_counts_count_the_three_matrices_of_swiglu(ffn_type):
    config = tiny_config(ffn_type, block="llama")
    model = MoTLMHeadModel(config)
    counts = parameter_counts(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    d, f = config.n_embd, config.expert_size
    if ffn_type != "dense":
        row = counts["by_kind"][f"{ffn_type} ffn"]
        assert row["total"] == len(config.moe_layers) * (d * config.n_expert + config.n_expert * 3 * d * f)
