"""Expert parallelism with token dispatch (the trainer's `train.expert_parallel = N`, docs/training.md).

N processes share out each expert layer's E experts, E / N each (process j of the group holds experts
j*E/N .. (j+1)*E/N - 1), while every process keeps its own batch, as under data parallelism. An expert
layer computes what its experts should process from its own tokens, sends each expert's rows to the
process that holds it (one all-to-all), runs its own experts on what it received from every process,
and sends the results back (a second all-to-all). Autograd runs the same exchanges in reverse, so the
gradient of an expert reaches its process from every process's tokens.

Both expert layouts go through `ExpertParallel.run`:

    Token Choice             the (token, choice) slots sorted by expert, `counts` per expert (ragged)
    MoT, Expert Choice       (E, n, d): every expert's n mixtures (MoT) or chosen tokens (Expert Choice),
                             flattened expert-major; counts = n for every expert

Nothing of the layer's math moves: the router and its softmax run where the tokens are (MoT's groups and
Expert Choice's picks stay inside each process's micro-batch, as under data parallelism), so a layer gives
the output it gives without expert parallelism, to float tolerance.

Every process of the group must run the same layers in the same order (a forward is collective): the
trainer keeps them in lockstep, evaluation included.
"""

from typing import Callable

import torch
import torch.distributed as dist


class ExpertParallel:
    """The group of processes that share out a layer's experts, and this process's place in it."""

    def __init__(self, group, size: int, rank: int, n_expert: int):
        if n_expert % size:
            raise ValueError(f"{n_expert} experts cannot be shared out equally over {size} processes")
        self.group, self.size, self.rank = group, size, rank
        self.n_local = n_expert // size

    def run(self, tokens: torch.Tensor, counts: torch.Tensor, local: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Rows `tokens` (R, d) sorted by expert, `counts` (E,) rows per expert: every row through its
        expert, wherever it is held. `local(rows, local_counts)` runs this process's experts on rows
        sorted by local expert. Returns (R, d) in the order of `tokens`."""
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        N, n_local = self.size, self.n_local
        counts = counts.to(torch.long).reshape(N, n_local)
        received_counts = torch.empty_like(counts)  # [source, local expert]
        dist.all_to_all_single(received_counts, counts, group=self.group)
        send = counts.sum(1).tolist()
        receive = received_counts.sum(1).tolist()  # the split sizes are read on the host (as torchtitan does)
        if torch.is_autocast_enabled(tokens.device.type):  # the experts compute in the autocast dtype (bf16): the
            tokens = tokens.to(torch.get_autocast_dtype(tokens.device.type))  # rows travel in it, half fp32's bytes
        rows = all_to_all_single_autograd(tokens.contiguous(), receive, send, self.group)
        # rows arrive by source, then by expert within a source: sort them by expert (stable: by source within)
        expert_of_row = torch.repeat_interleave(torch.arange(n_local, device=counts.device).repeat(N), received_counts.reshape(-1))
        order = torch.argsort(expert_of_row, stable=True)
        out = local(rows.index_select(0, order), received_counts.sum(0))
        back = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return all_to_all_single_autograd(out.index_select(0, back).contiguous(), send, receive, self.group)
