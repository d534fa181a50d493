"""Router losses over the whole global batch (layers/balance.py, train/balance.py): however the batch is
laid out over processes and accumulation steps, the summed contributions and their gradients are the
losses of the global batch computed in one piece, and the trainer trains the same model."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from mot_transition import MoTLMHeadModel
from mot_transition.layers import load_balancing_loss, router_z_loss
from mot_transition.layers.balance import BatchRouting, batch_router_losses, routing_counts
from mot_transition.train import load_training_state, train
from mot_transition.train.recipe import recipe_from_dict

sys.path.insert(0, os.path.dirname(__file__))
from test_train import metric_lines, parameters, tiny_recipe  # noqa: E402


def _whole(logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None):
    """The global batch's losses in one piece, with the plain per-batch functions: the reference."""
    aux = torch.stack([load_balancing_loss(r, top_k, mask) for r in logits]).mean()
    z = torch.stack([router_z_loss(r, mask) for r in logits]).mean()
    return aux, z


@pytest.mark.parametrize("masked", [False, True])
def test_micro_batch_parts_sum_to_the_global_losses_and_their_gradients(masked):
    torch.manual_seed(0)
    L, N, E, k, parts = 2, 24, 6, 2, 3
    logits = [torch.randn(N, E, requires_grad=True) for _ in range(L)]
    mask = (torch.rand(N) > 0.3) if masked else None
    aux, z = _whole(logits, k, mask)
    (aux + 0.1 * z).backward()
    expected = [r.grad.clone() for r in logits]
    for r in logits:
        r.grad = None

    chunks = [list(zip(*[r.chunk(parts) for r in logits]))[i] for i in range(parts)]
    masks = mask.chunk(parts) if masked else [None] * parts
    counts = sum(routing_counts([r.detach() for r in chunk], k, m) for chunk, m in zip(chunks, masks))
    routing = BatchRouting(share=parts, counts=counts)
    total_aux = total_z = 0.0
    for chunk, m in zip(chunks, masks):
        part_aux, part_z = batch_router_losses(list(chunk), k, m, routing)
        ((part_aux + 0.1 * part_z) / parts).backward()  # as the trainer does: each micro-batch's loss / accumulation
        total_aux, total_z = total_aux + part_aux.detach() / parts, total_z + part_z.detach() / parts
    torch.testing.assert_close(total_aux, aux.detach())
    torch.testing.assert_close(total_z, z.detach())
    for r, g in zip(logits, expected):
        torch.testing.assert_close(r.grad, g)


TWO_PROCESSES = """
import sys, torch, torch.distributed as dist
from mot_transition.layers.balance import BatchRouting, batch_router_losses
rank, folder = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
mine = [r[rank * 8 : (rank + 1) * 8].clone().requires_grad_() for r in torch.load(f"{folder}/logits.pt")]
aux, z = batch_router_losses(mine, 2, None, BatchRouting(share=2, group=dist.group.WORLD))
(aux + 0.1 * z).backward()
values = torch.stack([aux.detach(), z.detach()])
dist.all_reduce(values)
torch.save((values / 2, [r.grad for r in mine]), f"{folder}/rank-{rank}.pt")
dist.destroy_process_group()
"""


