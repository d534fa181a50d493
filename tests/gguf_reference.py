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

`forward(..., inputs_as=ggml_inputs(types))` also rounds what ggml's CPU backend rounds: a matrix
product with f16 (bf16, q8_0) weights first converts its input activations to f16 (bf16, q8_0
blocks): ggml-cpu.c's type traits give an f16 matrix the vec_dot_type f16, and both its kernels
(ggml_vec_dot_f16 and llamafile's tinyBLAS, which takes f16 inputs only) then multiply f16 by f16,
summing in float32. The router (kept f32) and the token embedding's row lookup round nothing.
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


def read_types(path) -> dict:
    """{tensor name: its GGML type's name ("F32", "F16", "BF16", "Q8_0", ...)} of a GGUF file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def ggml_inputs(types: dict) -> dict:
    """{weight name: how ggml's CPU matrix product rounds that weight's input} for the weights whose
    type makes it round (F16 -> "f16", BF16 -> "bf16", Q8_0 -> "q8_0"); F32 weights are left out.
    (token_embd's entry matters only where it is the output head: its row lookup rounds nothing.)"""
    kinds = {"F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
    return {name: kinds[kind] for name, kind in types.items() if kind in kinds}


def _round(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """x as ggml hands it to a matrix product of `kind`'s weights (in x's dtype)."""
    if kind is None:
        return x
    if kind in ("f16", "bf16"):
        return x.float().to(torch.float16 if kind == "f16" else torch.bfloat16).to(x.dtype)
    if kind == "q8_0":  # blocks of 32: scale max|x| / 127 stored as f16, values rounded to int8
        import gguf

        rows = x.float().numpy().reshape(-1, x.shape[-1])
        Q = gguf.GGMLQuantizationType.Q8_0
        back = gguf.quants.dequantize(gguf.quants.quantize(rows, Q), Q)
        return torch.from_numpy(np.asarray(back, dtype=np.float32)).reshape(x.shape).to(x.dtype)
    raise ValueError(kind)


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def forward(fields: dict, tensors: dict, tokens: list[int], inputs_as: dict | None = None,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits (len(tokens), vocab) of one sequence, float64, computed in `dtype`; `inputs_as`
    ({weight name: "f16" | "bf16" | "q8_0"}, see ggml_inputs): round the input of a product with
    that weight as ggml does."""
    inputs_as = inputs_as or {}
    arch = fields["general.architecture"]
    key = lambda name: fields[f"{arch}.{name}"]  # noqa: E731
    n_layer, heads, eps = key("block_count"), key("attention.head_count"), key("attention.layer_norm_rms_epsilon")
    head_dim, base, k = key("attention.key_length"), key("rope.freq_base"), key("expert_used_count")
    renormalise = bool(key("expert_weights_norm"))
    assert key("expert_gating_func") == 1, "softmax gating"
    W = {name: t.to(dtype) for name, t in tensors.items()}
    x = W["token_embd.weight"][torch.tensor(tokens)]
    T = len(tokens)
    half = head_dim // 2
    angles = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    cos, sin = angles.cos()[:, None, :].to(dtype), angles.sin()[:, None, :].to(dtype)

    def rope(t):  # (T, heads, head_dim), NEOX: element i pairs with i + half
        a, b = t[..., :half], t[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def mm(x, name, expert=None):  # x @ W.T, x rounded as ggml rounds it for W's type
        w = W[name] if expert is None else W[name][expert]
        return _round(x, inputs_as.get(name)) @ w.T

    def swiglu(x, gate, up, down, expert=None):
        return mm(torch.nn.functional.silu(mm(x, gate, expert)) * mm(x, up, expert), down, expert)

    for i in range(n_layer):
        p = lambda name: W[f"blk.{i}.{name}.weight"]  # noqa: E731
        b = lambda name: f"blk.{i}.{name}.weight"  # noqa: E731
        h = _rms(x, p("attn_norm"), eps)
        q, kk, v = (mm(h, b(n)).view(T, heads, head_dim) for n in ("attn_q", "attn_k", "attn_v"))
        q, kk = rope(_rms(q, p("attn_q_norm"), eps)), rope(_rms(kk, p("attn_k_norm"), eps))
        scores = torch.einsum("qhd,khd->hqk", q, kk) / head_dim ** 0.5
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + mm(torch.einsum("hqk,khd->qhd", attention, v).reshape(T, heads * head_dim), b("attn_output"))
        h = _rms(x, p("ffn_norm"), eps)
        if b("ffn_gate_inp") in W:
            probabilities = mm(h, b("ffn_gate_inp")).softmax(-1)
            weights, chosen = probabilities.topk(k, dim=-1)
            if renormalise:
                weights = weights / weights.sum(-1, keepdim=True)
            out = swiglu(h, b("ffn_gate_shexp"), b("ffn_up_shexp"), b("ffn_down_shexp"))
            for t in range(T):
                for w, e in zip(weights[t], chosen[t]):
                    out[t] += w * swiglu(h[t:t + 1], b("ffn_gate_exps"), b("ffn_up_exps"), b("ffn_down_exps"), int(e))[0]
            x = x + out
        else:
            x = x + swiglu(h, b("ffn_gate"), b("ffn_up"), b("ffn_down"))
    x = _rms(x, W["output_norm.weight"], eps)
    return mm(x, "output.weight" if "output.weight" in W else "token_embd.weight").double()
