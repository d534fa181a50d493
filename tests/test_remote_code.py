"""Every checkpoint we write loads in plain transformers without this package
(`trust_remote_code=True`): save writes `auto_map` and the files generated from our sources."""

import ast
import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from mot_transition import (
    MoTForQuestionAnswering,
    MoTForSequenceClassification,
    MoTForTokenClassification,
    MoTLMHeadModel,
    MoTModel,
)
from mot_transition.convert import convert_checkpoint
from mot_transition.remote_code import MODELING_MODULES, PACKAGE, generated_sources

# in a process where importing mot_transition fails: load each folder with the Auto class named
# beside it, run it on the saved input ids, save the first output tensor
PLAIN_LOADER = """
import sys
sys.modules["mot_transition"] = None
import torch, transformers
torch.set_num_threads(1)  # as the test computes what it expects: the same reduction order, however loaded the machine
for folder, auto in zip(sys.argv[1::2], sys.argv[2::2]):
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        out = model(torch.load(folder + "/ids.pt"))
    torch.save(out[0], folder + "/out.pt")
    if folder.endswith("-resave"):  # saved again by the remote class: transformers copies its files
        model.save_pretrained(folder + "/again")
"""

HEADS = {
    "AutoModel": MoTModel, "AutoModelForCausalLM": MoTLMHeadModel,
    "AutoModelForSequenceClassification": MoTForSequenceClassification,
    "AutoModelForTokenClassification": MoTForTokenClassification,
    "AutoModelForQuestionAnswering": MoTForQuestionAnswering,
}


def load_plainly(folders_and_autos):
    args = [str(x) for pair in folders_and_autos for x in pair]
    done = subprocess.run([sys.executable, "-c", PLAIN_LOADER, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def one_thread():
    """One torch thread, as PLAIN_LOADER uses: equal outputs are then bit-equal on a loaded machine
    too (with several threads a reduction's order can differ between two processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_head_of_every_kind_and_style_loads_without_the_package_with_identical_outputs(tmp_path, one_thread):
    cases, expected = [], {}
    ids = torch.randint(0, 61, (4, 7))
    for block in ("gpt2", "llama"):
        for ffn_type in ("dense", "mot", "token_choice", "expert_choice"):
            for auto, cls in HEADS.items():
                if auto != "AutoModelForCausalLM" and ffn_type != "token_choice":
                    continue  # the heads once, on the routed kind
                folder = tmp_path / f"{block}-{ffn_type}-{auto}"
                model = cls(tiny_config(ffn_type, block=block, num_labels=3)).eval()
                model.save_pretrained(folder)
                torch.save(ids, folder / "ids.pt")
                with torch.no_grad():
                    expected[folder] = model(ids)[0]
                cases.append((folder, auto))
    load_plainly(cases)
    for folder, _ in cases:
        assert torch.equal(torch.load(folder / "out.pt"), expected[folder]), folder.name


def test_a_converted_checkpoint_and_a_registered_class_load_too_and_nothing_is_half_written(tmp_path, one_thread):
    mot = MoTLMHeadModel(tiny_config("mot", block="llama", mot_temperature=0.5)).eval()
    mot.save_pretrained(tmp_path / "mot")
    convert_checkpoint(tmp_path / "mot", tmp_path / "tc")
    # transformers' own way, register_for_auto_class + save_pretrained, failed on the package's
    # relative imports and left a half-written directory; now it saves as any save does
    MoTLMHeadModel.register_for_auto_class("AutoModelForCausalLM")
    mot.save_pretrained(tmp_path / "registered-resave")
    ids = torch.randint(0, 61, (4, 6))
    tc = MoTLMHeadModel.from_pretrained(tmp_path / "tc").eval()
    with torch.no_grad():
        expected = {"tc": tc(ids)[0], "registered-resave": mot(ids)[0]}  # what the loader saves: the first output
    for name in expected:
        torch.save(ids, tmp_path / name / "ids.pt")
    load_plainly([(tmp_path / "tc", "AutoModelForCausalLM"), (tmp_path / "registered-resave", "AutoModelForCausalLM")])
    for name, logits in expected.items():
        assert torch.equal(torch.load(tmp_path / name / "out.pt"), logits), name
    again = tmp_path / "registered-resave" / "again"
    assert {"configuration_mot.py", "modeling_mot.py"} <= {p.name for p in again.iterdir()}
    assert json.loads((again / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].endswith("MoTLMHeadModel")


def test_generated_files_come_from_the_package_sources_and_import_nothing_of_it():
    files = generated_sources()
    modeling = files["modeling_mot.py"]
    for text in files.values():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module == "configuration_mot"
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) else []
            assert not any(name and name.startswith("mot_transition") for name in names)
    # every class and function of the inlined modules is there, word for word
    for module in MODELING_MODULES:
        source = (PACKAGE / module).read_text()
        for node in ast.parse(source).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                assert ast.get_source_segment(source, node) in modeling, f"{module}: {node.name}"
    assert "class MoTConfig(PreTrainedConfig)" in files["configuration_mot.py"]


@pytest.mark.parametrize("auto", ["AutoConfig", "AutoModelForCausalLM"])
def test_with_the_package_imported_the_package_classes_still_load_without_trust_remote_code(auto, tmp_path):
    import transformers

    MoTLMHeadModel(tiny_config("dense")).save_pretrained(tmp_path)
    loaded = getattr(transformers, auto).from_pretrained(tmp_path)
    assert type(loaded).__module__.startswith("mot_transition.")


def test_a_save_never_fails_for_want_of_the_generated_code(tmp_path, monkeypatch):
    """An install without the .py sources still saves (training checkpoints must), with a warning,
    and without an auto_map that would point at files it could not write."""
    from mot_transition import remote_code

    monkeypatch.setattr(remote_code, "_SOURCES", None)
    remote_code.generated_sources.cache_clear()
    config = tiny_config("dense")
    try:
        with pytest.warns(UserWarning, match="without the code"):
            MoTLMHeadModel(config).save_pretrained(tmp_path)
    finally:
        remote_code.generated_sources.cache_clear()
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    assert not (tmp_path / "modeling_mot.py").exists() and (tmp_path / "model.safetensors").exists()


def test_our_auto_map_replaces_a_stale_one(tmp_path):
    config = tiny_config("dense")
    config.auto_map = {"AutoModelForCausalLM": "someone/else--modeling_x.Model", "AutoTokenizer": "tok.Tok"}
    MoTLMHeadModel(config).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_mot.MoTLMHeadModel" and auto_map["AutoTokenizer"] == "tok.Tok"


@pytest.mark.parametrize("addition, words", [
    ("\ndef activate(h):\n    return h\n", "both define activate"),  # experts.py defines it already
    ("\nfrom math import inf as F\n", "imports a different F"),  # F is torch.nn.functional elsewhere
])
def test_generation_refuses_modules_that_would_clash_in_one_file(addition, words, monkeypatch):
    from mot_transition import remote_code

    sources = dict(remote_code._SOURCES)
    sources["layers/dense.py"] += addition
    monkeypatch.setattr(remote_code, "_SOURCES", sources)
    remote_code.generated_sources.cache_clear()
    try:
        with pytest.raises(ValueError, match=words):
            remote_code.generated_sources()
    finally:
        remote_code.generated_sources.cache_clear()
