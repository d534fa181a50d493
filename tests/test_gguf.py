"""`mot-transition export SRC DST.gguf --to gguf` (issue 28): the file holds what llama.cpp's hy_v3
reads, computes our logits (checked against a plain implementation of that graph read from the file
alone, tests/gguf_reference.py; and against llama.cpp itself where llama-cpp-python is installed),
carries a tokenizer llama.cpp splits as we do, and bad input is one line that writes nothing."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install 'mot-transition[gguf]')")

from conftest import run_cli  # noqa: E402
from gguf_reference import forward, read_gguf  # noqa: E402
from mot_transition.config import MoTConfig  # noqa: E402
from mot_transition.gguf_export import MARK, SHARED_WIDTH, export_gguf, gguf_tensors  # noqa: E402
from mot_transition.modeling import MoTLMHeadModel  # noqa: E402

TEXTS = [
    "def f(x):\n    return x  +  1\n\n\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\t\t  \n}",
    "naïve café — Ünïcödé 東京 🙂  ",
    "0123456789 3.14159 1e-3 0x7fff",
    "trailing spaces   \n  leading",
]


def checkpoint(folder, tied=True, norm_topk_prob=False, ffn_type="token_choice", block="llama", expert_size=48):
    """A llama-style Token Choice model whose dense blocks are not only leading (0 and 2 dense, 1 and 3
    sparse), with weights far from their init (so a wrong mapping cannot hide in tiny logits), and
    a byte-level BPE tokenizer trained on TEXTS."""
    from mot_transition.data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(TEXTS * 20, 300)
    config = MoTConfig(
        vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=4, n_head=4, block=block, ffn_type=ffn_type,
        moe_layers=[1, 3], n_expert=4, group_size=2, expert_size=expert_size, num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob, tie_word_embeddings=tied, eos_token_id=0, bos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = MoTLMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") or ".ln_" in name or "ln_f" in name
                    else 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tc") / "ckpt"
    model, tokenizer = checkpoint(folder)
    return folder, model, tokenizer


def prompts(tokenizer):
    return [tokenizer(text)["input_ids"][:40] for text in TEXTS[:3]]


def test_the_file_holds_what_hy_v3_reads(tc, tmp_path):
    folder, model, tokenizer = tc
    path = tmp_path / "m.gguf"
    report = export_gguf(folder, path, "f32")
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == "hy_v3" and fields[MARK] == str(folder.resolve())
    assert fields["hy_v3.block_count"] == 4 and fields["hy_v3.expert_count"] == 4 and fields["hy_v3.expert_used_count"] == 2
    assert fields["hy_v3.expert_gating_func"] == 1 and fields["hy_v3.expert_weights_norm"] is False
    assert fields["hy_v3.expert_feed_forward_length"] == 48 and fields["hy_v3.attention.key_length"] == 16
    assert report.sparse_layers == [1, 3] and report.dense_layers == [0, 2]
    assert {n for n in tensors if "ffn_gate_inp" in n} == {"blk.1.ffn_gate_inp.weight", "blk.3.ffn_gate_inp.weight"}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    expected = gguf_tensors(model)
    assert set(tensors) == set(expected)
    for name, array in expected.items():
        assert np.array_equal(tensors[name].numpy(), array), name
    assert tensors["blk.1.ffn_gate_exps.weight"].shape == (4, 48, 64) and tensors["blk.1.ffn_down_exps.weight"].shape == (4, 64, 48)
    assert tensors["blk.1.ffn_up_shexp.weight"].shape == (SHARED_WIDTH, 64) and not tensors["blk.1.ffn_up_shexp.weight"].any()
    assert json.loads(path.with_name("m.gguf.json").read_text())["tensors"] == len(expected)


@pytest.mark.parametrize("tied, norm_topk_prob", [(True, False), (False, True)])
def test_the_hy_v3_graph_computes_our_logits(tmp_path, tied, norm_topk_prob):
    model, tokenizer = checkpoint(tmp_path / "ckpt", tied=tied, norm_topk_prob=norm_topk_prob)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    for ids in prompts(tokenizer):
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].double()
        theirs = forward(fields, tensors, ids)
        assert ours.std() > 1  # logits far from zero: a wrong mapping would show
        assert (ours - theirs).abs().max() < 1e-4


def test_the_reference_tells_a_wrong_mapping_apart(tc, tmp_path):
    """The oracle can fail: with the gate and up matrices of the experts swapped, it disagrees."""
    folder, model, tokenizer = tc
    export_gguf(folder, tmp_path / "m.gguf", "f32")
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    ids = prompts(tokenizer)[0]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double()
    for a, b in (("ffn_gate_exps", "ffn_up_exps"), ("attn_q", "attn_k")):
        swapped = dict(tensors)
        swapped[f"blk.1.{a}.weight"], swapped[f"blk.1.{b}.weight"] = tensors[f"blk.1.{b}.weight"], tensors[f"blk.1.{a}.weight"]
        assert (ours - forward(fields, swapped, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("outtype, bound", [("f16", 0.005), ("bf16", 0.04), ("q8_0", 0.1)])
def test_lower_precision_files_stay_close_and_keep_norms_and_routers_in_f32(tc, tmp_path, outtype, bound):
    folder, model, tokenizer = tc
    report = export_gguf(folder, tmp_path / "m.gguf", outtype)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == types["blk.0.attn_q_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == outtype.upper()
    if outtype == "q8_0":  # rows of 48 (the experts' down projection's input) are not q8_0 blocks of 32
        assert types["blk.1.ffn_down_exps.weight"] == "F16" and "blk.1.ffn_down_exps.weight" in report.f16_instead_of_q8_0
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    for name, array in gguf_tensors(model).items():  # each tensor rounded, in its place (a layout slip is far off)
        assert np.abs(tensors[name].numpy() - array).max() <= 0.005 * np.abs(array).max() + 1e-12, name
    ids = prompts(tokenizer)[1]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double()
    difference = (ours - forward(fields, tensors, ids)).abs()  # measured: f16 0.003, bf16 0.024, q8_0 0.075 (logits' std > 1)
    assert difference.mean() < bound  # the mean: a near-tie of two experts can flip one token's choice


def test_the_tokenizer_goes_with_it(tc, tmp_path):
    folder, _, tokenizer = tc
    export_gguf(folder, tmp_path / "m.gguf", "f16")
    fields, _ = read_gguf(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    spec = json.loads((folder / "tokenizer.json").read_text())
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges and len(merges) > 0
    assert fields["tokenizer.ggml.token_type"][0] == 3 and set(fields["tokenizer.ggml.token_type"][1:]) == {1}
    assert fields["tokenizer.ggml.eos_token_id"] == 0 and fields["tokenizer.ggml.add_bos_token"] is False


def test_the_cli_writes_a_gguf_file(tc, tmp_path, capsys):
    folder, _, _ = tc
    code, out, err = run_cli(["export", folder, tmp_path / "m.gguf", "--to", "gguf", "--outtype", "q8_0"], capsys)
    assert code == 0, err
    assert "hy_v3" in out and (tmp_path / "m.gguf").is_file()
    code, out, err = run_cli(["export", folder, tmp_path / "m.gguf", "--to", "gguf"], capsys)
    assert code == 1 and "already exists; pass --force" in err
    code, out, err = run_cli(["export", folder, tmp_path / "m.gguf", "--to", "gguf", "--force", "--outtype", "f32"], capsys)
    assert code == 0, err


def test_what_llama_cpp_would_run_differently_is_refused_in_one_line(tmp_path, capsys, tc):
    folder, _, _ = tc
    cases = []
    for name, kwargs, message in (
        ("mot", {"ffn_type": "mot"}, "convert it to Token Choice first"),
        ("gpt2", {"block": "gpt2"}, "only the llama block style"),
        ("dense", {"ffn_type": "dense"}, "export it --to qwen3"),
    ):
        checkpoint(tmp_path / name, **kwargs)
        cases.append((tmp_path / name, tmp_path / f"{name}.gguf", message))
    bad = tmp_path / "normalizer"
    checkpoint(bad)
    spec = json.loads((bad / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFC"}
    (bad / "tokenizer.json").write_text(json.dumps(spec))
    cases.append((bad, tmp_path / "normalizer.gguf", "llama.cpp would tokenise differently"))
    cases.append((folder, tmp_path / "m.bin", "ending in .gguf"))
    for src, dst, message in cases:
        code, _, err = run_cli(["export", src, dst, "--to", "gguf"], capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
        assert not dst.exists()
    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"GGUF not ours")
    code, _, err = run_cli(["export", folder, foreign, "--to", "gguf", "--force"], capsys)
    assert code == 1 and "not a GGUF file this toolkit wrote" in err and foreign.read_bytes() == b"GGUF not ours"
    assert not list(tmp_path.glob(".*writing*"))


def test_llama_cpp_itself_runs_the_export_as_we_do(tc, tmp_path):
    """Stock llama.cpp (llama-cpp-python from the package index; scripts/check-llama-cpp.sh installs it)
    loads the file and gives our logits at every position, our greedy tokens and our tokenisation."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/check-llama-cpp.sh installs it: it builds llama.cpp)")
    from mot_transition.llama_cpp_check import compare

    folder, _, _ = tc
    for outtype in ("f32", "f16"):
        export_gguf(folder, tmp_path / f"{outtype}.gguf", outtype)
    f32, f16 = compare(folder, [tmp_path / "f32.gguf", tmp_path / "f16.gguf"], new_tokens=8)
    assert f32["max_abs_logit_difference"] < 1e-3 and f32["same_greedy"] and f32["same_tokens"], f32
    assert f16["same_tokens"] and abs(f16["perplexity"] / f32["perplexity"] - 1) < 0.01, f16


