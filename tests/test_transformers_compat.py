"""Our models follow the installed transformers' own conventions, so that an upstream rename arrives
with its deprecation path instead of a crash: outputs are transformers' output classes, and the KV
cache goes in and comes out under the new name (`cache`, transformers >= 5.24) and the old one
(`past_key_values`) alike."""

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)

from conftest import tiny_config
from mot_transition import (
    MoTForQuestionAnswering,
    MoTForSequenceClassification,
    MoTForTokenClassification,
    MoTLMHeadModel,
    MoTModel,
)
from mot_transition.outputs import CACHE_FIELD, _cache_field


def test_cache_field_is_the_one_the_output_class_of_either_transformers_generation_declares():
    @dataclass
    class Before524:
        past_key_values: object = None

    @dataclass
    class From524:
        cache: object = None

    assert _cache_field(Before524) == "past_key_values"
    assert _cache_field(From524) == "cache"
    assert CACHE_FIELD == _cache_field(MoeModelOutputWithPast)


@pytest.mark.parametrize(
    "model_class, upstream",
    [
        (MoTModel, MoeModelOutputWithPast),
        (MoTLMHeadModel, MoeCausalLMOutputWithPast),
        (MoTForSequenceClassification, SequenceClassifierOutputWithPast),
        (MoTForTokenClassification, TokenClassifierOutput),
        (MoTForQuestionAnswering, QuestionAnsweringModelOutput),
    ],
)
def test_every_head_returns_a_transformers_output_class_with_the_router_losses(model_class, upstream):
    model = model_class(tiny_config("token_choice")).eval()
    out = model(torch.randint(0, 61, (2, 6)))
    assert isinstance(out, upstream)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    assert out.z_loss is not None and torch.isfinite(out.z_loss)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_kv_cache_passed_under_either_name_continues_the_sequence_exactly(name):
    model = MoTLMHeadModel(tiny_config("token_choice")).eval()
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefix = model(ids[:, :6], use_cache=True)
        cache = getattr(prefix, name)
        assert cache is prefix.cache and cache.get_seq_length() == 6
        step = model(ids[:, 6:], use_cache=True, **{name: cache})
    assert torch.allclose(step.logits, full[:, 6:], atol=1e-5)
    assert step.cache.get_seq_length() == 9


def test_kv_cache_under_both_names_at_once_is_refused():
    model = MoTLMHeadModel(tiny_config("dense")).eval()
    ids = torch.randint(0, 61, (1, 4))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, :1], cache=cache, past_key_values=cache)


