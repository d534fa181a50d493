"""The libraries our users fine-tune with, on our models without workarounds: PEFT's LoRA on the
experts (3-D parameters, reached with `target_parameters`) and on attention, and
`transformers.Trainer` with gradient checkpointing. Router losses must stay part of the loss."""

import peft  # dev extras (in requirements.lock): a missing or broken install fails here, it is not skipped
import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import tiny_config
from mot_transition import MoTLMHeadModel
from mot_transition.convert import convert_model


def _lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], target_parameters=["lin1", "lin2"])
    return peft.get_peft_model(model, config)


def test_lora_on_experts_trains_keeps_the_router_losses_merges_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    base = MoTLMHeadModel(tiny_config("token_choice", router_z_loss_coef=1e-3))
    reference = {name: t.clone() for name, t in base.state_dict().items()}
    model = _lora(base).train()
    adapted_parameters = {m.parameter_name for m in model.modules() if getattr(m, "parameter_name", None)}
    assert adapted_parameters == {"lin1", "lin2"}  # PEFT wraps the expert tensors themselves
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(".mlp." in name for name in trainable) and any("c_attn" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 61, (4, 12))
    for _ in range(3):
        out = model(ids, labels=ids)
        assert out.aux_loss is not None and out.z_loss is not None  # the wrapped layers still balance their routers
        expected = out.lm_loss + base.config.router_aux_loss_coef * out.aux_loss + base.config.router_z_loss_coef * out.z_loss
        torch.testing.assert_close(out.loss, expected)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = MoTLMHeadModel(tiny_config("token_choice", router_z_loss_coef=1e-3))
    fresh.load_state_dict(reference)  # the base weights the adapter was trained on
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted)
    merged = model.merge_and_unload()
    assert type(merged) is MoTLMHeadModel
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(MoTLMHeadModel.from_pretrained(tmp_path / "merged")(ids).logits, merged(ids).logits)
    assert not torch.equal(merged.transformer.h[1].mlp.lin1, reference["transformer.h.1.mlp.lin1"])  # experts adapted


@pytest.mark.parametrize("checkpointing", [False, True])
def test_transformers_trainer_fine_tunes_a_converted_model_with_its_router_losses(tmp_path, checkpointing):
    torch.manual_seed(0)
    model, _ = convert_model(MoTLMHeadModel(tiny_config("mot", group_size=2)))
    model.config.router_z_loss_coef = 1e-3
    ids = torch.randint(0, 61, (16, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    losses = []

    class Recording(Trainer):  # what the Trainer optimises: the model's loss, router losses included
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            assert outputs.aux_loss is not None and outputs.z_loss is not None
            expected = outputs.lm_loss + model.config.router_aux_loss_coef * outputs.aux_loss + 1e-3 * outputs.z_loss
            losses.append((loss.detach(), expected.detach()))
            return (loss, outputs) if return_outputs else loss

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, gradient_checkpointing=checkpointing,
        dataloader_num_workers=0,
    )
    before = model.transformer.h[1].mlp.lin1.detach().clone()
    result = Recording(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3 and len(losses) == 3
    for loss, expected in losses:
        torch.testing.assert_close(loss, expected)
    assert not torch.equal(model.transformer.h[1].mlp.lin1, before)


def test_transformers_trainer_keeps_the_router_terms_at_their_weight_under_gradient_accumulation(tmp_path):
    # The Trainer sums the micro-batches' losses, normalised by the step's targets: the router terms must
    # weigh as many of them as each micro-batch holds. The z-loss is a mean over tokens, so 2 x 4 rows and
    # 1 x 8 rows give the same loss and the same update (the load-balancing loss is off: it is not a mean).
    torch.manual_seed(0)
    ids = torch.randint(0, 61, (16, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    runs = {}
    for rows, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = MoTLMHeadModel(tiny_config("token_choice", router_aux_loss_coef=0.0, router_z_loss_coef=0.5))
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{rows}"), per_device_train_batch_size=rows, gradient_accumulation_steps=accumulation,
            max_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
            dataloader_num_workers=0, seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        runs[accumulation] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], model)
    (one, m1), (two, m2) = runs[1], runs[2]
    assert len(one) == len(two) == 2
    assert two == pytest.approx(one, rel=1e-5)
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
