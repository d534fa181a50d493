"""The task heads of the MoT model family on its trunk (modeling.py's MoTModel):

    MoTForSequenceClassification    last real token -> labels
    MoTForTokenClassification       every token -> labels
    MoTForQuestionAnswering         start / end logits

Each head's loss adds the router losses of the Token Choice layers times their coefficients, as the
causal LM's does.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.generic import can_return_tuple

from .config import MoTConfig
from .modeling import MoTModel, MoTPreTrainedModel
from .outputs import MoTQuestionAnsweringOutput, MoTSequenceClassifierOutput, MoTTokenClassifierOutput


class MoTForSequenceClassification(MoTPreTrainedModel):
    """Classifies a sequence from its last real token (the last position the attention mask keeps,
    or the last non-pad token when only `pad_token_id` is known)."""

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = MoTModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, output_router_logits=None,
        output_hidden_states=None, output_attentions=None, **kwargs,
    ):
        out = self._encode(input_ids, attention_mask, inputs_embeds, output_router_logits, output_hidden_states, output_attentions)
        logits = self.score(out.last_hidden_state)  # (B, S, num_labels)
        B, S = logits.shape[:2]
        if attention_mask is not None:
            keep = attention_mask.bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            keep = input_ids != self.config.pad_token_id
        else:
            keep = torch.ones(B, S, dtype=torch.bool, device=logits.device)
        # last kept position; works for left and right padding
        last = (keep.long() * torch.arange(S, device=logits.device)).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                task = F.mse_loss(pooled.squeeze(-1).float(), labels.float())
            elif labels.dtype in (torch.long, torch.int):
                task = F.cross_entropy(pooled.float(), labels)
            else:
                task = F.binary_cross_entropy_with_logits(pooled.float(), labels.float())
            loss = task + self.router_losses(out)
        return MoTSequenceClassifierOutput(loss=loss, logits=pooled, **self._passed_on(out))


class MoTForTokenClassification(MoTPreTrainedModel):
    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = MoTModel(config)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, output_router_logits=None,
        output_hidden_states=None, output_attentions=None, **kwargs,
    ):
        out = self._encode(input_ids, attention_mask, inputs_embeds, output_router_logits, output_hidden_states, output_attentions)
        logits = self.classifier(out.last_hidden_state)
        loss = None
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            task = F.cross_entropy(logits.float().reshape(-1, self.num_labels), labels.reshape(-1), ignore_index=-100)
            loss = task + self.router_losses(out)
        return MoTTokenClassifierOutput(loss=loss, logits=logits, **self._passed_on(out))


class MoTForQuestionAnswering(MoTPreTrainedModel):
    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.transformer = MoTModel(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self, input_ids=None, attention_mask=None, start_positions=None, end_positions=None, inputs_embeds=None,
        output_router_logits=None, output_hidden_states=None, output_attentions=None, **kwargs,
    ):
        out = self._encode(input_ids, attention_mask, inputs_embeds, output_router_logits, output_hidden_states, output_attentions)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).float().unbind(-1)
        if attention_mask is not None:  # an answer never starts or ends on padding
            start_logits = start_logits.masked_fill(attention_mask == 0, torch.finfo(start_logits.dtype).min)
            end_logits = end_logits.masked_fill(attention_mask == 0, torch.finfo(end_logits.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            S = start_logits.shape[1]
            task = (
                F.cross_entropy(start_logits, start_positions.clamp(0, S), ignore_index=S)
                + F.cross_entropy(end_logits, end_positions.clamp(0, S), ignore_index=S)
            ) / 2
            loss = task + self.router_losses(out)
        return MoTQuestionAnsweringOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, **self._passed_on(out))


__all__ = ["MoTForSequenceClassification", "MoTForTokenClassification", "MoTForQuestionAnswering"]
