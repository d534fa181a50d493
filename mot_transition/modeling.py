"""The MoT model family: a pre-norm transformer, GPT-2 or Llama style (docs/design.md §8), whose feed-forward
layers are dense, Mixture of Tokens, Token Choice or Expert Choice (design.md §2 to §7).

    MoTModel                        trunk: embeddings, blocks, final norm
    MoTLMHeadModel                  causal LM, generate() with a KV cache

and the task heads on the same trunk in heads.py.

Every head's loss adds the router losses of the Token Choice layers times their coefficients;
the unweighted `aux_loss` (load balancing) and `z_loss` are returned beside it, and the router
logits of every expert layer on request (`output_router_logits=True`). The outputs are
transformers' own classes (outputs.py); attention goes through transformers' attention interface.
"""

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import MoTAttention, build_norm, eager_attention_forward, rotary_embedding  # noqa: F401  (eager_attention_forward: its old home)
from .config import MoTConfig, package_module
from .layers import DenseFFN, ExpertLayer, build_ffn, load_balancing_loss, router_z_loss
from .layers.balance import BatchRouting, batch_router_losses
from .parallel_plans import check_layout  # (and registers the parallel styles the config's plans name)
from .outputs import CACHE_FIELD, MoTCausalLMOutput, MoTModelOutput, one_cache

# the keyword under which `create_causal_mask` takes the KV cache: `cache` from transformers 5.24
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


class MoTBlock(GradientCheckpointingLayer):
    def __init__(self, config: MoTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = build_norm(config, config.n_embd)
        self.attn = MoTAttention(config, layer_idx)
        self.ln_2 = build_norm(config, config.n_embd)
        self.mlp = build_ffn(config, layer_idx)
        self.mlp_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self, x, attn_mask=None, cache=None, token_mask=None, output_attentions=False, position_embeddings=None,
        **attention_kwargs,
    ):
        """(x, router logits or None, attention weights or None). `attention_kwargs` reach the
        attention implementation (`position_ids` for padding-free flash attention, for example)."""
        h, weights = self.attn(self.ln_1(x), attn_mask, cache, output_attentions, position_embeddings, **attention_kwargs)
        x = x + h
        y, router_logits = self.mlp(self.ln_2(x), token_mask)
        return x + self.mlp_dropout(y), router_logits, weights


