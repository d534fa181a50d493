"""What the toolkit writes has the mode any file gets under the user's umask: safetensors' writer
makes its files private (0600), which would leave checkpoints and exports unreadable by the user's
group or by a server running as another user."""

import os
import stat
from contextlib import contextmanager

import pytest
import torch

from conftest import tiny_config
from mot_transition import MoTLMHeadModel
from mot_transition.convert import convert_checkpoint
from mot_transition.destinations import unprivate_safetensors
from mot_transition.export import export_checkpoint
from mot_transition.train.checkpoint import save_checkpoint


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield 0o666 & ~mask
    finally:
        os.umask(old)


def modes(folder) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_training_checkpoints_follow_the_umask(tmp_path, mask):
    model = MoTLMHeadModel(tiny_config("token_choice"))
    optimizer = torch.optim.AdamW(model.parameters())
    with umask(mask) as expected:
        path = save_checkpoint(tmp_path / "run", 1, model, None, optimizer, {}, {"cpu": torch.zeros(4, dtype=torch.uint8)})
    found = modes(path)
    assert "model.safetensors" in found and "training_state.safetensors" in found
    assert set(found.values()) == {expected}, found


def test_conversions_and_exports_follow_the_umask(tmp_path):
    MoTLMHeadModel(tiny_config("mot", block="llama")).save_pretrained(tmp_path / "mot")  # its weights: 0600
    with umask(0o022) as expected:  # convert writes its tensors itself; export through safetensors' writer
        convert_checkpoint(tmp_path / "mot", tmp_path / "tc")
        export_checkpoint(tmp_path / "tc", tmp_path / "native", verify=False)
    for folder in ("tc", "native"):
        found = modes(tmp_path / folder)
        assert any(name.endswith(".safetensors") for name in found)
        assert set(found.values()) == {expected}, (folder, found)


def test_only_private_safetensors_files_change(tmp_path):
    for name, mode in (("a.safetensors", 0o600), ("b.safetensors", 0o640), ("c.json", 0o600)):
        (tmp_path / name).write_bytes(b"x")
        os.chmod(tmp_path / name, mode)
    with umask(0o002):
        unprivate_safetensors(tmp_path)
    assert modes(tmp_path) == {"a.safetensors": 0o664, "b.safetensors": 0o640, "c.json": 0o600}
