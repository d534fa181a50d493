"""transformers' own common model tests, run on our family as transformers runs them for its models:
a ModelTester with a tiny config and one test class per feed-forward type, using the mixins of the
installed transformers (fetched by tests/upstream.py; skipped with the reason where they cannot be).

What is skipped here, and why, is said beside each skip; everything else of ModelTesterMixin,
TrainingTesterMixin and ConfigTester runs.
"""

import unittest

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.models.auto import modeling_auto

import upstream
from mot_transition import (
    MoTConfig,
    MoTForQuestionAnswering,
    MoTForSequenceClassification,
    MoTForTokenClassification,
    MoTLMHeadModel,
    MoTModel,
)

upstream.load()
from upstream_tests.test_configuration_common import ConfigTester  # noqa: E402
from upstream_tests.test_modeling_common import ModelTesterMixin, ids_tensor  # noqa: E402
from upstream_tests.test_training_mixin import TrainingTesterMixin  # noqa: E402

OLD_BF16_TOLERANCE = Version(transformers.__version__) < Version("5.23")

# Where transformers lists its own models by task; the mixins pick labels and skips from these.
TASK_NAMES = {
    "MODEL_MAPPING_NAMES": MoTModel,
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": MoTLMHeadModel,
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": MoTForSequenceClassification,
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": MoTForTokenClassification,
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": MoTForQuestionAnswering,
}


@pytest.fixture(autouse=True, scope="module")
def _listed_as_a_transformers_model():
    """List our classes in transformers' task tables for the duration of this module, as a model in
    the library is; restored afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        for table, model_class in TASK_NAMES.items():
            patch.setitem(getattr(modeling_auto, table), "mot", model_class.__name__)
        yield


class MoTModelTester:
    causal_lm_class = MoTLMHeadModel  # what TrainingTesterMixin trains
    sequence_classification_class = MoTForSequenceClassification

    def __init__(self, parent, ffn_type: str, **overrides):
        self.parent, self.ffn_type, self.overrides = parent, ffn_type, overrides
        self.batch_size, self.seq_length, self.is_training = 4, 7, True
        self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 99, 32, 2, 4

    def get_config(self) -> MoTConfig:
        fields = dict(
            vocab_size=self.vocab_size, n_positions=64, n_embd=self.hidden_size, n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads, ffn_type=self.ffn_type, n_expert=4, group_size=2, expert_size=16,
            num_experts_per_tok=2, pad_token_id=0, num_labels=3,
        )
        return MoTConfig(**{**fields, **self.overrides})

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


class MoTCommonTests(ModelTesterMixin, TrainingTesterMixin):
    all_model_classes = (MoTModel, MoTLMHeadModel, MoTForSequenceClassification, MoTForTokenClassification, MoTForQuestionAnswering)
    ffn_type: str = "dense"
    overrides: dict = {}

    def setUp(self):
        name = self._testMethodName
        if name.startswith("test_eager_matches_batched_and_grouped_inference") and self.ffn_type != "token_choice":
            # parameterized upstream: one generated method per dtype, so skipped here by name
            self.skipTest(f"the experts-implementation switch reaches Token Choice experts only; ffn_type={self.ffn_type} has none")
        if name.startswith("test_eager_matches_batched_and_grouped_inference") and name.endswith("bf16") and OLD_BF16_TOLERANCE:
            self.skipTest(
                "this transformers holds bfloat16 to 1e-4 here, under one bfloat16 rounding step (5.23 and later allow "
                "5e-3: experts summed in another order differ by a few steps); float32 and float16 run"
            )
        self.model_tester = MoTModelTester(self, self.ffn_type, **self.overrides)
        self.config_tester = ConfigTester(self, config_class=MoTConfig, n_embd=32, n_head=4, n_layer=2, vocab_size=99)

    def test_config(self):
        tester = self.config_tester
        tester.create_and_test_config_common_properties()
        tester.create_and_test_config_to_json_string()
        tester.create_and_test_config_to_json_file()
        tester.create_and_test_config_from_and_save_pretrained()
        tester.create_and_test_config_from_and_save_pretrained_subfolder()
        tester.create_and_test_config_with_num_labels()
        tester.create_and_test_config_from_pretrained_custom_kwargs()
        tester.check_config_can_be_init_without_params()
        # check_config_arguments_init needs config_common_kwargs from tests/utils/, not in the sdist

    @unittest.skip("GenerationTesterMixin is not in transformers' sdist (tests/generation/); generate() is tested in test_model.py")
    def test_generation_tester_mixin_inheritance(self):
        pass


class DenseTest(MoTCommonTests, unittest.TestCase):
    ffn_type = "dense"

    @unittest.skip("a dense model has no router, so there are no router logits to return")
    def test_output_router_logits_from_config(self):
        pass


class TokenChoiceTest(MoTCommonTests, unittest.TestCase):
    ffn_type = "token_choice"


class MoTGroupOneTest(MoTCommonTests, unittest.TestCase):
    ffn_type, overrides = "mot", {"group_size": 1}


class MoTGroupTwoTest(MoTCommonTests, unittest.TestCase):
    ffn_type = "mot"

    @unittest.skip("MoT mixes a group of rows: a row alone is grouped differently (batch dependence by design)")
    def test_batching_equivalence(self):
        pass


class ExpertChoiceTest(MoTCommonTests, unittest.TestCase):
    ffn_type = "expert_choice"

    @unittest.skip("Expert Choice picks tokens within a group of rows: a row alone is grouped differently (by design)")
    def test_batching_equivalence(self):
        pass


# the same suites for the llama block style (RMSNorm, rotary positions, SwiGLU, qk_norm)
class LlamaDenseTest(DenseTest):
    overrides = {"block": "llama"}


class LlamaTokenChoiceTest(TokenChoiceTest):
    overrides = {"block": "llama"}


class LlamaMoTGroupTwoTest(MoTGroupTwoTest):
    overrides = {"block": "llama"}
