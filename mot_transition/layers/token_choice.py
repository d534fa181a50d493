"""Token Choice sparse MoE (docs/design.md §4): every token picks its top-k experts by router probability.

    p      = softmax(x @ controller over the E experts)     (N, E), float32
    chosen = top-k of p; gate = p (or renormalised over the k)
    y      = sum over chosen e of gate_e * FFN_e(x)

The (token, choice) pairs are sorted by expert into slots; all experts then run at once on their
contiguous slices (`ExpertLayer.grouped_experts`), and one gather-weight-sum brings the outputs back
(`_Dispatch`, `_Combine`: gathers both ways, no scatter). A single token (one-sequence decode) skips
the sort and runs its k experts directly; with no autograd graph it skips the layer's general checks
too (`TokenChoice._decode`: the same operations, the same bits). The experts sit under transformers' experts-implementation
switch (`RoutedExperts`).

In training a `capacity_factor` caps each expert at ceil(cf * N * k / E) slots (N = B * S), first
come first served in order of sequence position, then batch row, so that dropping stays causal (a
dropped token passes through the residual only); evaluation is always dropless, so a sequence's
output does not depend on the rest of the batch. Invalid tokens (attention-masked positions) are
not routed.
"""

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from ..config import MoTConfig
from .experts import _AT_LEAST_FLOAT32, ExpertLayer, _local, activate