def test_llama_cpp_rounds_the_inputs_of_products_as_ggml_does(tc, tmp_path):
    """Why an f16 file cannot meet 1e-3 against our float32 logits (docs/serving.md): ggml's CPU
    backend rounds every product's input activations to the weight's type (f16, bf16, q8_0 blocks).
    The plain graph of the file's own weights, with exactly that rounding added (gguf_reference's
    ggml_inputs), gives llama.cpp's logits to float32 precision at the positions where no input
    element falls on the other side of a rounding boundary (float32 against float64 sums: the
    reference computed in float32 against itself parts as much); without it, at none."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/check-llama-cpp.sh installs it: it builds llama.cpp)")
    from gguf_reference import ggml_inputs, read_types

    from mot_transition.llama_cpp_check import _llama, _logits

    folder, _, tokenizer = tc
    for outtype in ("f16", "bf16", "q8_0"):
        path = tmp_path / f"{outtype}.gguf"
        export_gguf(folder, path, outtype)
        fields, tensors = read_gguf(path)
        inputs_as = ggml_inputs(read_types(path))
        llm = _llama(path, 64, 2)
        exact, exact_without = [], []
        for ids in prompts(tokenizer):
            theirs = torch.from_numpy(_logits(llm, ids))
            exact.append((theirs - forward(fields, tensors, ids, inputs_as)).abs().max(1).values < 1e-5)
            exact_without.append((theirs - forward(fields, tensors, ids)).abs().max(1).values < 1e-5)
        llm.close()
        exact, exact_without = torch.cat(exact).double().mean(), torch.cat(exact_without).double().mean()
        assert exact > 0.1 and exact_without == 0, (outtype, exact, exact_without)  # measured: f16 20%, bf16 56%, q8_0 100%
