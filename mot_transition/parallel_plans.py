"""The tensor-parallel styles our plans name (MoTConfig.base_model_tp_plan), registered with
transformers' parallel styles; the plans themselves live on the config (docs/design.md §12).

    "mot_feed_forward"    a feed-forward layer `h.*.mlp` whose tensors the plan shards: the dense MLP
                          by its hidden width, MoT and Expert Choice by expert
    "mot_routed_experts"  the experts module of a Token Choice layer, `h.*.mlp.experts`, by expert
    "mot_expert_rows"     an expert matrix (E, ., .), by expert: transformers' "grouped_gemm" under a
                          tensor-parallel plan (which, from transformers 5.25, passes arguments that
                          "grouped_gemm", an expert-parallel style, does not take)

Both leave every rank with the whole batch and a share of the layer's work, and sum the ranks' partial
outputs with one all-reduce; the gradient of every input the layer shares (the hidden states, the MoT
or Expert Choice router, the Token Choice routing weights) is summed over the ranks in backward.

Why a sum is exact, per layer kind (y_i the output for token i):
    dense            y = act(x W1) W2 = sum over blocks b of the hidden width of act(x W1[:, b]) W2[b]
    MoT              y_i = sum_e w[i, e] FFN_e(sum_j w[j, e] x_j): the merge weights of expert e are a
                     softmax over the group in e's router column alone, so each rank mixes, runs and
                     emits for its own experts, and the sum over ranks is the sum over all experts
    Expert Choice    each expert picks its own top tokens from its router column: the same split
    Token Choice     y_i = sum over i's chosen experts; a choice of another rank's expert weighs 0 here
"""

import math

import torch
from torch import nn

try:
    from torch.distributed.tensor import Shard
    from transformers.distributed.expert_parallel import MoEParamShard
    from transformers.distributed.parallel_utils import (
        ALL_PARALLEL_STYLES,
        _AllReduceBackward,
        _AllReduceForward,
        _use_local_dtensor_params,
    )
    from transformers.distributed.tensor_parallel import TensorParallelLayer
except ImportError:  # a torch without torch.distributed, or a transformers below our bound: nothing to register
    ALL_PARALLEL_STYLES = None
    TensorParallelLayer = MoEParamShard = object


def local_experts(n_expert: int, rank: int, size: int) -> slice:
    """The experts that rank `rank` of `size` holds when the expert dimension is sharded (DTensor's
    Shard(0): blocks of ceil(E / size), the last one shorter or empty)."""
    block = math.ceil(n_expert / size)
    return slice(min(rank * block, n_expert), min((rank + 1) * block, n_expert))


def check_layout(distributed_config, config=None) -> None:
    """Refuse, saying why, the layouts transformers cannot give our models. Expert parallelism with FSDP:
    transformers' FSDP2 shards the expert matrices with the experts module that dispatch reaches, on the
    expert mesh, but a Token Choice layer owns its matrices itself (`h.N.mlp.lin1`, `h.N.mlp.lin2` keep
    their names beside the router), so FSDP would take them into the block's unit on the dense mesh.
    Tensor parallelism of the llama block style before torch 2.12: its logits differ from one process's
    (measured with torch 2.9.1, 2.10 and 2.11, every feed-forward kind; equal from 2.12)."""
    if distributed_config is None:
        return
    if (distributed_config.tp_size or 1) > 1 and getattr(config, "block", None) == "llama" and _torch_release() < (2, 12):
        raise NotImplementedError(
            f"tensor parallelism (tp_size > 1) of the llama block style needs torch >= 2.12: with torch "
            f"{torch.__version__} its outputs differ from one process's. Upgrade torch, or use FSDP or expert parallelism"
        )
    # the ranks that see distinct batches (its `dp_size` from 5.24; 5.22 has no replicate dimension)
    data_parallel = (getattr(distributed_config, "dp_replicate_size", None) or 1) * (distributed_config.fsdp_size or 1)
    if (distributed_config.ep_size or 1) > 1 and data_parallel > 1:
        raise NotImplementedError(
            "expert parallelism (ep_size > 1) with FSDP (fsdp_size or dp_replicate_size > 1) is not supported for "
            "this model: its expert matrices belong to the Token Choice layer, not to the experts module that "
            "FSDP would shard on the expert mesh. Use ep_size with tp_size (the experts of each rank, tokens "
            "dispatched), or FSDP alone"
        )


