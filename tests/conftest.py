import pytest
import torch

from mot_transition import MoTConfig

FFN_TYPES = ["dense", "mot", "token_choice", "expert_choice"]
BLOCKS = ["gpt2", "llama"]


def tiny_config(ffn_type: str = "mot", **overrides) -> MoTConfig:
    """A model small enough that every test runs in well under a second."""
    fields = dict(
        vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, ffn_type=ffn_type,
        n_expert=4, group_size=2, expert_size=16, num_experts_per_tok=2,
    )
    fields.update(overrides)
    return MoTConfig(**fields)


def plain_ffn(z, w1, w2, gated=False):
    """An FFN written out: relu(z w1) w2, or SwiGLU, silu(z gate) * (z up) w2 with w1 = [gate | up]."""
    if not gated:
        return torch.relu(z @ w1) @ w2
    f = w2.shape[0]
    gate, up = z @ w1[..., :f], z @ w1[..., f:]
    return (gate * torch.sigmoid(gate) * up) @ w2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, saying why, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def run_cli(args, capsys):
    """Run `mot-transition ARGS` in this process as a user would: (exit code, stdout, stderr)."""
    import sys

    from mot_transition.cli import main

    capsys.readouterr()  # drop what the test printed before
    argv = sys.argv
    sys.argv = ["mot-transition", *[str(a) for a in args]]
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err
