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
from mot_transition.modeling import CACHE_FIELD, _cache_field


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
