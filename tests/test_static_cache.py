"""The static KV cache and compiled decoding: dense and Token Choice models decode with transformers'
StaticCache, eagerly and under torch.compile(fullgraph=True), to the tokens of the dynamic cache;
models that mix batch rows (MoT, Expert Choice with g > 1) refuse it in one line. Custom 4-D masks
and padding-free (packed) batches go through the same mask builder."""

import pytest
import torch
from packaging.version import Version
from transformers.cache_utils import StaticCache

from conftest import tiny_config
from mot_transition import MoTLMHeadModel


def _prompt():
    ids = torch.randint(1, 61, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask


def _greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("ffn_type", ["dense", "token_choice"])
def test_static_cache_greedy_tokens_equal_the_dynamic_cache_ones_eager_and_compiled(ffn_type):
    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config(ffn_type)).eval()
    ids, mask = _prompt()
    dynamic = _greedy(model, ids, mask)
    assert torch.equal(_greedy(model, ids, mask, cache_implementation="static"), dynamic)
    torch.compiler.reset()
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)  # fails on any graph break
    assert torch.equal(_greedy(model, ids, mask, cache_implementation="static"), dynamic)


@pytest.mark.parametrize("ffn_type", ["mot", "expert_choice"])
def test_models_that_mix_batch_rows_refuse_a_static_cache_in_one_line(ffn_type):
    model = MoTLMHeadModel(tiny_config(ffn_type, group_size=2)).eval()
    ids, mask = _prompt()
    with pytest.raises(ValueError, match="mixes the tokens of 2 batch rows.*convert it to Token Choice") as error:
        _greedy(model, ids, mask, cache_implementation="static")
    assert "\n" not in str(error.value)
    per_sequence = MoTLMHeadModel(tiny_config(ffn_type, group_size=1)).eval()  # no mixing: served like any model
    static = _greedy(per_sequence, ids, mask, cache_implementation="static")
    assert torch.equal(static, _greedy(per_sequence, ids, mask))


def test_a_static_cache_passed_to_forward_gives_the_dynamic_cache_logits():
    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config("token_choice")).eval()
    ids, mask = _prompt()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = StaticCache(config=model.config, max_cache_len=12)
        prefix = model(ids[:, :3], attention_mask=mask[:, :3], cache=cache, use_cache=True)
        step = model(ids[:, 3:], attention_mask=mask, cache=cache, use_cache=True)
    real = mask.bool()
    torch.testing.assert_close(torch.cat([prefix.logits, step.logits], dim=1)[real], full[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ffn_type", ["dense", "token_choice"])
def test_a_custom_4d_mask_and_a_packed_batch_give_the_logits_of_separate_sequences(ffn_type):
    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config(ffn_type)).eval()
    a, b = torch.randint(1, 61, (1, 4)), torch.randint(1, 61, (1, 3))
    packed = torch.cat([a, b], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    block = torch.zeros(7, 7, dtype=torch.bool)
    block[:4, :4] = True
    block[4:, 4:] = True
    allowed = block & torch.ones(7, 7, dtype=torch.bool).tril()
    additive = torch.zeros(1, 1, 7, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        separate = torch.cat([model(a).logits, model(b).logits], dim=1)
        custom = model(packed, attention_mask=additive, position_ids=positions).logits
        padding_free = model(packed, position_ids=positions, use_cache=False).logits  # told apart by positions
    torch.testing.assert_close(custom, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padding_free, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    Version(torch.__version__.split("+")[0]) < Version("2.13"),
    reason="flex attention on CPU crashes the process with torch 2.6 (inside its compiled kernel); 2.13 runs it, "
    "versions between are untested",
)
def test_flex_attention_gives_the_sdpa_logits_with_left_padding():
    """Prefill only: on CPU, torch 2.13's inductor fails to compile flex attention's kernel for a
    decode step against a cache (a C++ codegen error in torch, not in the mask we pass)."""
    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config("token_choice", n_embd=64, n_head=4)).eval()  # flex needs head dim >= 16
    ids = torch.randint(1, 61, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits = []
    for implementation in ("sdpa", "flex_attention"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits.append(model(ids, attention_mask=mask, use_cache=False).logits[mask.bool()])
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
