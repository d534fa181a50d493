"""The trainer's speed switches (issue 10, item 3): `train.compile` (every feed-forward type traces
into one graph, and a compiled run follows the eager one) and `train.keep_freed_memory`."""

import pytest
import torch

from conftest import tiny_config
from mot_transition.modeling import MoTLMHeadModel
from mot_transition.train import Trainer, recipe_from_dict

FFN_TYPES = ["dense", "mot", "token_choice", "expert_choice"]


@pytest.mark.parametrize("block", ["gpt2", "llama"])
@pytest.mark.parametrize("ffn_type", FFN_TYPES)
def test_a_training_forward_traces_into_one_graph_without_breaks(ffn_type, block):
    torch._dynamo.reset()
    model = MoTLMHeadModel(tiny_config(ffn_type, block=block)).train()
    ids = torch.randint(0, model.config.vocab_size, (8, 16))
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids, use_cache=False)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def _losses(ffn_type: str, compile: bool) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config(ffn_type, vocab_size=256))
    sequences = torch.randint(0, 256, (64, 16), generator=torch.Generator().manual_seed(0))
    recipe = recipe_from_dict({
        "train": {"steps": 3, "batch_size": 8, "compile": compile, "log_every": 1000},
        "data": {"seq_len": 16, "eval_batches": 1, "eval_batch_size": 8},
    })
    trainer = Trainer(model, recipe, sequences, sequences[:8])
    losses = [trainer.step()["loss"] for _ in range(3)]
    assert (trainer.forward_model is not trainer.model) == compile
    return losses, trainer.model.state_dict()


@pytest.mark.parametrize("ffn_type", ["mot", "token_choice"])  # token_choice with a capacity factor: the dropping path
def test_a_compiled_training_run_follows_the_eager_one(ffn_type):
    torch._dynamo.reset()
    eager, eager_weights = _losses(ffn_type, compile=False)
    compiled, compiled_weights = _losses(ffn_type, compile=True)
    assert compiled == pytest.approx(eager, rel=1e-5)
    for name, tensor in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_keep_freed_memory_makes_a_large_tensor_reuse_pages_instead_of_faulting_them_in_again():
    import resource

    from mot_transition.train.devices import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc")
    pages = 64 * 2**20 // resource.getpagesize()  # a 64 MB tensor: above glibc's largest mmap threshold

    def faults_of_one_tensor() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(64 * 2**20 // 4).sum()  # written through, then freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    [faults_of_one_tensor() for _ in range(2)]  # the heap grows to hold it (once, sometimes in two goes)
    # then it is served from freed memory; mapped fresh each time, it would fault in all its pages again
    assert sum(faults_of_one_tensor() for _ in range(3)) < pages / 10
