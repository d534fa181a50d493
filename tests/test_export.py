"""Export to native transformers architectures (docs/design.md §8.4): a llama-style Token Choice checkpoint
becomes Qwen3-MoE, a dense one Qwen3; loaded by plain transformers in a process that cannot import
this package, the export gives our logits (float32, <= 1e-4) and our greedy tokens."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import run_cli, tiny_config
from mot_transition import MoTLMHeadModel
from mot_transition.convert import convert_checkpoint
from mot_transition.export import export_checkpoint

# loads an exported directory with transformers alone and saves its logits on the given prompts
PLAIN_LOADER = """
import sys
sys.modules["mot_transition"] = None  # importing this package fails in this process
try:
    import mot_transition
    raise SystemExit("mot_transition is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
    greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "greedy": greedy, "class": type(model).__name__}, sys.argv[3])
"""


def llama_model(ffn_type="token_choice", **overrides):
    """A llama-style model with norms away from 1 and a sharp router, so that every mapped tensor matters."""
    fields = dict(block="llama", n_layer=4, moe_layers=[1, 3], n_expert=8, num_experts_per_tok=2, rope_theta=500.0)
    fields.update(overrides)
    model = MoTLMHeadModel(tiny_config(ffn_type, **fields)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.uniform_(0.5, 1.5)
            elif name.endswith("controller"):
                param.normal_(0, 1.0)
    return model


def run_plain(folder, ids, tmp_path):
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", PLAIN_LOADER, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True, capture_output=True, timeout=300,
    )
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("ffn_type, target, architecture", [
    ("token_choice", "qwen3_moe", "Qwen3MoeForCausalLM"),
    ("dense", "qwen3", "Qwen3ForCausalLM"),
])
def test_export_loads_in_plain_transformers_with_our_logits_and_greedy_tokens(ffn_type, target, architecture, tmp_path):
    model = llama_model(ffn_type)
    model.save_pretrained(tmp_path / "ours")
    report = export_checkpoint(tmp_path / "ours", tmp_path / "native", target)
    assert report.max_abs_logit_difference <= 1e-4 and report.same_greedy_tokens
    ids = torch.randint(0, 61, (3, 16))
    plain = run_plain(tmp_path / "native", ids, tmp_path)
    with torch.no_grad():
        ours = model(ids).logits
        greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert plain["class"] == architecture
    assert (plain["logits"] - ours).abs().max() <= 1e-4
    assert torch.equal(plain["greedy"], greedy)
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["model_type"] == target and "auto_map" not in config
    if target == "qwen3_moe":
        assert config["mlp_only_layers"] == [0, 2] and config["norm_topk_prob"] is False
        assert (config.get("num_experts", config.get("num_local_experts")), config["num_experts_per_tok"]) == (8, 2)


def test_experts_are_written_one_tensor_per_expert_as_serving_engines_read_them(tmp_path):
    """transformers' own save reverts its in-memory layout (its weight-conversion mapping): the
    files hold `mlp.experts.{e}.gate_proj / up_proj / down_proj` as Qwen3-MoE checkpoints do."""
    llama_model().save_pretrained(tmp_path / "ours")
    export_checkpoint(tmp_path / "ours", tmp_path / "native", verify=False)
    names = set()
    for file in (tmp_path / "native").glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            names.update(handle.keys())
    for e in range(8):
        for matrix in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{matrix}.weight" in names
    assert "model.layers.1.mlp.gate.weight" in names and "model.layers.0.mlp.gate_proj.weight" in names


def test_a_converted_mot_model_exports_with_its_temperature_folded_into_the_router(tmp_path):
    """The documented path: MoT (llama style, temperature 0.1) -> convert -> export -> plain transformers."""
    mot = llama_model("mot", group_size=4, mot_temperature=0.1, num_experts_per_tok=1)
    mot.save_pretrained(tmp_path / "mot")
    convert_checkpoint(tmp_path / "mot", tmp_path / "tc")
    report = export_checkpoint(tmp_path / "tc", tmp_path / "native")
    assert report.max_abs_logit_difference <= 1e-4 and report.same_greedy_tokens
    tc = MoTLMHeadModel.from_pretrained(tmp_path / "tc").eval()
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        assert (run_plain(tmp_path / "native", ids, tmp_path)["logits"] - tc(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("build, args, words", [
    (lambda: MoTLMHeadModel(tiny_config("token_choice")), [], "llama block style"),
    (lambda: llama_model("mot", group_size=4), [], "convert it to Token Choice first"),
    (lambda: llama_model("expert_choice", group_size=4), [], "Expert Choice"),
    (lambda: llama_model(capacity_factor=1.25), [], "--dropless"),
    (lambda: llama_model(qk_norm=False), [], "qk_norm"),
    (lambda: llama_model("dense"), [], "--to qwen3"),
    (lambda: llama_model(), ["--to", "qwen3"], "qwen3_moe"),
    (lambda: llama_model(), ["--to", "mixtral"], "unknown export target"),
])
def test_export_refuses_what_the_target_cannot_represent_in_one_line_and_writes_nothing(build, args, words, tmp_path, capsys):
    build().save_pretrained(tmp_path / "ours")
    code, _, err = run_cli(["export", tmp_path / "ours", tmp_path / "native", *args], capsys)
    assert code == 1 and words in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


def test_dropless_exports_a_model_trained_with_a_capacity_factor(tmp_path):
    llama_model(capacity_factor=1.25).save_pretrained(tmp_path / "ours")
    report = export_checkpoint(tmp_path / "ours", tmp_path / "native", dropless=True)
    assert report.max_abs_logit_difference <= 1e-4


def test_cli_export_as_a_user_types_it_and_force_replaces_only_an_export(tmp_path, capsys):
    llama_model().save_pretrained(tmp_path / "ours")
    code, out, _ = run_cli(["export", tmp_path / "ours", tmp_path / "native"], capsys)
    assert code == 0 and "Qwen3MoeForCausalLM" in out and "same greedy tokens" in out
    assert (tmp_path / "native" / "export_report.json").is_file() and (tmp_path / "native" / "config.json").is_file()
    code, _, err = run_cli(["export", tmp_path / "ours", tmp_path / "native"], capsys)
    assert code == 1 and "--force" in err
    code, _, _ = run_cli(["export", tmp_path / "ours", tmp_path / "native", "--force", "--no-verify"], capsys)
    assert code == 0
    (tmp_path / "native" / "notes.txt").write_text("keep me")  # an export of ours, with a file it did not write
    code, _, err = run_cli(["export", tmp_path / "ours", tmp_path / "native", "--force", "--no-verify"], capsys)
    assert code == 1 and "notes.txt" in err and (tmp_path / "native" / "notes.txt").read_text() == "keep me"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["export", tmp_path / "ours", tmp_path / "mine", "--force"], capsys)
    assert code == 1 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    code, _, err = run_cli(["export", tmp_path / "ours", tmp_path / "model.gguf"], capsys)  # a folder named like a GGUF file
    assert code == 1 and "pass --to gguf" in err and not (tmp_path / "model.gguf").exists()


def test_an_export_that_does_not_reproduce_our_model_is_not_written(tmp_path, monkeypatch):
    import mot_transition.export as export

    llama_model().save_pretrained(tmp_path / "ours")
    monkeypatch.setattr(export, "compare_with_export", lambda model, folder: (3e-2, True))
    with pytest.raises(ValueError, match="differs from ours"):
        export_checkpoint(tmp_path / "ours", tmp_path / "native")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]  # neither the export nor its staging


def test_left_padded_batches_give_our_logits_and_greedy_tokens(tmp_path):
    """What a server batches: left-padded prompts, positions counted over real tokens."""
    from mot_transition.export import to_native

    model = llama_model()
    native = to_native(model)
    ids = torch.randint(1, 61, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions).logits
        theirs = native(ids, attention_mask=mask, position_ids=positions).logits
        assert (ours - theirs)[mask.bool()].abs().max() <= 1e-4
        greedy = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **greedy), native.generate(ids, **greedy))


def test_a_bfloat16_export_is_checked_against_our_model_with_the_same_rounded_weights(tmp_path):
    llama_model().save_pretrained(tmp_path / "ours")
    report = export_checkpoint(tmp_path / "ours", tmp_path / "native", dtype="bfloat16")
    assert report.dtype == "bfloat16" and report.max_abs_logit_difference <= 1e-4 and report.same_greedy_tokens
    with safe_open(tmp_path / "native" / "model.safetensors", "pt") as handle:
        assert handle.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
