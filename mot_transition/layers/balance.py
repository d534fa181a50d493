"""Router losses over the whole global batch, however it is laid out (docs/training.md, "Load balancing").

A training step's global batch may be spread over data-parallel processes and over micro-batches of
gradient accumulation. Computed on each micro-batch alone, the load-balancing loss E * sum_e f_e P_e
depends on that layout: f and P are then means over a micro-batch, and the mean of their products is
not the product of their means, so 2 processes or 2 accumulation steps train another model than one
process would. Here f (the fraction of tokens that chose each expert, which carries no gradient)
comes from the whole global batch, and each micro-batch adds its part of the global P:

    aux = E * sum_e f_e * P_e,   f_e = C_e / N,   P_e = (sum over every token of p_e) / N

with C_e the global count of choices of expert e and N the global count of valid tokens. A micro-batch
holding tokens T contributes E * sum_e f_e * (sum over T of p_e) / N times `share` (the number of
micro-batches in the step over all processes): the trainer averages the micro-batches' losses and
data-parallel training averages the processes' gradients, which undoes the factor, so the sum of the
contributions is the global value and so is its gradient. The z-loss, a mean over tokens, is summed
and divided by N the same way. With one process and one micro-batch this is the usual loss.

The counts come either from a routing pass the trainer runs before the step (gradient accumulation:
the later micro-batches' routing must be known before the first one's backward), or from an
all-reduce inside the forward (several processes, one micro-batch each).
"""


from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class BatchRouting:
    """How the Token Choice layers' router losses see the global batch; set on `MoTModel.batch_routing`
    for a training step (it applies in training mode only).

    share: micro-batches in the step, over all processes.
    counts: (L, E + 1) the whole global batch's `routing_counts`, one row per Token Choice layer; None:
        the forward all-reduces each micro-batch's counts over `group` (data-parallel processes, one
        micro-batch each).
    """

    share: int
    counts: torch.Tensor | None = None
    group: object = None


def routing_counts(router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Choices of each expert by the valid tokens, per layer, and the number of valid tokens:
    (L, E + 1), float32, the last column the token count (every row the same)."""
    valid = None if token_mask is None else token_mask.reshape(-1, 1).float()
    rows = []
    for logits in router_logits:
        N, E = logits.shape
        chosen = torch.zeros(N, E, device=logits.device).scatter_(1, logits.topk(top_k, dim=-1).indices, 1.0)
        if valid is not None:
            chosen = chosen * valid
        tokens = chosen.new_full((1,), float(N)) if valid is None else valid.sum().reshape(1)
        rows.append(torch.cat([chosen.sum(dim=0), tokens]))
    return torch.stack(rows)


def batch_router_losses(
    routed: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None, routing: BatchRouting
) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's part of the global batch's load-balancing and z losses, each a mean over the
    Token Choice layers (see the module's docstring)."""
    counts = routing.counts
    if counts is None:  # several processes, one micro-batch each: count the global batch now
        with torch.no_grad():
            counts = routing_counts(routed, top_k, token_mask)
            dist.all_reduce(counts, group=routing.group)
    counts, tokens = counts[:, :-1], counts[:, -1:].clamp(min=1)
    valid = None if token_mask is None else token_mask.reshape(-1, 1).bool()
    aux, z = [], []
    for i, logits in enumerate(routed):
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        squares = torch.logsumexp(logits, dim=-1, keepdim=True).pow(2)
        if valid is not None:  # a masked row counts as 0, even a non-finite one
            probs, squares = torch.where(valid, probs, 0.0), torch.where(valid, squares, 0.0)
        fraction = counts[i] / tokens[i]
        aux.append(routing.share * probs.shape[-1] * (fraction * probs.sum(dim=0)).sum() / tokens[i, 0])
        z.append(routing.share * squares.sum() / tokens[i, 0])
    return torch.stack(aux).mean(), torch.stack(z).mean()
