"""The layers of an earlier commit against the working tree's, side by side in one process.

    python benchmarks/before_after.py                  # against 5ac4a3f, the layers before the speed work
    python benchmarks/before_after.py --before REV --threads 1 2

The earlier `mot_transition/layers` package is read with `git show REV:...` into a temporary
package (its relative imports point at the current `mot_transition.config`), so both versions run
on the same inputs and weights, in interleaved rounds, with the same dense FFN as the yardstick.
"""

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_layers as bl
import torch
from timing import side_by_side

from mot_transition.layers import DenseFFN, MixtureOfTokens, TokenChoice

def load_layers(rev: str, into: Path):
    """The layers package of commit `rev`, importable as `layers_<rev>`."""
    package = into / f"layers_{rev}"
    package.mkdir()
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "mot_transition/layers/"], cwd=HERE.parent, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in (Path(n).name for n in names if n.endswith(".py")):
        source = subprocess.run(["git", "show", f"{rev}:mot_transition/layers/{name}"], cwd=HERE.parent, check=True,
                                capture_output=True, text=True).stdout
        (package / name).write_text(source.replace("from ..config import", "from mot_transition.config import"))
    sys.path.insert(0, str(into))
    return importlib.import_module(package.name)


def compare(name, new_layer, old_layer, dense, x, dy, rounds):
    old_layer.load_state_dict(new_layer.state_dict())
    t = side_by_side(
        {"before": bl._training_step(old_layer, x, dy, True), "after": bl._training_step(new_layer, x, dy, True),
         "dense": bl._training_step(dense, x, dy, True)},
        rounds=rounds,
    )
    print(f"{name:40s} before {t.ratio('before', 'dense'):.2f}x dense   after {t.ratio('after', 'dense'):.2f}x dense   "
          f"after/before {t.ratio('after', 'before'):.2f}   (dense {t.median('dense') * 1e3:.0f} ms, {torch.get_num_threads()} thread(s))")


def compare_decode(new_layer, old_layer, dense, rounds):
    old_layer.load_state_dict(new_layer.state_dict())
    x = torch.randn(1, 1, bl.D)

    def call(module):
        def run():
            with torch.inference_mode():
                module(x)
        return run

    t = side_by_side({"before": call(old_layer.eval()), "after": call(new_layer.eval()), "dense": call(dense.eval())},
                     rounds=4 * rounds, calls=100)
    print(f"{'2. Token Choice one-token decode':40s} before {t.ratio('before', 'dense'):.2f}x dense   after "
          f"{t.ratio('after', 'dense'):.2f}x dense   after/before {t.ratio('after', 'before'):.2f}   "
          f"(dense {t.median('dense') * 1e6:.0f} us, {torch.get_num_threads()} thread(s))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="5ac4a3f", help="commit whose layers are 'before'")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", type=int, nargs="+", choices=[1, 2, 3], default=[1, 2, 3], help="which comparisons (numbered as printed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = load_layers(args.before, Path(tmp))
        for threads in args.threads:
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            tc_config = bl._config("token_choice", expert_size=bl.TC_EXPERT, num_experts_per_tok=1)
            x, dy = torch.randn(16, 1024, bl.D, requires_grad=True), torch.randn(16, 1024, bl.D)
            if 1 in args.only:
                compare("1. Token Choice fwd+bwd, 16x1024 tokens", TokenChoice(tc_config).train(), old.TokenChoice(tc_config).train(),
                        DenseFFN(bl._config("dense", n_inner=bl.TC_EXPERT)).train(), x, dy, args.rounds)
            if 2 in args.only:
                compare_decode(TokenChoice(tc_config), old.TokenChoice(tc_config), DenseFFN(bl._config("dense", n_inner=bl.TC_EXPERT)),
                               args.rounds)
            if 3 not in args.only:
                continue
            mot_config = bl._config("mot", group_size=32)
            x, dy = torch.randn(128, 128, bl.D, requires_grad=True), torch.randn(128, 128, bl.D)
            compare("3. MoT fwd+bwd, 128x128 tokens", MixtureOfTokens(mot_config).train(), old.MixtureOfTokens(mot_config).train(),
                    DenseFFN(bl._config("dense", n_inner=4 * bl.D)).train(), x, dy, args.rounds)


if __name__ == "__main__":
    main()