def _torch_release() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


class FeedForwardShard(TensorParallelLayer):
    """A feed-forward layer run on this rank's share of its tensors, its output summed over the ranks.

    Its tensors are sharded by the plan's parameter rules; here the layer runs with them as local tensors
    and an expert layer learns which experts it holds (`local_experts`). A Token Choice layer is left
    alone: its router runs whole on every rank, and its experts module carries the "mot_routed_experts" rule.
    """

    def install_forward(self, module: nn.Module, mesh, **kwargs):  # transformers >= 5.25 adds config=, mesh_manager=
        if isinstance(getattr(module, "experts", None), nn.Module):  # Token Choice: see RoutedExpertsShard
            return module
        group = mesh.get_group()
        if hasattr(module, "local_experts"):
            module.local_experts = local_experts(module.n_expert, mesh.get_local_rank(), mesh.size())
        original_forward = module.forward

        def forward(x, token_mask=None):
            x = _AllReduceBackward.apply(x, group)
            controller = module._parameters.get("controller")
            if controller is not None:  # every rank's router gradient is partial (its experts' share): summed
                module._parameters["controller"] = _AllReduceBackward.apply(controller, group)
            try:
                with _use_local_dtensor_params(module):
                    y, router_logits = original_forward(x, token_mask)
            finally:
                if controller is not None:
                    module._parameters["controller"] = controller
            # in place, on memory of its own: a layer's output may be a strided view (MoT's, for one group)
            return _AllReduceForward.apply(y.contiguous(), group), router_logits

        module.forward = forward
        return module


class RoutedExpertsShard(TensorParallelLayer):
    """The experts module of a Token Choice layer, holding a block of whole experts on each rank (its
    matrices sharded by "mot_expert_rows", which also sets how many it holds). Every rank has every token:
    a choice of another rank's expert gets the id past this rank's experts and weight 0 (skipped by every
    experts implementation), and the ranks' outputs are summed. This is transformers' all-reduce expert
    parallelism, for ranks that share a batch, under a tensor-parallel plan (`tp_size` alone)."""

    def install_forward(self, module: nn.Module, mesh, **kwargs):  # transformers >= 5.25 adds config=, mesh_manager=
        group, rank = mesh.get_group(), mesh.get_local_rank()
        original_forward = module.forward

        def forward(hidden_states, top_k_index, top_k_weights):
            held = module.num_experts
            local = top_k_index - rank * held
            elsewhere = (local < 0) | (local >= held)
            hidden_states = _AllReduceBackward.apply(hidden_states, group)
            top_k_weights = _AllReduceBackward.apply(top_k_weights, group).masked_fill(elsewhere, 0.0)
            out = original_forward(hidden_states, local.masked_fill(elsewhere, held), top_k_weights)
            return _AllReduceForward.apply(out.contiguous(), group)

        module.forward = forward
        return module


class ExpertRowsShard(MoEParamShard):
    """An expert matrix sharded by expert (dim 0) under the tensor-parallel plan: transformers' "grouped_gemm",
    taking (and ignoring) the keyword arguments a tensor-parallel style is given."""

    def __init__(self):
        super().__init__(Shard(0), shards_expert_dim=True)

    def shard_param(self, module, param, mesh, **kwargs):
        return super().shard_param(module, param, mesh)


if ALL_PARALLEL_STYLES is not None:
    ALL_PARALLEL_STYLES.register("mot_feed_forward", FeedForwardShard())
    ALL_PARALLEL_STYLES.register("mot_routed_experts", RoutedExpertsShard())
    ALL_PARALLEL_STYLES.register("mot_expert_rows", ExpertRowsShard())