def test_two_processes_counting_in_the_forward_give_the_global_losses_and_gradients(tmp_path):
    torch.manual_seed(0)
    logits = [torch.randn(16, 5) for _ in range(2)]
    torch.save(logits, tmp_path / "logits.pt")
    reference = [r.clone().requires_grad_() for r in logits]
    aux, z = _whole(reference, 2, None)
    (aux + 0.1 * z).backward()
    (tmp_path / "rank.py").write_text(TWO_PROCESSES)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), str(r), str(tmp_path)], env=env) for r in (0, 1)]
    assert [rank.wait(timeout=120) for rank in ranks] == [0, 0]
    results = [torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(results[0][0], torch.stack([aux, z]).detach())
    for layer, r in enumerate(reference):  # DDP averages the processes' gradients: / 2
        torch.testing.assert_close(torch.cat([results[rank][1][layer] / 2 for rank in (0, 1)]), r.grad)


def test_gradient_accumulation_trains_the_model_of_one_micro_batch_with_the_router_losses_on(data_dir, tmp_path):
    # no dropout (its masks depend on the micro-batch's shape); router losses weighed heavily enough to matter
    model = {"ffn_type": "token_choice", "n_expert": 4, "router_aux_loss_coef": 0.5, "router_z_loss_coef": 0.01}
    runs = {}
    for accumulation in (1, 4):
        raw = tiny_recipe(data_dir, model=model, train={"steps": 3, "grad_accum": accumulation, "checkpoint_every": 3})
        runs[accumulation] = train(recipe_from_dict(raw), tmp_path / f"accumulate-{accumulation}", progress=False)
    one, four = metric_lines(runs[1].run_dir), metric_lines(runs[4].run_dir)
    for a, b in zip(one, four):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    p1, p4 = parameters(runs[1].checkpoint), parameters(runs[4].checkpoint)
    for name in p1:
        torch.testing.assert_close(p4[name], p1[name], rtol=1e-4, atol=1e-5)
    state, _ = load_training_state(runs[4].checkpoint)
    assert state["step"] == 3


def test_the_routing_pass_leaves_the_dropout_stream_as_it_found_it(data_dir, tmp_path):
    # with dropout, a step with accumulation must draw the masks it would draw without the routing pass
    from mot_transition.train.balance import routing_pass

    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config("token_choice", resid_pdrop=0.5, embd_pdrop=0.5)).train()
    trunk = model.transformer
    batches = [torch.randint(0, 61, (2, 8)) for _ in range(2)]
    torch.manual_seed(7)
    counts = routing_pass(model, batches, bf16=False)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))
    torch.manual_seed(7)
    again = sum(routing_counts([r for r in trunk(input_ids=b, output_router_logits=True).router_logits], 2, None) for b in batches)
    torch.testing.assert_close(counts, again)  # the pass routes as the step's forwards will, dropout included


# ---------------------------------------------------------------------------------------------
# balancing by a selection bias (router_bias_update_rate)


def test_the_selection_bias_picks_the_experts_and_the_gates_stay_the_router_probabilities():
    from mot_transition.layers import TokenChoice

    torch.manual_seed(0)
    layer = TokenChoice(tiny_config("token_choice", router_bias_update_rate=0.1, norm_topk_prob=False)).eval()
    layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 wins every token's first choice
    x = torch.randn(2, 5, 32)
    flat = x.reshape(-1, 32)
    probs = torch.softmax(flat @ layer.controller, dim=-1)
    expert = (probs + layer.expert_bias).topk(2, dim=-1).indices
    assert (expert[:, 0] == 3).all()
    expected = sum(
        probs.gather(1, expert[:, j : j + 1]) * torch.stack([torch.relu(t @ layer.lin1[e]) @ layer.lin2[e] for t, e in zip(flat, expert[:, j])])
        for j in range(2)
    )
    y, _ = layer(x)
    torch.testing.assert_close(y.reshape(-1, 32), expected)


def test_the_bias_moves_by_the_rate_towards_the_under_loaded_experts():
    from mot_transition.layers import TokenChoice
    from mot_transition.train.balance import update_expert_bias

    layer = TokenChoice(tiny_config("token_choice", router_bias_update_rate=0.01))
    holder = torch.nn.ModuleList([layer])
    layer.routed_tokens = torch.tensor([5, 1, 2, 0])  # mean 2
    update_expert_bias(holder, world_size=1)
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    assert layer.routed_tokens is None  # counting starts again


def test_training_with_the_bias_saves_it_counts_training_forwards_only_and_refuses_export(data_dir, tmp_path):
    from mot_transition.export import check_exportable

    model = {"ffn_type": "token_choice", "router_aux_loss_coef": 0.0, "router_bias_update_rate": 0.01}
    raw = tiny_recipe(data_dir, model=model, train={"steps": 3, "grad_accum": 2, "checkpoint_every": 3})
    result = train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    bias = {name: t for name, t in parameters(result.checkpoint).items() if name.endswith("expert_bias")}
    assert bias  # one per Token Choice layer, in model.safetensors
    for t in bias.values():
        steps_moved = t / 0.01
        torch.testing.assert_close(steps_moved, steps_moved.round())  # 3 updates of +-0.01 (or 0) each
        assert t.abs().max() > 0 and t.abs().max() <= 0.03 + 1e-6
    reloaded = MoTLMHeadModel.from_pretrained(result.checkpoint)
    torch.testing.assert_close(reloaded.transformer.h[1].mlp.expert_bias, bias["transformer.h.1.mlp.expert_bias"])
    check_exportable(tiny_config("token_choice", block="llama"), "qwen3_moe")  # exportable without the bias
    with pytest.raises(ValueError, match="selection bias"):
        check_exportable(tiny_config("token_choice", block="llama", router_bias_update_rate=0.01), "qwen3_moe")