@use_experts_implementation(is_transposed=True, has_gate=False)
class RoutedExperts(nn.Module):
    """The experts of a Token Choice layer, (tokens (N, d), expert ids (N, k), weights (N, k)) -> (N, d),
    under transformers' experts-implementation switch (`config._experts_implementation`:
    `from_pretrained(..., experts_implementation=...)` or `model.set_experts_implementation(...)`). "eager",
    the default, is ours (below, and the dropping routing of `TokenChoice`); "grouped_mm" and "batched_mm"
    are transformers' own functions, which read the expert matrices under the names they expect: lin1
    (E, d, f) and lin2 (E, f, d) are transposed and without bias in their terms, and lin1 of SwiGLU
    experts, (E, d, 2f) = [gate | up], is their concatenated `gate_up_proj`.

    It owns no tensor: the layer that owns it does (`controller`, `lin1`, `lin2` keep their names,
    docs/design.md §2.2), and this module reads them through it. Being a module of its own, it is what
    transformers' expert parallelism hooks (`ep_dispatch_experts`: its forward gets the tokens routed
    to this rank's experts); a sharded matrix is read as this rank's local block."""

    def __init__(self, config: MoTConfig, owner: "TokenChoice"):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner holds the tensors

    up_proj = gate_up_proj = lin1 = property(lambda self: _local(self._owner.lin1))
    down_proj = lin2 = property(lambda self: _local(self._owner.lin2))
    act_fn = act = property(lambda self: self._owner.act)
    gated = property(lambda self: self._owner.gated)
    # the experts held here (fewer than the router's under expert parallelism: transformers' `grouped_gemm`
    # style sets them on the owner of the matrices), and whether they are a shard (ids past them: skipped)
    num_experts = property(lambda self: self._owner.num_experts)
    _is_expert_parallel = property(
        lambda self: self._owner._is_expert_parallel, lambda self, value: setattr(self._owner, "_is_expert_parallel", value)
    )
    expert_parallel = property(lambda self: self._owner.expert_parallel)  # the trainer's (expert_parallel.py)
    activate = ExpertLayer.activate
    grouped_experts = ExpertLayer.grouped_experts
    _grouped_local = ExpertLayer._grouped_local

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Every token (N, d) through its k experts (N, k), weighted (N, k): (N, d). The implementation
        the switch names runs; this one is "eager"."""
        if self._is_expert_parallel:  # an id past this rank's experts (weight 0) is another rank's: computed by a local one, weighs 0
            skipped = top_k_index >= self.num_experts
            top_k_index = top_k_index.clamp(max=self.num_experts - 1)
            top_k_weights = top_k_weights.masked_fill(skipped, 0.0)
        return self._dropless(hidden_states, top_k_index, top_k_weights)

    def _dropless(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Ours: every choice computed."""
        N, k = top_k_index.shape
        if N == 1 and self.expert_parallel is None:  # one-token decode: run the k chosen experts, nothing to sort
            return self._one_token(hidden_states, top_k_index, top_k_weights)
        order = torch.argsort(top_k_index.reshape(-1), stable=True)  # choice c = t * k + j behind every slot
        slots = _Slots(order, order // k, _inverse(order).view(N, k), None)
        xs = _Dispatch.apply(hidden_states, slots)  # (N * k, d), sorted by expert
        return _Combine.apply(self.grouped_experts(xs, _count(top_k_index, self.num_experts)), top_k_weights, slots)

    def _one_token(self, flat: torch.Tensor, expert: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """A single token through its k experts: (1, d) -> (1, d)."""
        if torch.compiler.is_compiling():  # gather the k experts' matrices: no host read of the expert ids
            chosen = expert.view(-1)
            h = self.activate(torch.matmul(flat, self.lin1[chosen]))  # (k, 1, f)
            return gate @ torch.matmul(h, self.lin2[chosen]).squeeze(1)
        owner = self._owner  # its tensors read directly: a module's attribute lookup is what decode pays for here
        params = owner._parameters  # (a parametrized weight, LoRA's on the experts say, is not there: the attribute then)
        lin1 = _local(params["lin1"] if "lin1" in params else owner.lin1)
        lin2 = _local(params["lin2"] if "lin2" in params else owner.lin2)
        return _chosen_experts(flat, lin1, lin2, self.act, self.gated, expert.view(-1).tolist(), gate)


class TokenChoice(ExpertLayer):
    # the experts module (RoutedExperts), where transformers' MoE models have theirs: `mlp.experts`
    # (it shadows ExpertLayer.experts, the all-experts bmm of MoT and Expert Choice, unused here)
    experts = property(lambda self: self._modules["experts"])

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.config = config
        self.num_experts = config.n_expert  # held here; fewer when the experts are sharded (parallel_plans.py)
        self._is_expert_parallel = False
        self.experts = RoutedExperts(config, self)
        self.experts.has_gate = self.gated  # for transformers' experts functions (the decorator set it to False)
        if config.router_bias_update_rate > 0:  # balancing by a selection bias (train/balance.py update_expert_bias)
            self.register_buffer("expert_bias", torch.zeros(config.n_expert))
        # this process's choices per expert since the bias was last updated: not a buffer, which DDP would
        # overwrite with rank 0's at every forward
        self.routed_tokens: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        if token_mask is None and x.numel() == x.shape[-1] and not torch.is_grad_enabled():
            decoded = self._decode(x)  # one token, no graph: one-sequence decode, per layer per token
            if decoded is not None:
                return decoded
        B, S, d = x.shape
        flat = x.reshape(-1, d)  # (N, d)
        logits = self.router_logits(flat)  # (N, E) float32
        probs = torch.softmax(logits, dim=-1)
        bias = self._buffers.get("expert_bias")  # not getattr: a missing attribute of a module raises inside, slowly
        if bias is None:
            gate, expert = probs.topk(self.top_k, dim=-1)  # (N, k)
        else:  # the bias picks the experts; the gates are the router's own probabilities
            expert = (probs + bias).topk(self.top_k, dim=-1).indices
            gate = probs.gather(1, expert)
            if self.training and torch.is_grad_enabled():  # a training forward (not the trainer's routing pass)
                with torch.no_grad():
                    chosen = _count(expert if token_mask is None else expert[token_mask.reshape(-1)], self.n_expert)
                    self.routed_tokens = chosen if self.routed_tokens is None else self.routed_tokens + chosen
        if self.norm_topk_prob:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        gate = gate if gate.dtype == x.dtype else gate.to(x.dtype)
        sharded = self._is_expert_parallel  # the experts module then reaches this rank's experts (parallel_plans.py)
        ours = _experts_implementation(self.config) in (None, "eager") and not sharded  # None: a layer outside a model
        experts = self.experts._dropless if ours else self.experts  # the latter: the switch, and parallel hooks
        if token_mask is not None or (self.training and self.capacity_factor is not None):
            if ours and not torch.compiler.is_compiling():
                return self._dropping(flat, expert, gate, token_mask, B, S).view(B, S, d), logits
            # traced, or transformers' experts: shapes fixed by the input, a dropped choice is computed and weighs 0
            gate = gate * self._kept(expert, token_mask, B, S).to(gate.dtype)
        return experts(flat, expert, gate).view(B, S, d), logits

    def _decode(self, x: torch.Tensor):
        """`forward` of one token with no autograd graph, in as few Python and tensor steps as it takes:
        the same operations as the general path (router in float32, softmax, top-k, the chosen experts
        directly), which decode would otherwise pay for in checks, calls and attribute lookups (about a
        few percent of the layer's time at d=512, benchmarks/RESULTS-layers.md). None where that path does
        not apply: a selection bias, experts sharded or not ours, a traced run, autocast, a precision
        below float32, or matrices that are not plain parameters (sharded, or parametrized, LoRA say)."""
        params = self._parameters
        controller, lin1, lin2 = params.get("controller"), params.get("lin1"), params.get("lin2")
        if (
            type(controller) is not nn.Parameter or type(lin1) is not nn.Parameter or type(lin2) is not nn.Parameter
            or x.dtype is not controller.dtype or x.dtype not in _AT_LEAST_FLOAT32 or "expert_bias" in self._buffers
            or self.expert_parallel is not None or self._is_expert_parallel or torch.compiler.is_compiling()
            or _experts_implementation(self.config) not in (None, "eager") or torch.is_autocast_enabled(x.device.type)
        ):
            return None
        flat = x.view(1, -1)
        logits = flat @ controller  # (1, E)
        gate, expert = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        views = self.__dict__.get("_expert_views")  # lin1[e] and lin2[e] of every expert, made once (`_views`)
        if views is None or views[0] != lin1.data_ptr() or views[1] != lin2.data_ptr() or len(views[2]) != len(lin1):
            views = self._views(lin1, lin2)
        if self.top_k > 1:
            return _chosen_experts(flat, views[2], views[3], self.act, self.gated, expert.view(-1).tolist(), gate).view(x.shape), logits
        e = expert.item()  # top-1 inlined (`_chosen_experts`' first case): one host read, no list, no call
        return ((activate(flat @ views[2][e], self.act, self.gated) @ views[3][e]) * gate).view(x.shape), logits

    def _views(self, lin1: torch.Tensor, lin2: torch.Tensor) -> tuple:
        """Decode's views of every expert's matrices: making `lin1[e]` anew at every token costs decode 3-4%
        (benchmarks/RESULTS-layers.md), reading this attribute and checking two addresses less. They see
        every in-place change (an optimizer step, `load_state_dict`); new storage is told by its address.
        They never hold the experts' memory longer than the Parameters do: views of a detached
        alias (not of the Parameter), dropped when a Parameter dies (its weights swapped out, as offloading
        does) or gets new storage (`.to()`), and never pickled or copied."""
        layer = weakref.ref(self)

        def forget(_):
            if (alive := layer()) is not None:
                alive.__dict__.pop("_expert_views", None)

        views = (lin1.data_ptr(), lin2.data_ptr(), lin1.detach().unbind(0), lin2.detach().unbind(0),
                 weakref.ref(lin1, forget), weakref.ref(lin2, forget))
        self.__dict__["_expert_views"] = views
        return views

    def _apply(self, fn, recurse=True):  # .to(), .half(): new storage, maybe in the same Parameter; free the old now
        self.__dict__.pop("_expert_views", None)
        return super()._apply(fn, recurse)

    def __getstate__(self):  # pickle, deepcopy: the copy makes its own
        state = super().__getstate__()  # (nn.Module's is already a copy of __dict__)
        state.pop("_expert_views", None)
        return state

    def _dropping(self, flat, expert, gate, token_mask, B: int, S: int) -> torch.Tensor:
        """Our experts, skipping the dropped choices: (N, d) -> (N, d)."""
        # choice c = t * k + j is token t's j-th expert; a slot is a row of the expert-sorted buffer
        order, counts = self._route(expert, token_mask, B, S)  # (n,) choice behind every slot, (E,) slots per expert
        if order.numel() == 0:  # every token masked: zeros, still attached to the graph
            # under expert parallelism this process still takes part in the exchanges, both ways
            none = 0.0 if self.expert_parallel is None else self.grouped_experts(flat[:0], counts).sum()
            return flat.new_zeros(flat.shape) + 0.0 * gate.sum() + none
        slots = _Slots.of(order, expert.shape, flat.dtype)
        xs = _Dispatch.apply(flat, slots)  # (n, d), sorted by expert
        return _Combine.apply(self.grouped_experts(xs, counts), gate, slots)

    def _route(self, expert: torch.Tensor, token_mask: torch.Tensor | None, B: int, S: int):
        """Sort the choices (N, k) by expert, then by arrival (sequence position first, batch row second);
        drop masked tokens and, in training with a capacity factor, the choices past each expert's capacity.
        Returns the choice index of every kept slot (n,) and the slots per expert (E,)."""
        E, k, N = self.n_expert, self.top_k, B * S
        if token_mask is not None:
            expert = torch.where(token_mask.reshape(-1, 1), expert, E)  # E = not routed, sorts last
        arrival = torch.arange(N, device=expert.device).view(S, B).t().reshape(-1, 1)  # token b*S+s -> s*B+b
        expert = expert.reshape(-1)
        order = torch.argsort((expert.view(N, k) * N + arrival).view(-1))  # keys are unique
        counts = torch.bincount(expert, minlength=E + 1)
        capacity_factor = self.capacity_factor if self.training else None  # eval is dropless
        if capacity_factor is None:
            return (order if token_mask is None else order[: counts[:E].sum()]), counts[:E]
        capacity = math.ceil(capacity_factor * N * k / E)  # N counts every slot, padding too: see docs/model.md
        sorted_expert = expert[order]
        rank = torch.arange(order.numel(), device=expert.device) - (counts.cumsum(0) - counts)[sorted_expert]
        return order[(sorted_expert < E) & (rank < capacity)], counts[:E].clamp(max=capacity)

    def _kept(self, expert: torch.Tensor, token_mask: torch.Tensor | None, B: int, S: int) -> torch.Tensor:
        """Which choices (N, k) `_route` keeps, computed with shapes that depend on the input's shape only
        (for torch.compile, torch.export and transformers' experts functions)."""
        E, k, N = self.n_expert, self.top_k, B * S
        valid = torch.ones_like(expert, dtype=torch.bool) if token_mask is None else token_mask.reshape(-1, 1).expand(N, k)
        if not (self.training and self.capacity_factor is not None):
            return valid
        capacity = math.ceil(self.capacity_factor * N * k / E)
        arrival = torch.arange(N, device=expert.device).view(S, B).t().reshape(-1, 1)
        order = torch.argsort(((expert * 2 + (~valid).long()) * N + arrival).view(-1))  # within an expert: valid first
        counts = _count(expert, E)
        rank = torch.arange(N * k, device=expert.device) - (counts.cumsum(0) - counts)[expert.reshape(-1)[order]]
        kept_sorted = valid.reshape(-1)[order] & (rank < capacity)
        return torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted).view(N, k)


def _chosen_experts(flat, lin1, lin2, act, gated: bool, chosen: list[int], gate: torch.Tensor) -> torch.Tensor:
    """One token (1, d) through its chosen experts (ids read to the host), weighted by gate (1, k): (1, d)."""
    if len(chosen) == 1:  # top-1: the one output scaled by its gate (1, 1), a product as gate @ out is: no cat, no matmul
        e = chosen[0]
        return (activate(flat @ lin1[e], act, gated) @ lin2[e]) * gate
    return gate @ torch.cat([activate(flat @ lin1[e], act, gated) @ lin2[e] for e in chosen])  # k x (1, d)


def _experts_implementation(config) -> str | None:
    """`config._experts_implementation`, read where transformers keeps it without its attribute hooks
    (PreTrainedConfig's `__getattribute__` costs microseconds a read, which one-token decode pays per layer)."""
    if torch.compiler.is_compiling():  # traced once: the plain read, which the compiler follows
        return config._experts_implementation
    stored = object.__getattribute__(config, "__dict__")
    if "_experts_implementation_internal" in stored:
        return stored["_experts_implementation_internal"]
    return config._experts_implementation


# where `_count` takes bincount: on the CPU, reading the largest id costs nothing, and index_add_ would
# open a parallel region (milliseconds when the other cores are busy)
_HOST_COUNTED = ("cpu",)


def _count(expert: torch.Tensor, E: int) -> torch.Tensor:
    """Choices per expert (E,), of expert ids of any shape in [0, E)."""
    flat = expert.reshape(-1)
    if flat.device.type in _HOST_COUNTED and not torch.compiler.is_compiling():
        return torch.bincount(flat, minlength=E)
    # bincount sizes its output by the largest id, read to the host: on a GPU a sync (the GPU's queue
    # drains, then waits for the next launches), traced a size that depends on the data
    return torch.zeros(E, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: the slot of every choice."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


class _Slots(NamedTuple):
    """Where every choice went. A dropped choice (masked token, or past capacity) points at slot 0
    with weight 0, so it adds 0 times a real token's (finite) expert output: exactly 0. (Traced runs
    and transformers' experts functions keep every choice in a slot and give a dropped one gate 0
    instead: `TokenChoice._kept`.)"""

    order: torch.Tensor  # (n,) the choice behind every slot
    token: torch.Tensor  # (n,) the token behind every slot
    slot: torch.Tensor  # (N, k) the slot of every choice
    kept: torch.Tensor | None  # (N, k) 1.0 for a kept choice, 0.0 for a dropped one; None: none dropped

    @staticmethod
    def of(order: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> "_Slots":
        n, (N, k) = order.numel(), shape
        if n == N * k:
            return _Slots(order, order // k, _inverse(order).view(N, k), None)
        slot = torch.zeros(N * k, dtype=order.dtype, device=order.device)
        slot[order] = torch.arange(n, device=order.device)
        kept = torch.zeros(N * k, dtype=dtype, device=order.device).index_fill_(0, order, 1.0).view(N, k)
        return _Slots(order, order // k, slot.view(N, k), kept)


class _Dispatch(torch.autograd.Function):
    """Tokens into expert order, xs = x[token of every slot]: (N, d) -> (n, d).

    The gradient is a gather too (each token sums the gradients of its k slots) where autograd would
    scatter with index_add_, which is not deterministic on GPU and, on CPU, opens a parallel region
    however small the input (milliseconds when the other cores are busy).
    """

    @staticmethod
    def forward(ctx, flat, slots):
        ctx.slots = slots
        return flat.index_select(0, slots.token)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        s = ctx.slots
        return F.embedding_bag(s.slot, grad.contiguous(), mode="sum", per_sample_weights=s.kept), None


class _Combine(torch.autograd.Function):
    """Expert outputs back into token order, weighted by the gates: y[t] = sum_j gate[t, j] out[slot[t, j]].

    One fused gather-weight-sum (embedding_bag) forward; backward, each slot reads its token's gradient.
    """

    @staticmethod
    def forward(ctx, out, gate, slots):
        weights = (gate if slots.kept is None else gate * slots.kept).to(out.dtype)  # (N, k)
        ctx.save_for_backward(out, weights)
        ctx.slots, ctx.gate_dtype = slots, gate.dtype
        return F.embedding_bag(slots.slot, out, mode="sum", per_sample_weights=weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (out, weights), s = ctx.saved_tensors, ctx.slots
        grad_slots = grad.contiguous().index_select(0, s.token)  # (n, d)
        grad_gate = torch.zeros(weights.numel(), dtype=out.dtype, device=out.device)
        grad_gate[s.order] = torch.einsum("nd,nd->n", grad_slots, out)
        if s.kept is not None:  # a dropped choice that kept a slot (traced runs) gets no gradient either
            grad_gate = grad_gate * s.kept.reshape(-1)
        grad_out = grad_slots.mul_(weights.view(-1)[s.order, None])
        return grad_out, grad_gate.view_as(weights).to(ctx.gate_dtype), None


def load_balancing_loss(router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e over the valid tokens, from raw router logits (N, E).

    f_e is the fraction of tokens that chose expert e among their top k and P_e the mean router
    probability of e. Uniform routing gives top_k (as in Mixtral); a collapsed router gives up to E.
    Masked tokens weigh 0 (shapes stay fixed, for torch.export); with no valid token the loss is 0.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    E = probs.shape[-1]
    # (N, E) 1.0 where chosen (a token's k ids differ); not one_hot, which checks its ids on the host (a GPU sync)
    chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    return E * (_valid_mean(chosen, token_mask) * _valid_mean(probs, token_mask)).sum()


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean(logsumexp(logits)^2) over the valid tokens (ST-MoE's router z-loss); 0 with none."""
    return _valid_mean(torch.logsumexp(router_logits.float(), dim=-1).pow(2)[:, None], token_mask).squeeze(0)


def _valid_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the rows of values (N, C) whose token is valid: (C,). A masked row counts as 0, even
    a non-finite one."""
    if token_mask is None:
        return values.mean(dim=0)
    valid = token_mask.reshape(-1, 1).bool()
    return torch.where(valid, values, 0.0).sum(dim=0) / valid.sum().clamp(min=1)
