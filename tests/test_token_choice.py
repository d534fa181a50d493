"""Token Choice and Expert Choice against hand-computed examples and plain references."""

import math

import pytest
import torch

from conftest import BLOCKS, plain_ffn, tiny_config
from mot_transition.layers import ExpertChoice, TokenChoice, load_balancing_loss, router_z_loss


def test_load_balancing_loss_matches_hand_computed_example():
    # 4 tokens, 2 experts, top-1. Probabilities by hand: softmax([a, 0]) = [sigmoid(a), 1 - sigmoid(a)]
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    # tokens 0-2 choose expert 0 with p = (0.75, 0.25); token 3 chooses expert 1 with p = (0.25, 0.75)
    f = torch.tensor([3 / 4, 1 / 4])
    P = torch.tensor([(0.75 * 3 + 0.25) / 4, (0.25 * 3 + 0.75) / 4])
    expected = 2 * (f * P).sum()  # = 2 * (0.75 * 0.625 + 0.25 * 0.375) = 1.125
    assert torch.allclose(load_balancing_loss(logits, top_k=1), expected)
    assert math.isclose(expected.item(), 1.125)
    # padding is excluded: masking token 3 leaves three tokens all on expert 0
    mask = torch.tensor([True, True, True, False])
    assert torch.allclose(load_balancing_loss(logits, 1, mask), torch.tensor(2 * 1.0 * 0.75))


def test_load_balancing_loss_is_top_k_for_uniform_routing_and_grows_when_collapsed():
    E = 4
    uniform = torch.eye(E).repeat(8, 1) * 5.0  # every expert chosen equally often, confidently
    collapsed = torch.zeros(32, E)
    collapsed[:, 0] = 10.0
    assert load_balancing_loss(uniform, 1) < load_balancing_loss(collapsed, 1)
    assert torch.allclose(load_balancing_loss(torch.zeros(32, E) + torch.randn(32, E) * 1e-6, 2), torch.tensor(2.0), atol=1e-3)
    assert torch.allclose(load_balancing_loss(collapsed, 1), torch.tensor(float(E)), atol=1e-3)


def test_router_z_loss_is_mean_squared_logsumexp_of_raw_logits():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2.0) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert math.isclose(router_z_loss(logits).item(), expected, rel_tol=1e-6)


def make_token_choice(**overrides):
    layer = TokenChoice(tiny_config("token_choice", n_embd=4, n_expert=2, expert_size=3, **overrides))
    with torch.no_grad():
        layer.controller.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    return layer


def expert_output(layer, x, e):
    return plain_ffn(x, layer.lin1[e], layer.lin2[e], layer.gated)


def test_capacity_drops_later_tokens_first_come_first_served_in_training_only():
    # capacity = ceil(1.0 * 4 tokens * k=1 / 2 experts) = 2 per expert; tokens 0, 1, 2 prefer expert 0
    layer = make_token_choice(num_experts_per_tok=1, capacity_factor=1.0)
    x = torch.tensor([[[2.0, 0, 0, 0], [3.0, 0, 0, 0], [4.0, 0, 0, 0], [0, 2.0, 0, 0]]])
    layer.train()
    y, _ = layer(x)
    p0 = torch.softmax(x[0] @ layer.controller, -1)
    with torch.no_grad():
        for t in (0, 1):
            assert torch.allclose(y[0, t], p0[t, 0] * expert_output(layer, x[0, t], 0))
        assert torch.all(y[0, 2] == 0), "the third token for expert 0 is over capacity and dropped"
        assert torch.allclose(y[0, 3], p0[3, 1] * expert_output(layer, x[0, 3], 1))
        layer.eval()  # evaluation is dropless
        y_eval, _ = layer(x)
        assert torch.allclose(y_eval[0, 2], p0[2, 0] * expert_output(layer, x[0, 2], 0))


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_token_choice_top_2_of_4_output_with_and_without_renormalisation(norm, block):
    layer = TokenChoice(tiny_config(
        "token_choice", n_embd=4, n_head=2, n_expert=4, expert_size=3, num_experts_per_tok=2, norm_topk_prob=norm, block=block,
    )).double().eval()
    with torch.no_grad():
        layer.controller.normal_(0, 1.0)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    y, logits = layer(x)
    flat = x.reshape(-1, 4)
    p = torch.softmax(flat @ layer.controller, -1)
    with torch.no_grad():
        for t in range(flat.shape[0]):
            top = p[t].topk(2).indices.tolist()
            gates = p[t, top] / (p[t, top].sum() if norm else 1.0)
            expected = sum(g * expert_output(layer, flat[t], e) for g, e in zip(gates, top))
            assert torch.allclose(y.reshape(-1, 4)[t], expected, atol=1e-12)
    assert torch.allclose(logits, flat @ layer.controller)


