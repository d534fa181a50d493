"""transformers' own distributed test mixins (tensor parallel, expert parallel, FSDP2) on our family, as
transformers runs them for its models: 2 processes over gloo on CPU, the tiny configs of
test_transformers_common.py, one test class per feed-forward type (gpt2 block) and Llama Token Choice. The mixins come from the
installed release's sdist (tests/upstream.py) with our `distributed_testing_utils` beside them.

The mixins run only the model types on their allowlists; ours is added to them for this module. What is
skipped, and why, is said beside each skip, and the mixins skip by themselves what needs more processes
than this machine has CPUs (4 and 8 processes) or what needs a package that is not installed (torchao).
"""

import copy
import functools
import unittest

import pytest

import upstream
from test_transformers_common import MoTModelTester

upstream.load(upstream.DISTRIBUTED_FILES)
try:  # where transformers keeps it: parallel_utils from 5.24, tensor_parallel before
    from transformers.distributed.parallel_utils import _get_parameter_plan  # noqa: E402
except ImportError:
    from transformers.distributed.tensor_parallel import _get_parameter_plan  # noqa: E402
from upstream_tests import test_expert_parallel_mixin, test_fsdp_mixin, test_tensor_parallel_mixin  # noqa: E402

from mot_transition import MoTLMHeadModel, MoTModel  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _on_the_allowlists():
    """Our model type on the mixins' lists of the models they run, for this module."""
    with pytest.MonkeyPatch.context() as patch:
        for module, name in (
            (test_tensor_parallel_mixin, "TP_DISTRIBUTED_TEST_MODEL_TYPES"),
            (test_expert_parallel_mixin, "EP_DISTRIBUTED_TEST_MODEL_TYPES"),
            (test_fsdp_mixin, "FSDP_DISTRIBUTED_TEST_MODEL_TYPES"),
        ):
            if getattr(module, name, None) is not None:
                patch.setattr(module, name, getattr(module, name) | {"mot"})
        yield


class MoTDistributedTests(
    test_tensor_parallel_mixin.TensorParallelTesterMixin,
    test_expert_parallel_mixin.ExpertParallelTesterMixin,
    test_fsdp_mixin.FSDPTesterMixin,
):
    all_model_classes = (MoTModel, MoTLMHeadModel)
    model_tester = None  # set per test (the mixins declare it abstract)
    ffn_type: str = "dense"
    overrides: dict = {}

    def setUp(self):
        self.model_tester = MoTModelTester(self, self.ffn_type, **self.overrides)

    @unittest.skip(
        "finds expert tensors by transformers' names (gate_up_proj / up_proj, down_proj); ours keep their names "
        "lin1, lin2 (our checkpoint names), so it would see none: test_parallel_plans_shard_experts checks the same on ours"
    )
    def test_moe_parallel_plans_shard_experts(self):
        pass

    def test_expert_parallel_with_fsdp_is_refused(self):
        """The layout transformers cannot give our expert layers fails with the reason, before any sharding."""
        from transformers.distributed import DistributedConfig

        from mot_transition.parallel_plans import check_layout

        check_layout(DistributedConfig(tp_size=2, ep_size=2))
        check_layout(DistributedConfig(fsdp_size=2))
        with self.assertRaisesRegex(NotImplementedError, "FSDP"):
            check_layout(DistributedConfig(fsdp_size=2, ep_size=2))

    def test_parallel_plans_shard_experts(self):
        """The expert matrices, the bulk of an expert model, are sharded by every parallel plan it declares."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config))
            experts = [name for name, _ in model.named_parameters() if name.endswith((".lin1", ".lin2"))]
            if config.ffn_type == "dense":
                self.assertEqual(experts, [])
                self.assertIsNone(config.base_model_ep_plan)
                continue
            self.assertTrue(experts)
            plans = {"TP": model.tp_plan, **({"EP": model.ep_plan} if config.ffn_type == "token_choice" else {})}
            self.assertEqual(config.base_model_ep_plan is None, "EP" not in plans)
            for kind, plan in plans.items():
                # by expert: transformers' "grouped_gemm" under the EP plan, ours (the same, taking TP's arguments) under TP
                unsharded = [name for name in experts if _get_parameter_plan(name, plan) not in ("grouped_gemm", "mot_expert_rows")]
                self.assertFalse(unsharded, f"{model_class.__name__}: the {kind} plan leaves experts whole: {unsharded}")


class DenseTest(MoTDistributedTests, unittest.TestCase):
    ffn_type = "dense"


class MoTTest(MoTDistributedTests, unittest.TestCase):
    ffn_type = "mot"


def _expected_failure(test):
    """`test` marked as expected to fail in this class only (unittest marks the function it is given, and
    the mixin's function is every class's)."""

    @functools.wraps(test)
    def run(self):
        return test(self)

    return unittest.expectedFailure(run)


FSDP_WITH_EP = (
    "expert parallel with FSDP is refused for our models (parallel_plans.check_layout): transformers' FSDP2 "
    "shards the tensors of the experts module on the expert mesh, and ours belong to the Token Choice layer "
    "(h.N.mlp.lin1/lin2, our checkpoint names) beside its router"
)


class TokenChoiceTest(MoTDistributedTests, unittest.TestCase):
    ffn_type = "token_choice"

    def setUp(self):
        name = self._testMethodName
        if name.startswith(("test_fsdp2_expert_parallel", "test_hsdp_grad_accumulation")) and "expert_parallel" in name:
            self.skipTest(FSDP_WITH_EP)
        super().setUp()

    # One device on the whole batch against HSDP ranks on slices of it: expected to fail, because in the
    # mixin's own loop each process computes the load-balancing loss of its own rows, so sharding the batch
    # changes the loss (with router_aux_loss_coef=0 these pass). Our trainer balances over the global batch
    # (train/balance.py sets the model's batch_routing for a step); a plain loop does not. An unexpected pass
    # fails: then drop this.
    for _name in dir(test_fsdp_mixin.FSDPTesterMixin):
        if _name.startswith("test_hsdp_grad_accumulation_vs_single_device_") and "expert_parallel" not in _name:
            locals()[_name] = _expected_failure(getattr(test_fsdp_mixin.FSDPTesterMixin, _name))
    del _name


class ExpertChoiceTest(MoTDistributedTests, unittest.TestCase):
    ffn_type = "expert_choice"


# The llama block style (RMSNorm, rotary positions, SwiGLU's packed [gate | up] matrices, qk_norm) once, on
# the Token Choice model we export: its leading dense layers carry the style's dense plan, its expert layers
# the SwiGLU experts'. (Its dense and MoT twins of the gpt2 classes would double the mixins' time, most of
# the suite's, for plan entries this class already runs.)
class LlamaTokenChoiceTest(TokenChoiceTest):
    overrides = {"block": "llama"}
