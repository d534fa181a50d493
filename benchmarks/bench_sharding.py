"""What sharding costs and saves, measured: bytes communicated per step against the analytic count,
per-process memory of parameters + gradients + AdamW state (counted just before the optimizer step, where a step holds the most) against 1/N of one process's, and step
time against one process, for DDP, FSDP, HSDP and expert parallelism at 2 and 4 CPU processes over gloo.

    python benchmarks/bench_sharding.py                 # Token Choice d=256, 4 blocks, 16 experts
    python benchmarks/bench_sharding.py --ffn mot --steps 4

Each configuration is one `torchrun --standalone` job running the trainer's own `Trainer` on random
tokens. Bytes are the loopback interface's transmitted bytes (/proc/net/dev, `lo`) over the measured
steps, divided by the processes: gloo's TCP traffic between processes of one machine is all there
is on `lo` while a job runs (run this on an otherwise quiet machine; the idle traffic, measured over
the same time, is subtracted). Memory is counted, not sampled: the bytes of every parameter,
gradient and optimizer tensor a process holds (its local shard of a DTensor). CPU gloo is not a speed
target: step time is reported for completeness.

The analytic count per process and optimizer step, for P float32 parameters (4P bytes) on N
processes with ring collectives (each process sends (N-1)/N of the tensor for an all-gather or a
reduce-scatter, twice that for an all-reduce), with a micro-batches a step:
  DDP  : one all-reduce of the gradients                    2 (N-1)/N x 4P
  FSDP : all-gather in forward and again in backward, per micro-batch, and one reduce-scatter
                                                            (2a + 1) (N-1)/N x 4P
         (Token Choice with a > 1: one more forward per micro-batch, the routing pass of the
         router losses over the global batch: (3a + 1) (N-1)/N x 4P)
  HSDP : as FSDP inside a node of n processes, plus an all-reduce of the 1/n gradient shard across
         the N/n nodes                                      (2a + 1) (n-1)/n x 4P + 2 (N/n-1)/(N/n) x 4P/n
  EP   : (`train.expert_parallel = e`, R = N/e replicas; P = D dense + X expert parameters) DDP's all-reduce
         of the D others over all N, an all-reduce of each process's X/e experts over the R replicas, and
         four all-to-alls per expert layer and micro-batch (dispatch and combine, forward and backward;
         the routing pass adds two), each sending (e-1)/e of the rows the layer gives its experts:
                                                            2 (N-1)/N x 4D + 2 (R-1)/R x 4X/e + 4a x (e-1)/e x rows x 4d
         rows per process, micro-batch and expert layer, for T tokens: Token Choice T x k (counted as if
         routing were balanced: it is the one data-dependent term), MoT E x T/g (one mixture per expert
         and group), Expert Choice E x c x T/g.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def lo_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def held_bytes(model, optimizer) -> int:
    """Bytes of the parameters, gradients and optimizer tensors this process holds."""
    import torch
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    total = 0
    for p in model.parameters():
        total += local(p).numel() * p.element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * p.grad.element_size()
    for entry in optimizer.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                total += local(value).numel() * value.element_size()
    return total


def collectives(args) -> None:
    """What each collective sends over gloo, in units of the ring's (N-1)/N x the whole tensor."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    n = dist.get_world_size()
    whole, part = torch.ones(n * 1_000_000), torch.empty(1_000_000)
    found = {}
    for name, op in (("all-gather", lambda: dist.all_gather_into_tensor(whole, part)),
                     ("reduce-scatter", lambda: dist.reduce_scatter_tensor(part, whole)), ("all-reduce", lambda: dist.all_reduce(whole))):
        op()
        dist.barrier()
        start = lo_tx_bytes()
        op()
        dist.barrier()
        found[name] = (lo_tx_bytes() - start) / n / (whole.numel() * 4 * (n - 1) / n)
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(found))
    dist.destroy_process_group()


