"""Every head learns a toy task: its loss falls within a few dozen steps."""

import pytest
import torch

from conftest import tiny_config
from mot_transition import (
    MoTForQuestionAnswering,
    MoTForSequenceClassification,
    MoTForTokenClassification,
    MoTLMHeadModel,
)


def toy_batch(task: str):
    ids = torch.randint(1, 61, (8, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    if task == "lm":  # repeat a 4-token pattern: the second half is predictable
        ids[:, 4:] = ids[:, :4]
        return dict(input_ids=ids, labels=ids)
    if task == "sequence":  # is token 7 present?
        ids[:4, 3] = 7
        ids[4:] = torch.where(ids[4:] == 7, 8, ids[4:])
        return dict(input_ids=ids, attention_mask=mask, labels=(torch.arange(8) < 4).long())
    if task == "regression":
        return dict(input_ids=ids, attention_mask=mask, labels=ids[:, -1].float() / 61)
    if task == "token":  # label = parity of the token id
        return dict(input_ids=ids, attention_mask=mask, labels=ids % 2)
    if task == "qa":  # answer = position of the largest token id
        positions = ids.masked_fill(mask == 0, -1).argmax(-1)
        return dict(input_ids=ids, attention_mask=mask, start_positions=positions, end_positions=positions)
    raise ValueError(task)


@pytest.mark.parametrize(
    "head, task, ffn_type, labels",
    [
        (MoTLMHeadModel, "lm", "mot", 2),
        (MoTLMHeadModel, "lm", "token_choice", 2),
        (MoTForSequenceClassification, "sequence", "mot", 2),
        (MoTForSequenceClassification, "regression", "expert_choice", 1),
        (MoTForTokenClassification, "token", "token_choice", 2),
        (MoTForQuestionAnswering, "qa", "mot", 2),
    ],
)
def test_head_reduces_its_loss_on_a_toy_task(head, task, ffn_type, labels):
    model = head(tiny_config(ffn_type, num_labels=labels, group_size=4)).train()
    batch = toy_batch(task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
