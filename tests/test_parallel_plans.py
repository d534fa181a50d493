"""Expert sharding of MoT and Expert Choice under the tensor-parallel plan, in the cases transformers' mixins
(test_transformers_distributed.py) do not reach: an expert count that does not divide by the processes, MoT's
emit softmax over the experts (the emit weights of one rank's experts then depend on every expert's logits),
discrete routing. 2 processes over gloo load a saved checkpoint with DistributedConfig(tp_size=2); their
logits, loss and every gradient (gathered) equal one process's."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config
from distributed_testing_utils import run_distributed
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig

from mot_transition import MoTLMHeadModel
from mot_transition import parallel_plans
from mot_transition.parallel_plans import ALL_PARALLEL_STYLES, check_layout, local_experts

needs_sharded_loading = pytest.mark.skipif(
    ALL_PARALLEL_STYLES is None, reason="a torch without torch.distributed: no parallel styles"
)

CASES = {
    "mot-uneven-llama": dict(ffn_type="mot", n_expert=3, block="llama"),
    "mot-emit-over-experts": dict(ffn_type="mot", n_expert=4, emit_softmax_over_experts=True),
    "mot-discrete": dict(ffn_type="mot", n_expert=4, use_discrete_routing=True),
    "expert-choice-uneven": dict(ffn_type="expert_choice", n_expert=3, capacity_factor=2.0),
}


def test_local_experts_match_dtensor_blocks():
    assert [local_experts(3, r, 2) for r in range(2)] == [slice(0, 2), slice(2, 3)]
    assert [local_experts(4, r, 2) for r in range(2)] == [slice(0, 2), slice(2, 4)]
    assert local_experts(1, 1, 2) == slice(1, 1)  # a rank may hold none


def _compare(rank, path):
    torch.manual_seed(0)
    reference = MoTLMHeadModel.from_pretrained(path)
    sharded = MoTLMHeadModel.from_pretrained(path, distributed_config=DistributedConfig(tp_size=dist.get_world_size()))
    lin1 = dict(sharded.named_parameters())["transformer.h.1.mlp.lin1"]
    assert isinstance(lin1, DTensor) and lin1.to_local().shape[0] < reference.config.n_expert, "experts not sharded"
    ids = torch.randint(0, reference.config.vocab_size, (4, 16))
    for model in (reference, sharded):
        model.train()
        model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        reference.eval(), sharded.eval()
        torch.testing.assert_close(sharded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        # one row: a group padded with an empty row, whose output is a strided view (summed in place)
        torch.testing.assert_close(sharded(ids[:1]).logits, reference(ids[:1]).logits, rtol=1e-5, atol=1e-5)
    grads = dict(sharded.named_parameters())
    for name, param in reference.named_parameters():
        grad = grads[name].grad
        grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
        torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_tensor_parallelism_of_the_llama_block_is_refused_before_torch_2_12(monkeypatch):
    tp = DistributedConfig(tp_size=2)
    for release in ((2, 11), (2, 12)):
        monkeypatch.setattr(parallel_plans, "_torch_release", lambda release=release: release)
        check_layout(tp, tiny_config("mot", block="gpt2"))  # the gpt2 style: every release
        check_layout(DistributedConfig(fsdp_size=2), tiny_config("mot", block="llama"))
        if release < (2, 12):
            with pytest.raises(NotImplementedError, match="llama block style needs torch >= 2.12"):
                check_layout(tp, tiny_config("mot", block="llama"))
        else:
            check_layout(tp, tiny_config("mot", block="llama"))


@needs_sharded_loading
@pytest.mark.skipif(os.cpu_count() < 2, reason="2 processes")
@pytest.mark.parametrize("case", CASES)
def test_expert_sharding_equals_one_process(case):
    if CASES[case].get("block") == "llama" and parallel_plans._torch_release() < (2, 12):
        pytest.skip("tensor parallelism of the llama block needs torch >= 2.12 (refused below it: the test above)")
    with tempfile.TemporaryDirectory() as path:
        MoTLMHeadModel(tiny_config(**CASES[case])).save_pretrained(path)
        run_distributed(world_size=2)(_compare)(path)
