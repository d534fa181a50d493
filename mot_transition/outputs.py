"""The outputs of the model family: transformers' own output classes, subclassed only to add the
router losses that our heads add to their task loss, and the KV cache under the name the installed
transformers uses (`cache` from 5.24, `past_key_values` before), taken and read under either."""

import warnings
from dataclasses import dataclass, fields

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)


def _cache_field(output_class: type) -> str:
    """The name under which `output_class` (one of transformers' own outputs) holds the KV cache:
    `cache` from transformers 5.24, `past_key_values` before. Callers of our models may use either."""
    names = {f.name for f in fields(output_class)}
    return "cache" if "cache" in names else "past_key_values"


CACHE_FIELD = _cache_field(MoeModelOutputWithPast)


def one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache a caller passed, under the new name (`cache`) or the old one (`past_key_values`).
    Where the installed transformers has moved to `cache`, the old name warns as its own models do."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    if past_key_values is not None and CACHE_FIELD == "cache" and not torch.compiler.is_compiling():
        warnings.warn("`past_key_values` is deprecated: pass the KV cache as `cache`", FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


@dataclass
class MoTModelOutput(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus the mean load-balancing (`aux_loss`) and z losses of the
    Token Choice layers (None without any)."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


@dataclass
class MoTCausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus `lm_loss` (the language-model loss alone: `loss` adds the
    weighted router losses) and `z_loss`."""

    lm_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


@dataclass
class MoTSequenceClassifierOutput(SequenceClassifierOutputWithPast):
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class MoTTokenClassifierOutput(TokenClassifierOutput):
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class MoTQuestionAnsweringOutput(QuestionAnsweringModelOutput):
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


if CACHE_FIELD == "past_key_values":  # transformers < 5.24: let callers read the new name too
    for _output in (MoTModelOutput, MoTCausalLMOutput, MoTSequenceClassifierOutput):
        _output.cache = property(lambda self: self.past_key_values)


__all__ = [
    "CACHE_FIELD", "one_cache", "MoTModelOutput", "MoTCausalLMOutput", "MoTSequenceClassifierOutput",
    "MoTTokenClassifierOutput", "MoTQuestionAnsweringOutput",
]
