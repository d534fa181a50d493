import pytest
import torch

from mot_transition import MoTConfig

FFN_TYPES = ["dense", "mot", "token_choice", "expert_choice"]


def tiny_config(ffn_type: str = "mot", **overrides) -> MoTConfig:
    """A model small enough that every test runs in well under a second."""
    fields = dict(
        vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, ffn_type=ffn_type,
        n_expert=4, group_size=2, expert_size=16, num_experts_per_tok=2,
    )
    fields.update(overrides)
    return MoTConfig(**fields)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
