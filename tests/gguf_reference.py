"""What llama.cpp's hy_v3 graph computes from a GGUF file, written out plainly in torch from the
file alone (its metadata and its tensors, dequantised), independent of our model code: the oracle
the GGUF export is checked against where llama.cpp itself is not installed.

Per block: x += attn(rmsnorm(x) * attn_norm); x += ffn(rmsnorm(x) * ffn_norm). Attention: q, k, v
projections, q and k RMS-normed per head, NEOX rotary positions (the two halves of a head rotate
together), causal softmax(q k^T / sqrt(head_dim)) v, output projection. A block with
ffn_gate_inp is a MoE block: softmax over the router's logits, the top k, their probabilities as
weights (renormalised when expert_weights_norm), each expert a SwiGLU, plus the shared SwiGLU
expert; else a SwiGLU of ffn_gate / ffn_up / ffn_down. Then output_norm and the output head
(token_embd when the file has no output.weight).
"""

import numpy as np
import torch


def read_gguf(path) -> tuple[dict, dict]:
    """({key: value}, {tensor name: float32 tensor in numpy's (out, in) order}) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, f in reader.fields.items():
        if not f.types:
            continue
        kind = f.types[0]
        if kind == gguf.GGUFValueType.STRING:
            fields[name] = bytes(f.parts[f.data[0]]).decode()
        elif kind == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                fields[name] = [bytes(f.parts[i]).decode() for i in f.data]
            else:
                fields[name] = [f.parts[i].tolist()[0] for i in f.data]
        else:
            fields[name] = f.parts[f.data[0]].tolist()[0]
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(shape).copy())
    return fields, tensors


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def forward(fields: dict, tensors: dict, tokens: list[int]) -> torch.Tensor:
    """Logits (len(tokens), vocab) of one sequence, float64."""
    arch = fields["general.architecture"]
    key = lambda name: fields[f"{arch}.{name}"]  # noqa: E731
    n_layer, heads, eps = key("block_count"), key("attention.head_count"), key("attention.layer_norm_rms_epsilon")
    head_dim, base, k = key("attention.key_length"), key("rope.freq_base"), key("expert_used_count")
    renormalise = bool(key("expert_weights_norm"))
    assert key("expert_gating_func") == 1, "softmax gating"
    W = {name: t.double() for name, t in tensors.items()}
    x = W["token_embd.weight"][torch.tensor(tokens)]
    T = len(tokens)
    half = head_dim // 2
    angles = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rope(t):  # (T, heads, head_dim), NEOX: element i pairs with i + half
        a, b = t[..., :half], t[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(n_layer):
        p = lambda name: W[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = _rms(x, p("attn_norm"), eps)
        q, kk, v = ((h @ p(n).T).view(T, heads, head_dim) for n in ("attn_q", "attn_k", "attn_v"))
        q, kk = rope(_rms(q, p("attn_q_norm"), eps)), rope(_rms(kk, p("attn_k_norm"), eps))
        scores = torch.einsum("qhd,khd->hqk", q, kk) / head_dim ** 0.5
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", attention, v).reshape(T, heads * head_dim) @ p("attn_output").T
        h = _rms(x, p("ffn_norm"), eps)
        if f"blk.{i}.ffn_gate_inp.weight" in W:
            probabilities = (h @ p("ffn_gate_inp").T).softmax(-1)
            weights, chosen = probabilities.topk(k, dim=-1)
            if renormalise:
                weights = weights / weights.sum(-1, keepdim=True)
            out = _swiglu(h, p("ffn_gate_shexp"), p("ffn_up_shexp"), p("ffn_down_shexp"))
            gates, ups, downs = p("ffn_gate_exps"), p("ffn_up_exps"), p("ffn_down_exps")
            for t in range(T):
                for w, e in zip(weights[t], chosen[t]):
                    out[t] += w * _swiglu(h[t], gates[e], ups[e], downs[e])
            x = x + out
        else:
            x = x + _swiglu(h, p("ffn_gate"), p("ffn_up"), p("ffn_down"))
    x = _rms(x, W["output_norm.weight"], eps)
    return x @ W.get("output.weight", W["token_embd.weight"]).T