def test_forward_and_generate_log_no_deprecation_on_the_installed_transformers():
    # in a fresh process: transformers logs each deprecation once per process
    script = """
import torch, warnings
warnings.simplefilter("error", FutureWarning)
from mot_transition import MoTConfig, MoTLMHeadModel
config = MoTConfig(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, ffn_type="token_choice",
                   n_expert=4, expert_size=16, num_experts_per_tok=2)
model = MoTLMHeadModel(config).eval()
ids = torch.randint(0, 61, (2, 5))
out = model(ids, use_cache=True)
model(ids[:, :1], use_cache=True, cache=out.cache)
model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "deprecat" not in run.stderr.lower(), run.stderr


def _with_attention(config, implementation):
    config._attn_implementation = implementation
    return config


@pytest.mark.parametrize("ffn_type", ["dense", "token_choice", "mot"])
def test_eager_attention_gives_the_sdpa_logits_with_padding_and_with_a_cache(ffn_type):
    ids = torch.randint(0, 61, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    logits = []
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = MoTLMHeadModel(_with_attention(tiny_config(ffn_type), implementation)).eval()
        with torch.no_grad():
            prefix = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
            step = model(ids[:, 6:], attention_mask=mask, cache=prefix.cache, use_cache=True)
        logits.append(torch.cat([prefix.logits, step.logits], dim=1))
    assert torch.allclose(*logits, atol=1e-5)


def test_attention_weights_are_causal_rows_summing_to_one_that_never_attend_padding():
    model = MoTLMHeadModel(tiny_config("token_choice")).eval()  # sdpa configured: weights come from eager
    ids = torch.randint(0, 61, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
        plain = model(ids, attention_mask=mask)
    assert torch.allclose(out.logits, plain.logits, atol=1e-5)
    assert len(out.attentions) == model.config.n_layer
    for weights in out.attentions:
        assert weights.shape == (2, model.config.n_head, 7, 7)
        real_rows = mask[:, None, :].expand(2, model.config.n_head, 7).float()  # a padding position sees nothing
        assert torch.allclose(weights.sum(-1), real_rows)
        assert torch.all(weights.triu(1) == 0)  # nothing from the future
        assert torch.all(weights[1, :, 2:, :2] == 0)  # real tokens never see padding


@pytest.mark.parametrize(
    "model_class", [MoTModel, MoTLMHeadModel, MoTForSequenceClassification, MoTForTokenClassification, MoTForQuestionAnswering]
)
def test_config_output_flags_and_return_dict_false_are_honoured_by_every_class(model_class):
    config = tiny_config("token_choice", output_hidden_states=True, output_attentions=True)
    model = model_class(config).eval()
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        out = model(ids)
        assert len(out.hidden_states) == config.n_layer + 1 and len(out.attentions) == config.n_layer
        as_tuple = model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert len(as_tuple) == len(out.to_tuple())
    assert all(torch.equal(a, b) for a, b in zip(as_tuple, out.to_tuple()) if isinstance(a, torch.Tensor))
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(ids), tuple)


def test_lm_loss_is_transformers_loss_normalised_by_num_items_in_batch_and_takes_shift_labels():
    model = MoTLMHeadModel(tiny_config("token_choice")).eval()
    ids = torch.randint(0, 61, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: targets at 0, 1 (padding) and 2 (predicted from padding) do not count
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids)
        targets = ids[:, 1:].clone()
        targets[0, :2] = -100
        by_hand = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61), targets.reshape(-1))
        assert torch.allclose(out.lm_loss, by_hand, atol=1e-6)
        assert torch.allclose(out.loss, out.lm_loss + model.config.router_aux_loss_coef * out.aux_loss, atol=1e-6)
        counted = int((targets != -100).sum())
        summed = model(ids, attention_mask=mask, labels=ids, num_items_in_batch=torch.tensor(4 * counted))
        assert torch.allclose(summed.lm_loss, by_hand / 4, atol=1e-6)  # sum over the micro-batch / items in the batch
        shifted = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
        assert torch.allclose(model(ids, attention_mask=mask, shift_labels=shifted).lm_loss, by_hand, atol=1e-6)


@pytest.mark.parametrize("ffn_type", ["dense", "token_choice", "mot"])
def test_torch_export_traces_the_model_with_an_attention_mask_and_gives_the_same_logits(ffn_type):
    model = MoTLMHeadModel(tiny_config(ffn_type)).eval()
    ids = torch.randint(0, 61, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    exported = torch.export.export(model, (), inputs).module()
    padded = dict(inputs, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0, 1]), 0))
    with torch.no_grad():
        for case in (inputs, padded):  # the traced graph holds no branch on the mask's values
            out, expected = exported(**case), model(**case)
            torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
            if expected.aux_loss is not None:
                torch.testing.assert_close(out.aux_loss, expected.aux_loss)


def test_models_run_our_experts_by_default_and_transformers_ones_on_request(tmp_path):
    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config("token_choice")).eval()
    assert model.config._experts_implementation == "eager"
    model.save_pretrained(tmp_path)
    loaded = MoTLMHeadModel.from_pretrained(tmp_path, experts_implementation="grouped_mm").eval()
    assert loaded.config._experts_implementation == "grouped_mm"
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        loaded.set_experts_implementation("batched_mm")
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not supported"):
        loaded.set_experts_implementation("no_such_kernel")


def test_recorded_outputs_are_every_block_input_the_final_norm_and_the_router_logits_of_every_expert_layer():
    """Hidden states, attentions and router logits come from transformers' recording hooks
    (`_can_record_outputs`): checked against the blocks run by hand."""
    torch.manual_seed(0)
    model = MoTModel(tiny_config("token_choice")).eval()
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_router_logits=True, output_attentions=True)
        x = model.wte(ids) + model.wpe(torch.arange(5))
        expected_logits = []
        for i, block in enumerate(model.h):
            torch.testing.assert_close(out.hidden_states[i], x)
            x, logits, weights = block(x, output_attentions=True)
            torch.testing.assert_close(out.attentions[i], weights)
            if logits is not None:
                expected_logits.append(logits)
        torch.testing.assert_close(out.hidden_states[-1], model.ln_f(x))
    assert len(out.hidden_states) == model.config.n_layer + 1 and len(expected_logits) >= 1
    assert len(out.router_logits) == len(expected_logits)
    for recorded, expected in zip(out.router_logits, expected_logits):
        torch.testing.assert_close(recorded, expected)
    for head in (MoTLMHeadModel, MoTForSequenceClassification, MoTForTokenClassification, MoTForQuestionAnswering):
        with torch.no_grad():
            assert len(head(model.config).eval()(ids, output_router_logits=True).router_logits) == len(expected_logits)