class MoTPreTrainedModel(PreTrainedModel):
    config_class = MoTConfig
    config: MoTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["MoTBlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _can_record_outputs = {
        "hidden_states": MoTBlock,
        "attentions": OutputRecorder(MoTAttention, index=1),
        "router_logits": OutputRecorder(ExpertLayer, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std, n_layer = self.config.initializer_range, self.config.n_layer
        if isinstance(module, MoTAttention):  # GPT-2's scaled init of residual projections
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * n_layer))
        elif isinstance(module, (ExpertLayer, DenseFFN)):
            module.reset_parameters(std, n_layer)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """The experts of Token Choice layers sit under transformers' experts-implementation switch
        (layers/token_choice.py: `RoutedExperts`); a model without them ignores it."""
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Our own experts ("eager") unless another implementation is asked for: they skip dropped
        choices and are the faster on CPU (benchmarks/)."""
        return "eager" if requested_experts is None else super().get_correct_experts_implementation(requested_experts)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Nothing to do: every save writes `auto_map` and the files that load this model without
        the package (MoTConfig.save_pretrained). transformers' own way copies this class's file and
        fails on a package's relative imports. (Loaded as remote code, transformers' way is kept.)"""
        if package_module("remote_code") is None:  # this class runs as remote code
            return super().register_for_auto_class(auto_class)

    def _resolve_parallel_plans(self, distributed_config):
        """transformers' resolution of the config's plans, after refusing a layout it cannot give us."""
        check_layout(distributed_config, self.config)
        return super()._resolve_parallel_plans(distributed_config)

    def set_group_size(self, group_size: int) -> None:
        """Change the MoT / Expert Choice group size in place (1 = no mixing: per-sequence inference)."""
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        self.config.group_size = group_size
        for module in self.modules():
            if hasattr(module, "group_size"):
                module.group_size = group_size

    def _encode(self, input_ids, attention_mask, inputs_embeds, output_router_logits, output_hidden_states, output_attentions):
        """The trunk's outputs for a task head (no KV cache)."""
        return self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False,
            return_dict=True, **self._output_flags(output_hidden_states, output_router_logits, output_attentions),
        )

    def _output_flags(self, output_hidden_states, output_router_logits, output_attentions) -> dict:
        """The output_* flags for the trunk, resolved against the config here: the trunk's recorder
        reads a flag passed as None as off."""
        config = self.config
        return dict(
            output_hidden_states=config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            output_router_logits=config.output_router_logits if output_router_logits is None else output_router_logits,
            output_attentions=config.output_attentions if output_attentions is None else output_attentions,
        )

    @staticmethod
    def _passed_on(out: MoTModelOutput) -> dict:
        """What a task head returns of the trunk's outputs."""
        return dict(
            aux_loss=out.aux_loss, z_loss=out.z_loss, router_logits=out.router_logits, hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def router_losses(self, outputs: MoTModelOutput) -> torch.Tensor | float:
        """The router losses times their coefficients, to add to a task loss."""
        total = 0.0
        if outputs.aux_loss is not None:
            total = total + self.config.router_aux_loss_coef * outputs.aux_loss
        if outputs.z_loss is not None and self.config.router_z_loss_coef:
            total = total + self.config.router_z_loss_coef * outputs.z_loss
        return total


class MoTModel(MoTPreTrainedModel):
    batch_routing: BatchRouting | None = None  # the router losses over a whole global batch (layers/balance.py)

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # learned absolute positions ("gpt2"), or rotary ones in every attention layer ("llama")
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if config.block == "gpt2" else None
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(MoTBlock(config, i) for i in range(config.n_layer))
        self.ln_f = build_norm(config, config.n_embd)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, embeddings):
        self.wte = embeddings

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        output_router_logits: bool | None = None,
        output_attentions: bool | None = None,
        *,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoTModelOutput:
        """`cache` (or its older name `past_key_values`): the KV cache to extend. Hidden states,
        attention weights and router logits are recorded by transformers' `capture_outputs` hooks
        (`_can_record_outputs`); attention weights come from the eager implementation, whichever is
        configured."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        config = self.config
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        if use_cache is None:  # training never builds a KV cache unless asked (activation checkpointing reruns blocks)
            use_cache = config.use_cache and not self.training
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        cache = one_cache(cache, past_key_values) if use_cache else None
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        if cache is not None and not isinstance(cache, DynamicCache) and config.mixes_batch_rows():
            raise ValueError(
                f"a {type(cache).__name__} serves compiled per-sequence decoding, and this model mixes the "
                f"tokens of {config.group_size} batch rows in its {config.ffn_type} layers: use the dynamic "
                "cache, or convert it to Token Choice first (mot-transition convert)"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if not torch.compiler.is_compiling() and past + S > config.n_positions:
            raise ValueError(f"sequence of {past + S} tokens is longer than n_positions={config.n_positions}")
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if padding is not None and padding.shape[-1] != past + S:
            raise ValueError(f"attention_mask covers {padding.shape[-1]} positions, expected {past + S}")

        if position_ids is None:
            if padding is not None:  # left padding: positions count real tokens only
                position_ids = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + S, device=x.device).unsqueeze(0)
        rotary = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            rotary = rotary_embedding(position_ids, config.n_embd // config.n_head, config.rope_theta, x.dtype)
        x = self.drop(x)

        token_mask = None  # the real tokens, for the expert layers and router losses (a 4-D mask says nothing of padding)
        if padding is not None and (torch.compiler.is_compiling() or not bool(padding.all())):
            token_mask = padding[:, past:].bool()  # a mask of all ones is skipped, except when traced
        attn_mask = create_causal_mask(
            config=config, inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids,
            **{_MASK_CACHE_ARG: cache},
        )

        router_logits = []
        for block in self.h:
            x, logits, _ = block(
                x, attn_mask=attn_mask, cache=cache, token_mask=token_mask, output_attentions=output_attentions,
                position_embeddings=rotary, position_ids=position_ids, **kwargs,
            )
            router_logits.append(logits)
        x = self.ln_f(x)
        aux_loss, z_loss = self._router_losses(router_logits, token_mask)
        return MoTModelOutput(last_hidden_state=x, aux_loss=aux_loss, z_loss=z_loss, **{CACHE_FIELD: cache})

    def _router_losses(self, router_logits, token_mask):
        """Mean over the Token Choice layers of the load-balancing and z losses (None without any).
        The layers are known by the config, not by their module's class, which a wrapper (PEFT's
        LoRA on the expert weights, for one) replaces. In training with `batch_routing` set (the
        trainer does, for a step), this micro-batch's part of the whole global batch's losses."""
        config = self.config
        routed = [r for i, r in enumerate(router_logits) if config.ffn_type_of_layer(i) == "token_choice"]
        if not routed:
            return None, None
        if self.batch_routing is not None and self.training:
            return batch_router_losses(routed, config.num_experts_per_tok, token_mask, self.batch_routing)
        aux = torch.stack([load_balancing_loss(r, config.num_experts_per_tok, token_mask) for r in routed]).mean()
        z = torch.stack([router_z_loss(r, token_mask) for r in routed]).mean()
        return aux, z


class MoTLMHeadModel(MoTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # beside the config's plans for the trunk
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.transformer = MoTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"  # transformers' loss_function; our class name does not say it
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, embeddings):
        self.lm_head = embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int = 0,
        *,
        past_key_values: Cache | None = None,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> MoTCausalLMOutput:
        """`labels` are the input ids (shifted inside; or pass `shift_labels`, the target of every
        position). A target is ignored where it is -100, where it is padding, and where the token
        predicting it is padding (the first real token of a left-padded row). The loss is
        transformers' causal-LM loss (`num_items_in_batch` normalises it across gradient
        accumulation) plus the weighted router losses. `cache` (or its older name
        `past_key_values`): the KV cache to extend."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        out = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
            return_dict=True, **self._output_flags(output_hidden_states, output_router_logits, output_attentions),
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep and labels is None and shift_labels is None:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = lm_loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
            if attention_mask is not None and attention_mask.dim() == 2:  # a target counts when it and the token predicting it are real
                real = attention_mask[:, -shift_labels.shape[1]:].bool()
                shift_labels = shift_labels.masked_fill(~(real & F.pad(real, (0, 1), value=True)[:, 1:]), -100)
            lm_loss = self.loss_function(
                logits, None, self.config.vocab_size, shift_labels=shift_labels.contiguous(),
                num_items_in_batch=num_items_in_batch,
            )
            router = self.router_losses(out)
            if num_items_in_batch is not None and torch.is_tensor(router):
                # transformers' Trainer sums the micro-batches' losses, each normalised by the targets of the
                # whole step (and scales by the processes that average it): the router terms weigh as many
                # of the step's targets as this micro-batch holds, so they keep their configured weight
                router = router * ((shift_labels != -100).sum() / num_items_in_batch)
            loss = lm_loss + router
        return MoTCausalLMOutput(
            loss=loss, lm_loss=lm_loss, aux_loss=out.aux_loss, z_loss=out.z_loss, logits=logits,
            hidden_states=out.hidden_states, attentions=out.attentions, router_logits=out.router_logits,
            **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
        )


__all__ = ["MoTPreTrainedModel", "MoTModel", "MoTLMHeadModel"]
