"""Token Choice sparse MoE (SPEC 1.2): every token picks its top-k experts by router probability.

    p      = softmax(x @ controller over the E experts)     (N, E), float32
    chosen = top-k of p; gate = p (or renormalised over the k)
    y      = sum over chosen e of gate_e * FFN_e(x)

The (token, choice) pairs are sorted by expert into slots; all experts then run at once on their
contiguous slices (`ExpertLayer.grouped_experts`), and one gather-weight-sum brings the outputs back
(`_Dispatch`, `_Combine`: gathers both ways, no scatter). A single token (one-sequence decode) skips
the sort and runs its k experts directly.

In training a `capacity_factor` caps each expert at ceil(cf * N * k / E) slots (N = B * S), first
come first served in order of sequence position, then batch row, so that dropping stays causal (a
dropped token passes through the residual only); evaluation is always dropless, so a sequence's
output does not depend on the rest of the batch. Invalid tokens (attention-masked positions) are
not routed.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import MoTConfig
from .experts import ExpertLayer


class TokenChoice(ExpertLayer):
    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        self.norm_topk_prob = config.norm_topk_prob

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        B, S, d = x.shape
        flat = x.reshape(-1, d)  # (N, d)
        logits = self.router_logits(flat)  # (N, E) float32
        gate, expert = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        gate = gate if gate.dtype == x.dtype else gate.to(x.dtype)
        if flat.shape[0] == 1 and token_mask is None:  # one-token decode: run the k chosen experts, nothing to sort
            lin1, lin2 = self.lin1, self.lin2
            outs = [self.activate(flat @ lin1[e]) @ lin2[e] for e in expert.view(-1).tolist()]  # k x (1, d)
            return (gate @ torch.cat(outs)).view(B, S, d), logits
        # choice c = t * k + j is token t's j-th expert; a slot is a row of the expert-sorted buffer
        order, counts = self._route(expert, token_mask, B, S)  # (n,) choice behind every slot, (E,) slots per expert
        if order.numel() == 0:  # every token masked: zeros, still attached to the graph
            return x.new_zeros(B, S, d) + 0.0 * gate.sum(), logits
        slots = _Slots.of(order, expert.shape, x.dtype)
        xs = _Dispatch.apply(flat, slots)  # (n, d), sorted by expert
        y = _Combine.apply(self.grouped_experts(xs, counts), gate, slots)  # (N, d)
        return y.view(B, S, d), logits

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


class _Slots(NamedTuple):
    """Where every choice went. A dropped choice (masked token, or past capacity) points at slot 0
    with weight 0, so it adds 0 times a real token's (finite) expert output: exactly 0."""

    order: torch.Tensor  # (n,) the choice behind every slot
    token: torch.Tensor  # (n,) the token behind every slot
    slot: torch.Tensor  # (N, k) the slot of every choice
    kept: torch.Tensor | None  # (N, k) 1.0 for a choice with a slot, 0.0 for a dropped one; None: none dropped

    @staticmethod
    def of(order: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> "_Slots":
        n, (N, k) = order.numel(), shape
        slot = torch.zeros(N * k, dtype=order.dtype, device=order.device)
        slot[order] = torch.arange(n, device=order.device)
        kept = None
        if n < N * k:
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
        grad_out = grad_slots.mul_(weights.view(-1)[s.order, None])
        return grad_out, grad_gate.view_as(weights).to(ctx.gate_dtype), None


def load_balancing_loss(router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e over the valid tokens, from raw router logits (N, E).

    f_e is the fraction of tokens that chose expert e among their top k and P_e the mean router
    probability of e. Uniform routing gives top_k (as in Mixtral); a collapsed router gives up to E.
    """
    logits = router_logits.float()
    if token_mask is not None:
        logits = logits[token_mask.reshape(-1).bool()]
    E = logits.shape[-1]
    if logits.shape[0] == 0:  # no real token: nothing to balance
        return router_logits.sum() * 0.0
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, E).sum(dim=1).float()  # (N, E)
    return E * (chosen.mean(dim=0) * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean(logsumexp(logits)^2) over the valid tokens (ST-MoE's router z-loss)."""
    logits = router_logits.float()
    if token_mask is not None:
        logits = logits[token_mask.reshape(-1).bool()]
    if logits.shape[0] == 0:
        return router_logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