def worker(args) -> None:
    """One process of a torchrun job: warm up, then measure `args.steps` optimizer steps."""
    import torch
    import torch.distributed as dist

    from mot_transition.modeling import MoTLMHeadModel
    from mot_transition.train.devices import setup_distributed
    from mot_transition.train.loop import Trainer
    from mot_transition.train.recipe import recipe_from_dict

    world = setup_distributed("cpu")
    torch.set_num_threads(1)
    model_keys = {"ffn_type": args.ffn, "n_embd": args.d, "n_layer": 4, "n_head": 4, "n_expert": 16, "group_size": 4,
                  "moe_layers": [1, 3], "n_positions": args.seq}
    raw = {
        "name": "bench", "seed": 0, "model": model_keys,
        "data": {"seq_len": args.seq, "eval_batches": 1, "eval_batch_size": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"steps": 100, "batch_size": args.batch, "grad_accum": args.accum, "parallel": args.parallel,
                  "expert_parallel": args.expert_parallel,
                  "eval_every": 10_000, "checkpoint_every": 10_000, "log_every": 10_000},
    }
    recipe = recipe_from_dict(raw)
    torch.manual_seed(0)
    model = MoTLMHeadModel(recipe.model_config(args.vocab))
    parameters = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if name.endswith((".mlp.lin1", ".mlp.lin2")) and p.dim() == 3)
    config = model.config
    moe_layers = sum(config.ffn_type_of_layer(i) != "dense" for i in range(config.n_layer))
    generator = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, args.vocab, (args.batch * 8, args.seq), generator=generator)
    trainer = Trainer(model, recipe, sequences, sequences[:8], distributed=world)
    for _ in range(2):  # warm-up: allocations, the optimizer state, gloo's connections
        trainer.step()
    dist_on = world.world_size > 1
    if dist_on:
        dist.barrier()
    idle_start = lo_tx_bytes()
    time.sleep(args.idle)
    idle = lo_tx_bytes() - idle_start
    if dist_on:
        dist.barrier()
    held = {}
    apply_update = trainer.optimizer.step

    def counted_step(*a, **k):  # counted where a step holds the most: gradients there, AdamW state too
        held["bytes"] = held_bytes(trainer.model, trainer.optimizer)
        return apply_update(*a, **k)

    trainer.optimizer.step = counted_step
    start_bytes, start = lo_tx_bytes(), time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    if dist_on:
        dist.barrier()
    seconds = (time.perf_counter() - start) / args.steps
    sent = lo_tx_bytes() - start_bytes
    if world.is_main:
        result = {"parameters": parameters, "expert_parameters": experts, "held_bytes": held["bytes"], "moe_layers": moe_layers,
                  "k": config.num_experts_per_tok, "n_expert": config.n_expert, "group_size": config.group_size,
                  "capacity": getattr(next((m for m in model.modules() if hasattr(m, "capacity")), None), "capacity", None),
                  "bytes_per_step": sent / args.steps, "idle_bytes_per_s": idle / args.idle, "seconds": seconds,
                  "mesh": list(getattr(trainer.model, "sharding_mesh", [world.world_size])), "accumulation": trainer.accumulation}
        Path(args.result).write_text(json.dumps(result))
    if dist_on:
        dist.barrier()
        dist.destroy_process_group()


def analytic(parallel: str, n: int, per_node: int, accumulation: int, parameter_bytes: float, reduce_scatter: float = 1.0,
             routing_pass: bool = False) -> float:
    """Bytes each process sends per optimizer step (module docstring); `reduce_scatter`: what a
    reduce-scatter costs in units of an all-gather of the same tensor (1 for a ring; gloo's: 2);
    `routing_pass`: Token Choice's router losses over the global batch run one more forward per
    micro-batch when there are several (train/balance.py), which a sharded model all-gathers for."""
    if n == 1:
        return 0.0
    if parallel == "ddp":
        return 2 * (n - 1) / n * parameter_bytes
    inner = n if parallel == "fsdp" else per_node
    gathers = 2 * accumulation + (accumulation if routing_pass and accumulation > 1 else 0)
    shard = (gathers + reduce_scatter) * (inner - 1) / inner * parameter_bytes
    nodes = n // inner
    return shard + (2 * (nodes - 1) / nodes * parameter_bytes / inner if nodes > 1 else 0.0)


def analytic_ep(n: int, e: int, accumulation: int, r: dict, args, routing_pass: bool = False) -> float:
    """Bytes each process sends per optimizer step with expert parallelism over e of n processes
    (module docstring)."""
    replicas = n // e
    dense, experts = 4 * (r["parameters"] - r["expert_parameters"]), 4 * r["expert_parameters"]
    tokens = args.batch // (n * accumulation) * args.seq  # per process and micro-batch
    groups = tokens / r["group_size"]
    rows = {"token_choice": tokens * r["k"], "mot": r["n_expert"] * groups,
            "expert_choice": r["n_expert"] * (r["capacity"] or 0) * groups}[args.ffn]
    exchanges = 4 * accumulation + (2 * accumulation if routing_pass and accumulation > 1 else 0)
    sent = exchanges * r["moe_layers"] * (e - 1) / e * rows * 4 * args.d
    return 2 * (n - 1) / n * dense + (2 * (replicas - 1) / replicas * experts / e if replicas > 1 else 0.0) + sent