def test_token_choice_masked_tokens_take_no_capacity_and_output_zero():
    layer = make_token_choice(num_experts_per_tok=1, capacity_factor=1.0).train()
    x = torch.tensor([[[5.0, 0, 0, 0], [2.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 2.0, 0, 0]]])
    mask = torch.tensor([[False, True, True, True]])
    y, _ = layer(x, mask)
    # capacity = ceil(4 slots / 2) = 2: the masked first token must not use one of expert 0's slots
    assert torch.all(y[0, 0] == 0) and torch.all(y[0, 1] != 0) and torch.all(y[0, 2] != 0)


def test_capacity_does_not_depend_on_padding_at_later_positions():
    layer = make_token_choice(num_experts_per_tok=1, capacity_factor=0.5).train()
    x = torch.randn(4, 6, 4)
    with torch.no_grad():
        full, _ = layer(x)
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[:, 4:] = False  # the last two positions become padding
        padded, _ = layer(x, mask)
    assert torch.equal(full[:, :4], padded[:, :4])


def test_router_losses_of_a_batch_without_real_tokens_are_zero_not_nan():
    logits = torch.randn(6, 4, requires_grad=True)
    mask = torch.zeros(6, dtype=torch.bool)
    assert load_balancing_loss(logits, 2, mask) == 0 and router_z_loss(logits, mask) == 0


