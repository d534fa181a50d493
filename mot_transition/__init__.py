"""mot-transition: Mixture of Tokens language models and their transition tuning into Token Choice
sparse MoE. Importing the package registers the model family with the transformers Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from . import remote_code  # noqa: F401  (reads the sources that checkpoints carry, once, now)
from ._version import __version__  # noqa: F401  (mot_transition.__version__)
from .config import MoTConfig
from .heads import MoTForQuestionAnswering, MoTForSequenceClassification, MoTForTokenClassification
from .modeling import MoTLMHeadModel, MoTModel, MoTPreTrainedModel


AutoConfig.register("mot", MoTConfig, exist_ok=True)
for _auto, _cls in (
    (AutoModel, MoTModel),
    (AutoModelForCausalLM, MoTLMHeadModel),
    (AutoModelForSequenceClassification, MoTForSequenceClassification),
    (AutoModelForTokenClassification, MoTForTokenClassification),
    (AutoModelForQuestionAnswering, MoTForQuestionAnswering),
):
    _auto.register(MoTConfig, _cls, exist_ok=True)

__all__ = [
    "MoTConfig", "MoTModel", "MoTPreTrainedModel", "MoTLMHeadModel", "MoTForSequenceClassification",
    "MoTForTokenClassification", "MoTForQuestionAnswering",
]
