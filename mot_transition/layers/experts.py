"""What the three expert layers share: one parameterisation and the cross-batch grouping.

Mixture of Tokens, Token Choice and Expert Choice all own the same tensors (docs/design.md §2.2), so a
checkpoint of one kind loads into the others:

    controller (d, E)     MoT controller / router
    lin1       (E, d, f)  first matrix of every expert; (E, d, 2f) for SwiGLU experts: [gate | up]
    lin2       (E, f, d)  second matrix of every expert

Expert e computes FFN_e(z) = act(z @ lin1[e]) @ lin2[e], no bias; a SwiGLU expert ("llama" block
style) computes (act(z @ gate[e]) * (z @ up[e])) @ lin2[e], act = silu, with gate and up the two
halves of lin1[e]: one matmul for both, so every fast path below serves both kinds.

Two layouts of the same math: `experts` (all experts on equally many tokens, one bmm per matrix;
MoT and Expert Choice) and `grouped_experts` (tokens sorted by expert, ragged; Token Choice).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import _grouped_mm as _traced_grouped_mm

from ..config import MoTConfig
from .expert_parallel import ExpertParallel


class ExpertLayer(nn.Module):
    """Base of the expert layers: owns controller, lin1, lin2 and applies the experts."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        d, E, f = config.n_embd, config.n_expert, config.expert_size
        self.n_expert, self.gated = E, config.gated
        self.controller = nn.Parameter(torch.empty(d, E))
        self.lin1 = nn.Parameter(torch.empty(E, d, 2 * f if self.gated else f))
        self.lin2 = nn.Parameter(torch.empty(E, f, d))
        self.act = ACT2FN[config.activation_function]
        # the experts this process runs, when they are sharded across processes (parallel_plans.py); None: all
        self.local_experts: slice | None = None
        # the trainer's expert parallelism (expert_parallel.py): this process holds some experts, tokens are dispatched
        self.expert_parallel: ExpertParallel | None = None
        self.reset_parameters(config.initializer_range, config.n_layer)

    @torch.no_grad()
    def reset_parameters(self, std: float, n_layer: int) -> None:
        init.normal_(self.controller, std=std)
        init.normal_(self.lin1, std=std)
        # residual projection, scaled as GPT-2 does for the second matrix of every block
        init.normal_(self.lin2, std=std / math.sqrt(2 * n_layer))

    def experts(self, tokens: torch.Tensor) -> torch.Tensor:
        """All experts at once on their own token sets: (E, n, d) -> (E, n, d)."""
        ep = self.expert_parallel
        if ep is not None:  # this process's experts on what every process sends them
            E, n, d = tokens.shape
            counts = torch.full((E,), n, dtype=torch.long, device=tokens.device)
            run = lambda rows, local: self._all_experts(rows.view(ep.n_local, -1, d)).reshape(-1, d)  # noqa: E731
            return ep.run(tokens.reshape(E * n, d), counts, run).view(E, n, d)
        return self._all_experts(tokens)

    def _all_experts(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.activate(torch.bmm(tokens, _local(self.lin1))), _local(self.lin2))

    def grouped_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert on its own slice of tokens sorted by expert: (n, d), counts (E,) -> (n, d).

        torch's grouped matmul runs every expert in one call, from the counts tensor (no Python loop,
        no host read). What it does not take (float64, rows not a multiple of 16 bytes) runs one matmul
        per expert instead. Under torch.compile / torch.export, transformers' own dispatcher decides
        (torch's compiler takes grouped matmuls in bfloat16 only; other dtypes run an opaque loop).
        """
        if self.expert_parallel is not None:  # this process's experts on what every process sends them
            return self.expert_parallel.run(tokens, counts, self._grouped_local)
        return self._grouped_local(tokens, counts)

    def _grouped_local(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        lin1, lin2 = _local(self.lin1), _local(self.lin2)
        if torch.is_autocast_enabled(tokens.device.type):  # grouped_mm is not autocast: cast as bmm would be
            dtype = torch.get_autocast_dtype(tokens.device.type)
            tokens, lin1, lin2 = tokens.to(dtype), lin1.to(dtype), lin2.to(dtype)
        if torch.compiler.is_compiling():  # transformers' dispatcher: torch's kernel where the compiler takes it, else an opaque op
            offsets = counts.cumsum(0, dtype=torch.int32)
            return _traced_grouped_mm(self.activate(_traced_grouped_mm(tokens, lin1, offsets)), lin2, offsets)
        if _grouped_mm_takes(tokens, lin1, lin2):
            offsets = counts.cumsum(0, dtype=torch.int32)  # end row of every expert
            return F.grouped_mm(self.activate(F.grouped_mm(tokens, lin1, offs=offsets)), lin2, offs=offsets)
        pieces = tokens.split(counts.tolist())
        return torch.cat([self.activate(p @ w1) @ w2 for p, w1, w2 in zip(pieces, lin1.unbind(0), lin2.unbind(0))])

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """act(h) of a fresh matmul output h (..., f), or act(gate) * up of h = [gate | up] (..., 2f)."""
        return activate(h, self.act, self.gated)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x @ controller in at least float32: router math never runs in half precision, not even
        under autocast (which would otherwise turn this matmul back into bf16)."""
        controller = self.controller
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.promote_types(x.dtype, torch.float32)
            with torch.autocast(x.device.type, enabled=False):
                return x.to(dtype) @ controller.to(dtype)
        if x.dtype == controller.dtype and x.dtype in _AT_LEAST_FLOAT32:  # the common case: no cast, no dtype arithmetic (decode pays per op)
            return x @ controller
        dtype = torch.promote_types(x.dtype, torch.float32)
        return x.to(dtype) @ controller.to(dtype)


_AT_LEAST_FLOAT32 = (torch.float32, torch.float64)  # the dtypes that promote_types(dtype, float32) leaves as they are


def _grouped_mm_takes(tokens: torch.Tensor, lin1: torch.Tensor, lin2: torch.Tensor) -> bool:
    """Whether torch's grouped matmul takes these tokens (n, d) and expert matrices, as they will be
    multiplied (under autocast: cast). Else `_grouped_local` runs one matmul per expert, which reads
    the counts back to the host (a sync on a GPU) and loops in Python."""
    (f, d), size = lin2.shape[-2:], tokens.element_size()
    return (
        hasattr(F, "grouped_mm") and tokens.dtype == lin1.dtype
        and tokens.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and (d * size) % 16 == 0 and (f * size) % 16 == 0
    )


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This process's block of an expert matrix sharded over processes (a DTensor: the trainer's expert
    parallelism, or transformers' parallel plans), else the matrix."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def activate(h: torch.Tensor, act: nn.Module, gated: bool) -> torch.Tensor:
    """The activation of an FFN (dense or expert) applied to the fresh output h of its first matmul:
    act(h), or act(gate) * up for h = [gate | up] (SwiGLU). ReLU works in place (`_ReLUInPlace`)."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    if not isinstance(act, nn.ReLU):
        return act(h)
    return _ReLUInPlace.apply(h) if h.requires_grad else h.relu_()  # no autograd, no Function overhead


class _ReLUInPlace(torch.autograd.Function):
    """ReLU that overwrites its input, and in backward its incoming gradient.

    Both are fresh matmul results that nothing else reads (the matmul's backward needs its inputs,
    not its output). On CPU, allocating another tensor of the layer's widest shape, (tokens, f),
    costs more than the ReLU itself: the pages are faulted in and zeroed on first touch.
    """

    @staticmethod
    def forward(ctx, h):
        ctx.mark_dirty(h)
        ctx.save_for_backward(h.relu_())
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad)


def group_across_batch(x: torch.Tensor, token_mask: torch.Tensor | None, group_size: int):
    """Group g different batch rows at the same position (docs/design.md §2.5).

    x (B, S, d), token_mask (B, S) bool or None  ->  xg (G, g, S, d), valid (G, g, S), with
    G = ceil(B / g). Rows added to fill the last group, and masked positions, are invalid and
    zeroed (with `where`, so that a NaN or inf under the mask cannot leak into a mixture).
    """
    B, S, d = x.shape
    valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if token_mask is None else token_mask.bool()
    pad = (-B) % group_size
    if pad:
        x = torch.cat([x, x.new_zeros(pad, S, d)])
        valid = torch.cat([valid, valid.new_zeros(pad, S)])
    G = x.shape[0] // group_size
    valid = valid.view(G, group_size, S)
    xg = torch.where(valid[..., None], x.view(G, group_size, S, d), 0.0)
    return xg, valid


def ungroup(yg: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(G, g, S, d) -> (B, S, d), dropping the rows added to fill the last group."""
    G, g, S, d = yg.shape
    return yg.reshape(G * g, S, d)[:batch_size]


def group_by_position(x: torch.Tensor, token_mask: torch.Tensor | None, group_size: int):
    """The same groups laid out for batched matmuls: one contiguous (g, d) block per group.

    x (B, S, d), token_mask (B, S) bool or None  ->  xg (G*S, g, d), keep (G*S, g, 1) bool or None
    (None: every token valid). Group G*S + s holds batch rows G*g .. G*g + g-1 at position s. Rows added
    to fill the last group and masked positions are zeroed and not kept. Costs one copy of x.
    """
    B, S, d = x.shape
    pad = (-B) % group_size
    G = (B + pad) // group_size
    keep = None
    if token_mask is not None or pad:
        valid = torch.ones(B, S, dtype=torch.bool, device=x.device) if token_mask is None else token_mask.bool()
        valid = torch.cat([valid, valid.new_zeros(pad, S)])
        x = torch.cat([x, x.new_zeros(pad, S, d)]).masked_fill(~valid[..., None], 0.0)  # NaN under the mask too
        keep = valid.view(G, group_size, S).transpose(1, 2).reshape(G * S, group_size, 1)
    return x.view(G, group_size, S, d).transpose(1, 2).reshape(G * S, group_size, d), keep


def ungroup_by_position(yg: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """(G*S, g, ...) -> (B, S, ...), dropping the rows added to fill the last group."""
    n, g = yg.shape[:2]
    G = n // seq_len
    return yg.view(G, seq_len, g, -1).transpose(1, 2).reshape(G * g, seq_len, -1)[:batch_size]
