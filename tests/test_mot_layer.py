"""The Mixture of Tokens layer against a plain transcription of docs/design.md §3, in float64."""

import pytest
import torch

from conftest import plain_ffn, tiny_config
from mot_transition.layers import DenseFFN, MixtureOfTokens


def reference_mot(x, token_mask, controller, lin1, lin2, group_size, temperature=1.0, emit_softmax=False, discrete=False, gated=False):
    """design.md §3 written with loops: groups are g batch rows at the same position."""
    B, S, d = x.shape
    E = controller.shape[1]
    valid = torch.ones(B, S, dtype=torch.bool) if token_mask is None else token_mask.bool()
    y = torch.zeros_like(x)
    for start in range(0, B, group_size):
        rows = [r for r in range(start, min(start + group_size, B))]
        for s in range(S):
            members = [r for r in rows if valid[r, s]]  # batch-padding rows are simply absent
            if not members:
                continue
            xs = torch.stack([x[r, s] for r in members])  # (n, d)
            logits = xs @ controller / temperature  # (n, E)
            for e in range(E):
                if discrete:
                    merge = torch.zeros(len(members), dtype=x.dtype)
                    merge[logits[:, e].argmax()] = 1.0
                else:
                    merge = torch.softmax(logits[:, e], dim=0)
                mixed = (merge[:, None] * xs).sum(0)
                out = plain_ffn(mixed, lin1[e], lin2[e], gated)
                for i, r in enumerate(members):
                    if discrete:
                        weight = merge[i]
                    elif emit_softmax:
                        weight = torch.softmax(logits[i], dim=0)[e]
                    else:
                        weight = merge[i]
                    y[r, s] += weight * out
    return y


def make_layer(**overrides):
    config = tiny_config("mot", n_embd=8, n_expert=3, expert_size=5, **overrides)
    layer = MixtureOfTokens(config).double()
    with torch.no_grad():
        layer.controller.normal_(0, 1.0)  # large enough that the weights are far from uniform
    return layer


@pytest.mark.parametrize(
    "batch, seq, group_size, variant",
    [
        (4, 3, 2, {}),
        (6, 5, 3, {}),
        (5, 4, 2, {}),  # batch not a multiple of group_size
        (7, 2, 4, {"mot_temperature": 0.5}),
        (4, 3, 4, {"emit_softmax_over_experts": True}),
        (5, 3, 2, {"use_discrete_routing": True}),
        (3, 4, 1, {}),  # no mixing
        (5, 4, 2, {"block": "llama"}),  # SwiGLU experts
        (5, 3, 2, {"block": "llama", "use_discrete_routing": True}),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_mot_layer_equals_plain_reference(batch, seq, group_size, variant, masked):
    layer = make_layer(group_size=group_size, **variant)
    x = torch.randn(batch, seq, 8, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(batch, seq) > 0.3
        mask[0] = False  # one sequence entirely padding
    y, _ = layer(x, mask)
    expected = reference_mot(
        x, mask, layer.controller, layer.lin1, layer.lin2, group_size,
        temperature=variant.get("mot_temperature", 1.0),
        emit_softmax=variant.get("emit_softmax_over_experts", False),
        discrete=variant.get("use_discrete_routing", False), gated=layer.gated,
    )
    assert torch.allclose(y, expected, atol=1e-10, rtol=0)
    if mask is not None:
        assert torch.all(y[~mask] == 0), "masked tokens output exactly zero"


def test_padding_rows_and_masked_positions_do_not_change_real_outputs():
    layer = make_layer(group_size=4)
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[1, :2] = False
    y, _ = layer(x, mask)
    # garbage (even NaN and inf) under the mask changes nothing and makes no NaN
    x_dirty = x.clone()
    x_dirty[1, 0] = float("nan")
    x_dirty[1, 1] = float("inf")
    y_dirty, _ = layer(x_dirty, mask)
    assert torch.equal(y[mask], y_dirty[mask]) and torch.isfinite(y_dirty).all()
    # dropping the masked-out sequence's rows entirely from a batch leaves the others unchanged
    full_mask = mask.clone()
    full_mask[5] = False
    y_full, _ = layer(x, full_mask)
    y_short, _ = layer(x[:5], full_mask[:5])
    assert torch.allclose(y_full[:5], y_short, atol=1e-12)


def test_a_group_without_real_tokens_contributes_nothing_and_no_nan():
    layer = make_layer(group_size=2)
    x = torch.randn(4, 3, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[:2] = False  # the whole first group
    y, _ = layer(x, mask)
    assert torch.all(y[:2] == 0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[:2] == 0)


def test_mot_with_group_size_one_equals_dense_ffn_of_all_experts_side_by_side():
    config = tiny_config("mot", group_size=1)
    layer = MixtureOfTokens(config).double()
    dense = DenseFFN(tiny_config("dense", n_inner=config.n_expert * config.expert_size)).double()
    with torch.no_grad():
        dense.w1.copy_(layer.lin1.permute(1, 0, 2).reshape(config.n_embd, -1))  # (d, E*f)
        dense.w2.copy_(layer.lin2.reshape(-1, config.n_embd))  # (E*f, d)
    x = torch.randn(3, 5, config.n_embd, dtype=torch.float64)
    assert torch.allclose(layer(x)[0], dense(x)[0], atol=1e-12)


def test_permuting_rows_within_a_group_permutes_outputs_and_leaves_other_groups_alone():
    layer = make_layer(group_size=4)
    x = torch.randn(8, 3, 8, dtype=torch.float64)
    y, _ = layer(x)
    perm = torch.tensor([2, 0, 3, 1, 4, 5, 6, 7])
    y_perm, _ = layer(x[perm])
    assert torch.allclose(y_perm, y[perm], atol=1e-12)
    x2 = x.clone()
    x2[0, 1] += 1.0  # one token of the first group
    y2, _ = layer(x2)
    assert not torch.allclose(y2[1:4, 1], y[1:4, 1])  # its group mates see it
    assert torch.equal(y2[4:], y[4:]) and torch.equal(y2[:, 0], y[:, 0])  # other groups and positions do not
