"""FLOPs per token from the config, against the matmuls written out by hand, and MFU."""

import pytest
import torch

from conftest import tiny_config
from mot_transition.train import flops
from mot_transition.train.flops import forward_flops_per_token, mfu, peak_flops, training_flops_per_token


def by_hand(d, layers, S, V, ffn_per_layer):
    """Multiply-adds of one token, times 2: q, k, v, o projections, scores and weighted sum over S
    positions, the FFNs, the LM head."""
    return 2 * (layers * (4 * d * d + 2 * d * S) + sum(ffn_per_layer) + d * V)


def test_dense_two_matrix_and_swiglu():
    config = tiny_config("dense", n_inner=40)  # d 32, 2 blocks, V 61
    assert forward_flops_per_token(config, 16) == by_hand(32, 2, 16, 61, [2 * 32 * 40] * 2)
    llama = tiny_config("dense", block="llama", n_inner=40)
    assert forward_flops_per_token(llama, 16) == by_hand(32, 2, 16, 61, [3 * 32 * 40] * 2)
    assert training_flops_per_token(config, 16) == 3 * forward_flops_per_token(config, 16)


def test_flop_matched_experts_cost_what_the_dense_ffn_costs_plus_the_routing():
    d, E, g = 32, 8, 4
    dense = tiny_config("dense", n_embd=d, moe_layers=[0, 1])
    mot = tiny_config("mot", n_embd=d, n_expert=E, group_size=g, expert_size=None, moe_layers=[0, 1])
    assert mot.expert_size * E // g == dense.n_inner  # flop-matched (design.md §3.6)
    routing = 3 * 2 * d * E  # controller, mixing into E, emitting back
    assert forward_flops_per_token(mot, 16) == forward_flops_per_token(dense, 16) + 2 * routing
    tc = tiny_config("token_choice", n_embd=d, n_expert=E, group_size=g, expert_size=mot.expert_size, num_experts_per_tok=E // g, moe_layers=[0, 1])
    assert forward_flops_per_token(tc, 16) == forward_flops_per_token(dense, 16) + 2 * 2 * d * E
    ec = tiny_config("expert_choice", n_embd=d, n_expert=E, group_size=g, expert_size=mot.expert_size, num_experts_per_tok=1, moe_layers=[0, 1])
    capacity = 1  # ceil(1 * g * k / E) = ceil(0.5)
    assert forward_flops_per_token(ec, 16) == by_hand(d, 2, 16, 61, [d * E + E * capacity / g * 2 * d * mot.expert_size] * 2)  # multiply-adds: router, experts


def test_mfu_and_the_peak_of_a_device(monkeypatch):
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv("MOT_TRANSITION_PEAK_TFLOPS", "100")
    assert peak_flops(torch.device("cpu")) == 100e12
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12}
    monkeypatch.delenv("MOT_TRANSITION_PEAK_TFLOPS")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: current)
    for current, peak in names.items():
        assert peak_flops(torch.device("cuda")) == peak
    current = "Some Future GPU"
    assert peak_flops(torch.device("cuda")) is None
    assert flops.PEAK_BF16
