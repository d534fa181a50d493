"""Benchmark 5: one-sequence generation with the KV cache, tokens per second.

A MoT model (random weights; speed does not depend on them) is converted in memory to Token Choice
with `convert_model` (k = E / g = 1, so its active FLOPs equal a dense model's), and the three are
timed generating the same number of tokens greedily from the same prompt, one sequence at a time:
    converted Token Choice    what the transition produces
    MoT with group_size=1     the only way to run the MoT model on one sequence (every token
                              through all E experts)
    dense                     the same trunk with a dense FFN of width 4d in every block
"""

import torch
from report import Benchmark, Figure
from timing import side_by_side

from mot_transition import MoTConfig, MoTLMHeadModel
from mot_transition.convert import convert_model


def _config(ffn_type: str, quick: bool) -> MoTConfig:
    d = 128 if quick else 512
    return MoTConfig(ffn_type=ffn_type, n_embd=d, n_layer=4, n_head=8, n_expert=32, group_size=32, vocab_size=4096,
                     n_positions=256, eos_token_id=None, bos_token_id=None, pad_token_id=0)


def generation_speed(quick: bool = False) -> Benchmark:
    torch.manual_seed(0)
    mot = MoTLMHeadModel(_config("mot", quick)).eval()
    token_choice, _ = convert_model(mot)
    token_choice.eval()
    c = MoTConfig(**mot.config.to_dict())  # as trained, before the group size changes
    mot.set_group_size(1)
    dense = MoTLMHeadModel(_config("dense", quick)).eval()
    prompt = torch.randint(0, 4096, (1, 16))
    new_tokens = 8 if quick else 32

    def generate(model):
        def run():
            with torch.inference_mode():
                out = model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            assert out.shape[1] == prompt.shape[1] + new_tokens
        return run

    t = side_by_side(
        {"token_choice": generate(token_choice), "mot_g1": generate(mot), "dense": generate(dense)},
        **({"rounds": 2, "warmup": 1} if quick else {"rounds": 7, "warmup": 1}),
    )
    rate = {name: new_tokens / t.median(name) for name in t.seconds}
    return Benchmark(
        5, "One-sequence generation: converted Token Choice, MoT with group_size=1, dense",
        f"Greedy generation of {new_tokens} tokens after a {prompt.shape[1]}-token prompt, batch 1, KV cache, float32, "
        f"`model.generate`. Models: d={c.n_embd}, {c.n_layer} blocks of which {c.moe_layers} MoE, E={c.n_expert}, "
        f"g={c.group_size}, expert width {c.expert_size}; Token Choice from `convert_model` "
        f"(k={token_choice.config.num_experts_per_tok}); dense: FFN width {4 * c.n_embd} in every block (the active "
        f"FLOPs of the Token Choice model). Ratios are of tokens/s (above 1: faster), per round.",
        f"Median time for {new_tokens} tokens: Token Choice {t.median('token_choice'):.2f} s, MoT group_size=1 "
        f"{t.median('mot_g1'):.2f} s, dense {t.median('dense'):.2f} s.",
        [
            Figure("converted Token Choice", rate["token_choice"], "tok/s"),
            Figure("MoT, group_size=1", rate["mot_g1"], "tok/s"),
            Figure("dense, equal active FLOPs", rate["dense"], "tok/s"),
            Figure("Token Choice / dense, tokens/s", t.ratio("dense", "token_choice"), "x", spread=t.spread("dense", "token_choice"),
                   note="1 = as fast as dense"),
            Figure("Token Choice / MoT group_size=1, tokens/s", t.ratio("mot_g1", "token_choice"), "x", spread=t.spread("mot_g1", "token_choice")),
        ],
    )


def compiled_decode(quick: bool = False) -> Benchmark:
    """Benchmark 7: the standard compiled-decoding recipe (static KV cache + torch.compile of the
    forward, fullgraph) against eager decoding, for the converted Token Choice model and dense."""
    torch.manual_seed(0)
    token_choice, _ = convert_model(MoTLMHeadModel(_config("mot", quick)).eval())
    models = {"token_choice": token_choice.eval(), "dense": MoTLMHeadModel(_config("dense", quick)).eval()}
    prompt = torch.randint(0, 4096, (1, 16))
    new_tokens = 8 if quick else 32

    def generate(model, **options):
        def run():
            with torch.inference_mode():
                out = model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, **options)
            assert out.shape[1] == prompt.shape[1] + new_tokens
        return run

    candidates, outputs = {}, {}
    for name, model in models.items():
        compiled = MoTLMHeadModel(model.config)
        compiled.load_state_dict(model.state_dict())
        compiled.eval().forward = torch.compile(compiled.forward, fullgraph=True, dynamic=False)
        candidates[f"{name}_eager"] = generate(model)
        candidates[f"{name}_static"] = generate(model, cache_implementation="static")
        candidates[f"{name}_compiled"] = generate(compiled, cache_implementation="static")
        with torch.inference_mode():  # the compiled model decodes the same tokens (compiles here, before timing)
            outputs[name] = [m.generate(input_ids=prompt, max_new_tokens=new_tokens, do_sample=False, **o)
                             for m, o in ((model, {}), (compiled, {"cache_implementation": "static"}))]
    t = side_by_side(candidates, **({"rounds": 2, "warmup": 1} if quick else {"rounds": 7, "warmup": 1}))
    rate = {name: new_tokens / t.median(name) for name in t.seconds}
    same = all(torch.equal(*pair) for pair in outputs.values())
    c = token_choice.config
    return Benchmark(
        7, "Compiled decoding: static KV cache + torch.compile against eager",
        f"Greedy generation of {new_tokens} tokens after a {prompt.shape[1]}-token prompt, batch 1, float32. "
        f"Eager: `generate` with the dynamic cache; static: `cache_implementation=\"static\"`; compiled: the static "
        f"cache and `torch.compile(model.forward, fullgraph=True, dynamic=False)`, compiled before timing. Models as "
        f"in benchmark 5 (d={c.n_embd}, Token Choice k={c.num_experts_per_tok} of E={c.n_expert}). Compiled greedy "
        f"tokens equal eager ones: {same}.",
        f"Median time for {new_tokens} tokens: Token Choice eager {t.median('token_choice_eager'):.3f} s, compiled "
        f"{t.median('token_choice_compiled'):.3f} s; dense eager {t.median('dense_eager'):.3f} s, compiled "
        f"{t.median('dense_compiled'):.3f} s.",
        [
            Figure("Token Choice eager", rate["token_choice_eager"], "tok/s"),
            Figure("Token Choice static cache", rate["token_choice_static"], "tok/s"),
            Figure("Token Choice compiled", rate["token_choice_compiled"], "tok/s"),
            Figure("Token Choice compiled / eager, tokens/s", t.ratio("token_choice_eager", "token_choice_compiled"), "x",
                   spread=t.spread("token_choice_eager", "token_choice_compiled"), note="above 1: compiled is faster"),
            Figure("dense eager", rate["dense_eager"], "tok/s"),
            Figure("dense compiled", rate["dense_compiled"], "tok/s"),
            Figure("dense compiled / eager, tokens/s", t.ratio("dense_eager", "dense_compiled"), "x",
                   spread=t.spread("dense_eager", "dense_compiled"), note="above 1: compiled is faster"),
        ],
    )