def run(parallel: str, n: int, per_node: int, args) -> dict:
    """One configuration as its own job; HSDP as n / per_node torchrun agents of per_node processes,
    nodes meeting through a c10d rendezvous on 127.0.0.1."""
    import socket

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        worker_args = [str(Path(__file__).resolve()), "--worker"]  # the options travel in the environment, not past torchrun's parser
        # "ep": DDP with the experts shared out over groups of per_node processes
        options = {**vars(args), "parallel": "ddp" if parallel == "ep" else parallel, "result": str(result),
                   "expert_parallel": per_node if parallel == "ep" else 1}
        if n == 1:
            commands = [[sys.executable, *worker_args]]
        elif parallel == "hsdp":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            commands = [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={n // per_node}", f"--nproc_per_node={per_node}",
                         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=bench-{port}", *worker_args]] * (n // per_node)
        else:
            commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *worker_args]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_SHARDING": json.dumps(options)}
        jobs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
        outputs = [job.communicate()[0] for job in jobs]
        if any(job.returncode for job in jobs):
            raise SystemExit(f"{parallel} x {n} failed:\n" + "\n".join(o[-2000:] for o in outputs))
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ffn", default="token_choice", choices=["dense", "mot", "token_choice", "expert_choice"])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches a step on each process")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only-ep", action="store_true", help="the expert-parallel layouts only (with the collectives and one process)")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds of idle loopback traffic measured before the steps")
    args = parser.parse_args()
    if args.worker:
        options = argparse.Namespace(**json.loads(os.environ["BENCH_SHARDING"]))
        return collectives(options) if options.parallel == "collectives" else worker(options)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 220)
    costs = Table(title="what a collective sends per process over gloo, in units of a ring's (N-1)/N x tensor (4 MB a process)")
    for column in ("processes", "all-gather", "reduce-scatter", "all-reduce"):
        costs.add_column(column, justify="right")
    factors = {}
    for n in (2, 4):
        factors[n] = run("collectives", n, n, args)
        costs.add_row(str(n), *(f"{factors[n][k]:.3f}" for k in ("all-gather", "reduce-scatter", "all-reduce")))
    console.print(costs)
    reduce_scatter = round(factors[2]["reduce-scatter"] / factors[2]["all-gather"])  # gloo: 2, an all-reduce

    single = run("ddp", 1, 1, args)
    parameter_bytes = 4 * single["parameters"]
    table = Table(title=f"{args.ffn}, d={args.d}, {single['parameters']:,} parameters, batch {args.batch} x {args.seq} tokens, "
                        f"{args.accum} micro-batch(es) a step, gloo on CPU")
    for column in ("layout", "MB sent / process / step", "analytic, ring", f"analytic, gloo (reduce-scatter x{reduce_scatter})",
                   "measured / gloo analytic", "MB held / process", "held / (one process's / N)", "step time / one process's"):
        table.add_column(column, justify="right")
    table.add_row("1 process", "0", "0", "0", "", f"{single['held_bytes'] / 1e6:.1f}", "1.000", "1.00")
    layouts = [("ddp", 2, 2), ("fsdp", 2, 2), ("ddp", 4, 4), ("fsdp", 4, 4), ("hsdp", 4, 2)]
    if args.ffn != "dense":
        layouts += [("ep", 2, 2), ("ep", 4, 4), ("ep", 4, 2)]
    if args.only_ep:
        layouts = [layout for layout in layouts if layout[0] == "ep"]
    for parallel, n, per_node in layouts:
        r = run(parallel, n, per_node, args)
        routing_pass = args.ffn == "token_choice"
        if parallel == "ep":
            ring = expected = analytic_ep(n, per_node, r["accumulation"], r, args, routing_pass)
        else:
            ring = analytic(parallel, n, per_node, r["accumulation"], parameter_bytes, 1.0, routing_pass)
            expected = analytic(parallel, n, per_node, r["accumulation"], parameter_bytes, reduce_scatter, routing_pass)
        sent = (r["bytes_per_step"] - r["idle_bytes_per_s"] * r["seconds"]) / n
        label = f"{parallel} x {n}" + (f" ({n // per_node} nodes x {per_node})" if parallel == "hsdp" else "")
        if parallel == "ep":
            label = f"ddp x {n}, experts over {per_node}" + (f" ({n // per_node} replicas)" if n > per_node else "")
        table.add_row(label, f"{sent / 1e6:.1f}", f"{ring / 1e6:.1f}", f"{expected / 1e6:.1f}", f"{sent / expected:.3f}",
                      f"{r['held_bytes'] / 1e6:.1f}", f"{r['held_bytes'] / (single['held_bytes'] / n):.3f}",
                      f"{r['seconds'] / single['seconds']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
