import argparse
import contextlib
import hashlib
import importlib.util
from pathlib import Path

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


def needs(*modules: str, install: str) -> pytest.MarkDecorator:
    """Skip, saying which modules are missing and how to install them, unless every one is importable:
    for the tests of optional extras that `pip install -e ".[dev]"` leaves out."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed ({install})")


LM_EVAL = needs("lm_eval", install="pip install 'mot-transition[eval]'")
PYARROW = needs("pyarrow", install="pip install pyarrow")
DATASETS = needs("datasets", install="pip install datasets")


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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small real-text corpus (40 KB of argparse.py) and a data cache shared by a module's runs."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "corpus.txt").write_text(Path(argparse.__file__).read_text()[:40_000])
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A saved 300-token byte-level BPE (what `prepare --tokenizer` takes), trained on short lines."""
    from mot_transition.data.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    lines = [f"document {i}: the {'quick ' * (i % 7)}brown fox {i * 37} jumps\nover line {i}." for i in range(60)]
    train_bpe_tokenizer(lines, 300).save_pretrained(path)
    return path


def saved_model(folder: Path, ffn_type: str, tokenizer_dir: Path) -> Path:
    """A tiny untrained model of `ffn_type` with the tokenizer of `tokenizer_dir`, saved in `folder`."""
    from transformers import AutoTokenizer

    from mot_transition.modeling import MoTLMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    MoTLMHeadModel(tiny_config(ffn_type, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tree_digest(path: Path) -> str:
    """One hash of every file under `path`, names and bytes: equal before and after means untouched."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def interrupted_after(step: int):
    """Within the block, `Trainer.step` raises KeyboardInterrupt (as a kill would stop the run) when
    asked for the step after `step`: step `step` is done and its metrics line written."""
    from mot_transition.train import Trainer

    original = Trainer.step

    def die_after(self):
        if self.step_count == step:
            raise KeyboardInterrupt("killed")
        return original(self)

    Trainer.step = die_after
    try:
        yield
    finally:
        Trainer.step = original