@pytest.mark.parametrize("training, capacity_factor", [(False, None), (True, 1.0), (True, 0.5)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_fixed_shape_routing_of_traced_runs_gives_the_outputs_and_gradients_of_the_dropping_one(
    monkeypatch, training, capacity_factor, masked, block
):
    """torch.compile / torch.export take the routing whose shapes do not depend on the data (a
    dropped choice keeps its slot with weight 0): it must compute exactly what the eager one does."""
    torch.manual_seed(0)
    layer = TokenChoice(tiny_config("token_choice", n_embd=8, n_expert=4, expert_size=4, num_experts_per_tok=2,
                                    capacity_factor=capacity_factor, block=block)).train(training)
    x = torch.randn(3, 5, 8)
    mask = torch.rand(3, 5) > 0.3 if masked else None
    results = []
    for traced in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: traced)
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y, logits = layer(xi, mask)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y, xi.grad, layer.lin1.grad, layer.lin2.grad, layer.controller.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    if training and capacity_factor == 0.5:
        assert (results[0][0].abs().sum(-1) == 0).any(), "the test should drop some choices"


@pytest.mark.parametrize("k", [1, 2])  # top-1 takes a path of its own (the output times its gate)
@pytest.mark.parametrize("block", BLOCKS)
def test_one_token_decode_of_traced_runs_gathers_the_chosen_experts(monkeypatch, block, k):
    torch.manual_seed(0)
    layer = TokenChoice(tiny_config("token_choice", n_embd=8, n_expert=4, expert_size=4, num_experts_per_tok=k, block=block)).eval()
    x = torch.randn(1, 1, 8)
    eager, _ = layer(x)
    sorted_path, _ = layer(torch.cat([x, torch.randn(1, 1, 8)]))  # two tokens: sorted by expert, grouped
    torch.testing.assert_close(eager, sorted_path[:1])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced, _ = layer(x)
    torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("training, capacity_factor, masked", [(False, None, True), (True, 1.0, False), (True, 0.5, True)])
@pytest.mark.parametrize("block", BLOCKS)  # llama: SwiGLU experts, lin1 read as their gated `gate_up_proj`
def test_transformers_experts_functions_give_our_outputs_and_gradients_with_masks_and_capacity(
    implementation, training, capacity_factor, masked, block
):
    from unittest.mock import Mock, patch

    from transformers.integrations import moe

    torch.manual_seed(0)
    layer = TokenChoice(tiny_config("token_choice", n_embd=8, n_expert=4, expert_size=4, num_experts_per_tok=2,
                                    capacity_factor=capacity_factor, block=block)).train(training)
    x = torch.randn(3, 5, 8)
    mask = torch.rand(3, 5) > 0.3 if masked else None
    function = Mock(wraps=moe.ALL_EXPERTS_FUNCTIONS[implementation])
    results = []
    with patch.dict(moe.ALL_EXPERTS_FUNCTIONS._global_mapping, {implementation: function}):
        for name in ("eager", implementation):
            layer.config._experts_implementation = name
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y, _ = layer(xi, mask)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            results.append((y, xi.grad, layer.lin1.grad, layer.lin2.grad, layer.controller.grad))
            assert function.called == (name == implementation)
    for ours, theirs in zip(*results):
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def reference_expert_choice(x, mask, controller, lin1, lin2, group_size, capacity, gated=False):
    """design.md §5 with loops: padding rows and masked tokens are simply not candidates."""
    B, S, d = x.shape
    E = controller.shape[1]
    valid = torch.ones(B, S, dtype=torch.bool) if mask is None else mask
    y = torch.zeros_like(x)
    for start in range(0, B, group_size):
        for s in range(S):
            rows = [r for r in range(start, min(start + group_size, B)) if valid[r, s]]
            if not rows:
                continue
            xs = torch.stack([x[r, s] for r in rows])
            score = torch.softmax(xs @ controller, dim=-1)  # (n, E)
            for e in range(E):
                for i in score[:, e].topk(min(capacity, len(rows))).indices.tolist():
                    y[rows[i], s] += score[i, e] * plain_ffn(xs[i], lin1[e], lin2[e], gated)
    return y


@pytest.mark.parametrize("batch, group_size, capacity_factor", [(8, 4, None), (8, 4, 2.0), (4, 4, 4.0), (7, 4, 2.0)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_expert_choice_equals_plain_reference(batch, group_size, capacity_factor, masked, block):
    layer = ExpertChoice(tiny_config("expert_choice", n_embd=8, n_expert=2, expert_size=5, group_size=group_size,
                                     capacity_factor=capacity_factor, num_experts_per_tok=1, block=block)).double()
    with torch.no_grad():
        layer.controller.normal_(0, 1.0)
    x = torch.randn(batch, 3, 8, dtype=torch.float64)
    mask = (torch.rand(batch, 3) > 0.4) if masked else None
    expected = reference_expert_choice(x, mask, layer.controller, layer.lin1, layer.lin2, group_size, layer.capacity, layer.gated)
    assert torch.allclose(layer(x, mask)[0], expected, atol=1e-10)


@pytest.mark.parametrize("k, norm", [(1, False), (1, True), (2, False), (2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", BLOCKS)
def test_decode_without_a_graph_gives_the_general_paths_outputs_bit_for_bit(block, dtype, k, norm):
    """One token under no_grad / inference_mode takes `_decode`; with autograd on it takes the general
    path. Both must give the same bits, and the logits too."""
    torch.manual_seed(0)
    layer = TokenChoice(tiny_config("token_choice", n_embd=8, n_expert=4, expert_size=4, num_experts_per_tok=k,
                                    norm_topk_prob=norm, block=block)).to(dtype).eval()
    x = torch.randn(1, 1, 8, dtype=dtype)
    general, general_logits = layer(x)
    with torch.inference_mode():
        assert layer._decode(x) is not None, "one token with no graph should take the decode path"
        decoded, logits = layer(x)
    assert torch.equal(decoded, general) and torch.equal(logits, general_logits)
    with torch.no_grad():
        assert torch.equal(layer(x)[0], general)


@pytest.mark.parametrize("k", [1, 2])
def test_decode_follows_the_experts_through_updates_new_storage_and_copies(k):
    """Decode keeps views of every expert's matrices (`TokenChoice._views`). They must see an in-place
    update and give way to new storage (`.to()`, a new Parameter, `load_state_dict(assign=True)`); the
    old ones are freed then, never kept as a second copy of the experts (a weight swapped out, as
    offloading does, is freed with its views), and a copy of the layer decodes with its own."""
    import copy
    import gc
    import pickle
    import weakref

    torch.manual_seed(0)
    layer = TokenChoice(tiny_config("token_choice", n_embd=8, n_expert=4, expert_size=4, num_experts_per_tok=k)).eval()
    x = torch.randn(1, 1, 8)

    def decode_equals_general():
        with torch.no_grad():
            assert layer._decode(x) is not None
            decoded = layer(x)[0]
        return torch.equal(decoded, layer(x.to(layer.lin1.dtype).requires_grad_())[0].detach())

    def storage(weight):  # a weak reference to the storage of `weight`
        return weakref.ref(weight.untyped_storage())

    assert decode_equals_general() and "_expert_views" in layer.__dict__
    with torch.no_grad():  # an optimizer step: in place
        layer.lin1.mul_(-2.0)
        layer.lin2.add_(0.5)
    assert decode_equals_general()
    lin1, float32 = layer.lin1, storage(layer.lin1)
    layer.to(torch.float64)  # new storage in the same Parameter: the float32 views are dropped at once
    gc.collect()
    assert layer.lin1 is lin1 and "_expert_views" not in layer.__dict__ and float32() is None
    del lin1
    x = x.double()
    assert decode_equals_general()
    dtype = layer._expert_views[2][0].dtype  # (not inside an assert: pytest would keep the views it shows)
    assert dtype == torch.float64
    layer.lin1.data = torch.randn_like(layer.lin1)  # new storage in the same Parameter, not through .to(): told by its address
    assert decode_equals_general()
    old = storage(layer.lin2)
    layer.lin2 = torch.nn.Parameter(torch.randn_like(layer.lin2))  # a new Parameter: the old one dies, its views with it
    gc.collect()
    assert old() is None and decode_equals_general()
    old = storage(layer.lin1)
    layer._parameters["lin1"] = torch.nn.Parameter(torch.empty_like(layer.lin1, device="meta"))  # swapped out (offloading)
    gc.collect()
    assert old() is None and "_expert_views" not in layer.__dict__
    layer.load_state_dict({name: torch.randn(*t.shape, dtype=torch.float64) for name, t in layer.state_dict().items()}, assign=True)
    assert decode_equals_general()
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_expert_views" not in twin.__dict__
        with torch.no_grad():
            assert torch.equal(twin(x)[0], layer(x)[0])
        address = twin._expert_views[0]
        assert address == twin.lin1.data_ptr() != layer.lin1.data_ptr()


def test_decode_falls_back_to_the_general_path_where_it_does_not_apply():
    torch.manual_seed(0)
    layer = TokenChoice(tiny_config("token_choice", n_embd=8, n_expert=4, expert_size=4, router_bias_update_rate=0.1)).eval()
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        assert layer._decode(x) is None  # a selection bias picks the experts
        del layer._buffers["expert_bias"]
        assert layer._decode(x) is not None
        assert layer._decode(x.to(torch.bfloat16)) is None  # the router runs in float32: a cast first
        layer.config._experts_implementation = "grouped_mm"
        assert layer._decode(x) is None


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every read of a tensor's values back to the host (on a GPU, each one a sync: the queue
    drains, then waits for the next launches), forward or backward, but transformers' causal mask's
    own: the operations that go through torch's dispatcher (.item(), bincount, nonzero, a boolean
    index, ...) and, patched while the mode is on, .tolist() (which reads a CPU tensor's memory
    directly)."""

    READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default", "aten.bincount.default",
             "aten.masked_select.default", "aten._unique2.default", "aten.repeat_interleave.Tensor", "aten.one_hot.default"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def note(self, what: str) -> None:
        import traceback

        stack = traceback.extract_stack()[:-2]
        if not any(f.filename.endswith("masking_utils.py") for f in stack):
            where = next((f for f in reversed(stack) if "/torch/" not in f.filename), stack[-1])
            self.seen.append(f"{what} at {where.filename}:{where.lineno}")

    def __enter__(self):
        tolist = self._tolist = torch.Tensor.tolist
        torch.Tensor.tolist = lambda tensor: (self.note("tolist"), tolist(tensor))[1]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = str(func) == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if str(func) in self.READS or boolean_index:
            self.note(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ffn_type, fields, autocast", [
    ("token_choice", {}, False), ("token_choice", {"router_bias_update_rate": 0.01}, False),
    ("token_choice", {}, True), ("token_choice", {"block": "llama"}, True), ("mot", {"use_discrete_routing": True}, False),
])
def test_a_training_step_reads_nothing_back_to_the_host(ffn_type, fields, autocast, monkeypatch):
    """Dropless Token Choice training (no padding) runs on a GPU without a sync: routing, counting, the
    experts (under bf16 autocast too: grouped, not a loop over the counts), the load-balancing loss and
    the selection bias's counts all stay on the device (here on the CPU, counting as on a GPU); so does
    MoT, discrete routing too. The detector is checked as well: a one-token decode reads its expert
    ids (top-1: .item(); top-2: .tolist()), and it sees both."""
    from mot_transition import MoTLMHeadModel
    from mot_transition.layers import token_choice

    monkeypatch.setattr(token_choice, "_HOST_COUNTED", ())
    torch.manual_seed(0)
    config = tiny_config(ffn_type, n_embd=16, n_expert=4, expert_size=8, num_experts_per_tok=2,
                         router_aux_loss_coef=0.01, router_z_loss_coef=0.001, **fields)
    model = MoTLMHeadModel(config).train()
    ids = torch.randint(0, config.vocab_size, (4, 8))
    with _HostReads() as reads:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
    assert (out.aux_loss is not None) == (ffn_type == "token_choice") and reads.seen == []
    for k, read in ((1, "item"), (2, "tolist")):
        layer = TokenChoice(tiny_config("token_choice", n_embd=16, num_experts_per_tok=k)).eval()
        with _HostReads() as reads, torch.inference_mode():
            layer(torch.randn(1, 1, 16))
        assert any(read in seen for seen in reads.seen), reads.seen
