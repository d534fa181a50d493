"""Invariants of the whole model: causality, padding, batch (in)dependence, generation, save/load."""

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import BLOCKS, FFN_TYPES, tiny_config
from mot_transition import MoTConfig, MoTLMHeadModel

_block = {"style": "gpt2"}


@pytest.fixture(params=BLOCKS, autouse=True)
def block_style(request):
    """Every test of this file runs for both block styles: `model_of` builds the style of the run."""
    _block["style"] = request.param
    return request.param


def model_of(ffn_type, **overrides):
    return MoTLMHeadModel(tiny_config(ffn_type, block=_block["style"], **overrides)).eval()


@pytest.mark.parametrize("ffn_type", FFN_TYPES)
@pytest.mark.parametrize("training", [False, True])
def test_changing_a_token_changes_no_earlier_logits_of_any_sequence(ffn_type, training):
    # training mode with a capacity factor: dropping must be causal too
    model = model_of(ffn_type, capacity_factor=1.0).train(training)
    ids = torch.randint(0, 61, (4, 10))
    t = 6
    changed = ids.clone()
    changed[1, t] = (ids[1, t] + 1) % 61
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :t], after[:, :t])
    assert not torch.equal(before[1, t], after[1, t])  # and the change is seen


@pytest.mark.parametrize("ffn_type", FFN_TYPES)
def test_tokens_under_attention_mask_zeros_change_no_real_logits(ffn_type):
    model = model_of(ffn_type)
    ids = torch.randint(0, 61, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    mask[3, 4] = 0  # a hole
    changed = torch.where(mask.bool(), ids, (ids + 7) % 61)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        after = model(changed, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(before).all()
    assert torch.allclose(before[real], after[real], atol=1e-6, rtol=0)


@pytest.mark.parametrize("ffn_type", FFN_TYPES)
def test_loss_adds_router_losses_with_their_coefficients_and_stays_finite_under_padding(ffn_type):
    model = model_of(ffn_type, router_z_loss_coef=0.1).train()
    ids = torch.randint(0, 61, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if ffn_type == "token_choice":
        assert out.aux_loss > 0 and out.z_loss > 0
        expected = out.lm_loss + 0.01 * out.aux_loss + 0.1 * out.z_loss
        assert torch.allclose(out.loss, expected)
    else:
        assert out.aux_loss is None and torch.equal(out.loss, out.lm_loss)


@pytest.mark.parametrize("ffn_type", ["dense", "token_choice"])
def test_lm_loss_of_a_left_padded_sequence_equals_its_loss_alone(ffn_type):
    model = model_of(ffn_type)
    ids = torch.randint(1, 61, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(ids, labels=ids).lm_loss
        with_padding = model(padded, attention_mask=mask, labels=padded).lm_loss
    assert torch.allclose(alone, with_padding, atol=1e-6)


@pytest.mark.parametrize("ffn_type", FFN_TYPES)
def test_bf16_autocast_forward_and_backward_run_for_every_layer_kind(ffn_type):
    model = model_of(ffn_type, capacity_factor=1.0).train()
    ids = torch.randint(0, 61, (4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for logits in out.router_logits or ():
        assert logits.dtype == torch.float32  # router math never runs in half precision


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 61, (4, 8))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = model_of("mot").train()
        if checkpointing:  # transformers 5.24 renamed gradient_checkpointing_enable, keeping the old name
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
        model(ids, labels=ids).loss.backward()  # the config's use_cache=True: no cache is built in training
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_token_choice_sequence_alone_equals_it_inside_a_batch_while_mot_mixes():
    ids = torch.randint(0, 61, (8, 10))
    with torch.no_grad():
        tc = model_of("token_choice", capacity_factor=1.0)  # eval: dropless, whatever the factor
        assert torch.allclose(tc(ids[:1]).logits[0], tc(ids).logits[0], atol=1e-5)
        mot = model_of("mot", group_size=4)
        other = ids.clone()
        other[1] = torch.randint(0, 61, (10,))  # another sequence of the first group
        assert not torch.allclose(mot(ids).logits[0], mot(other).logits[0], atol=1e-4)
        other = ids.clone()
        other[5] = torch.randint(0, 61, (10,))  # a sequence of the second group
        assert torch.equal(mot(ids).logits[0], mot(other).logits[0])


@pytest.mark.parametrize("ffn_type", FFN_TYPES)
def test_greedy_generation_is_the_same_with_and_without_kv_cache(ffn_type):
    model = model_of(ffn_type)
    prompt = torch.randint(1, 61, (4, 5))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kw)
    without = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (4, 13)


@pytest.mark.parametrize("ffn_type", FFN_TYPES)
def test_greedy_generation_with_left_padding_is_the_same_with_and_without_cache(ffn_type):
    model = model_of(ffn_type)
    prompt = torch.randint(1, 61, (4, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    prompt[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_token_choice_prompt_generated_alone_equals_it_inside_a_left_padded_batch():
    model = model_of("token_choice")
    short = torch.randint(1, 61, (1, 4))
    long = torch.randint(1, 61, (2, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    alone = model.generate(short, **kw)[0, 4:]
    batched = model.generate(batch, attention_mask=mask, **kw)[0, 7:]
    assert torch.equal(alone, batched)


@pytest.mark.parametrize("ffn_type", FFN_TYPES)
def test_save_and_auto_load_round_trip_gives_identical_logits_and_only_safetensors(ffn_type, tmp_path):
    model = model_of(ffn_type)
    model.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MoTLMHeadModel and isinstance(AutoConfig.from_pretrained(tmp_path), MoTConfig)
    ids = torch.randint(0, 61, (4, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    names = dict(loaded.named_parameters())
    if ffn_type != "dense":
        for tensor in ("controller", "lin1", "lin2"):
            assert f"transformer.h.1.mlp.{tensor}" in names


def test_one_checkpoint_loads_into_every_expert_layer_kind(tmp_path):
    model_of("mot").save_pretrained(tmp_path)
    for ffn_type in ("token_choice", "expert_choice"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, ffn_type=ffn_type)
        assert loaded.config.ffn_type == ffn_type
        assert torch.equal(loaded.transformer.h[1].mlp.lin1, MoTLMHeadModel.from_pretrained(tmp_path).transformer.h[1].mlp.lin1)


def test_router_logits_are_returned_on_request_for_every_expert_layer():
    model = model_of("token_choice", n_layer=4)
    out = model(torch.randint(0, 61, (2, 5)), output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (10, 4)


def test_set_group_size_one_makes_mot_batch_independent():
    model = model_of("mot", group_size=4)
    model.set_group_size(1)
    ids = torch.randint(0, 61, (4, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids[2:3]).logits[0], model(ids).logits[2], atol=1e-5)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(group_size=0), "group_size"),
        (dict(ffn_type="switch"), "ffn_type"),
        (dict(moe_layers=[2]), "moe_layers"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(mot_temperature=0.0), "mot_temperature"),
        (dict(activation_function="nope"), "activation_function"),
        (dict(block="bert"), "block"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(block="llama", n_embd=12, n_head=4), "head size"),
        # issue 13 (items 4, 7, 8): out of range, non-finite, or of the wrong type
        (dict(layer_norm_epsilon=-5), "layer_norm_epsilon"),
        (dict(initializer_range=-1.0), "initializer_range"),
        (dict(mot_temperature=float("inf")), "mot_temperature"),
        (dict(capacity_factor=float("inf")), "capacity_factor"),
        (dict(router_aux_loss_coef=float("nan")), "router_aux_loss_coef"),
        (dict(n_expert=32.0), "n_expert"),
        (dict(moe_layers="ab"), "moe_layers"),
        (dict(expert_size=1.5), "expert_size"),
    ],
)
def test_config_rejects_what_cannot_work_with_a_message_naming_the_field(overrides, words):
    overrides = dict(overrides)
    with pytest.raises(ValueError, match=words):
        tiny_config(overrides.pop("ffn_type", "mot"), **overrides)


def test_config_aliases_and_defaults():
    config = MoTConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, max_position_embeddings=128, n_expert=16, group_size=8)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (64, 6, 4, 128)
    assert config.moe_layers == [3, 4, 5]  # the second half of the blocks
    assert config.expert_size == 4 * 64 * 8 // 16  # flop-matched
    assert config.n_inner == 256


def test_llama_style_defaults_are_swiglu_silu_qk_norm_and_widths_matching_the_flops_of_gpt2():
    llama = MoTConfig(block="llama", n_embd=128, n_head=4, n_expert=32, group_size=16)
    gpt2 = MoTConfig(n_embd=128, n_head=4, n_expert=32, group_size=16)
    assert (llama.activation_function, llama.qk_norm, llama.gated) == ("silu", True, True)
    assert (gpt2.activation_function, gpt2.qk_norm, gpt2.gated) == ("relu", False, False)
    # three matrices of 8d/3 cost what two of 4d do; rounded to multiples of 8
    assert llama.n_inner == 344 and 3 * llama.n_inner == pytest.approx(2 * gpt2.n_inner, rel=0.01)
    assert llama.expert_size == 168 and 3 * llama.expert_size == pytest.approx(2 * gpt2.expert_size, rel=0.02)
    explicit = MoTConfig(block="llama", n_embd=64, n_head=4, activation_function="gelu", qk_norm=False, n_inner=100)
    assert (explicit.activation_function, explicit.qk_norm, explicit.n_inner) == ("gelu", False, 100)
