"""Replace, never destroy (issue 24, item 1): `prepare --force` and `export` killed with SIGKILL at
seeded random moments leave the destination as it was or complete, never half of either and never
missing while an old one existed; the same command again completes it and leaves nothing beside it.

The kills are real SIGKILLs of the CLI's `main()` in children forked from test_faults.py's launcher
(one process that imported the CLI once); moments are drawn from `random.Random(SEED)`, uniform over
an uninterrupted run's duration, plus some inside the write (after the staging folder appears).
Every assertion message names the seed and the moments.
"""

import random
import shutil

from mot_transition.data.prepare import prepare
from mot_transition.data.shards import PreparedData
from test_faults import SEED, digest, launcher, moments_note, needs_fork, show  # noqa: F401  (launcher: the fixture)
from test_prepare import _big_corpus, tokenizer_dir  # noqa: F401  (tokenizer_dir: the fixture)

KILLS, WRITE_KILLS = 6, 2  # uniform over the run; uniform over its write (from the staging folder on)


def beside(dst) -> list[str]:
    """What a run left beside `dst`: its staging `.NAME.converting-PID`, `.NAME.old-PID`, its lock."""
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


def plans_of(full: dict, name: str) -> tuple[list[float], float, float]:
    """Kill moments (s after the fork) from an uninterrupted run: (moments, duration, staging seen at)."""
    duration = full["elapsed"]
    staging = min(t for entry, t in full["appeared"].items() if entry.startswith(f".{name}.converting-"))
    rng = random.Random(SEED)
    moments = [rng.uniform(0, duration) for _ in range(KILLS)] + [rng.uniform(staging, duration) for _ in range(WRITE_KILLS)]
    return moments, duration, staging


@needs_fork
def test_prepare_force_killed_at_random_moments_leaves_the_old_dataset_whole_until_the_new_one_is_complete(launcher, tmp_path, tokenizer_dir):  # noqa: F811
    old_source, new_source = _big_corpus(tmp_path / "old.jsonl", 0.2), _big_corpus(tmp_path / "new.jsonl", 1.0)
    base = prepare([old_source], tmp_path / "base" / "data", tokenizer=tokenizer_dir, shard_tokens=20_000)
    old = digest(base)
    argv = lambda dst: ["prepare", new_source, "--out", dst, "--tokenizer", tokenizer_dir, "--shard-tokens", "20000", "--force"]  # noqa: E731

    full_dst = tmp_path / "full" / "data"
    shutil.copytree(base, full_dst)
    full = launcher.run(argv(full_dst), watch=full_dst.parent)
    assert full["returncode"] == 0, full["log"]
    new = digest(full_dst)
    assert new != old and beside(full_dst) == []
    moments, duration, staging = plans_of(full, "data")
    note = moments_note("prepare --force", moments, duration) + f" (staging from {staging:.3f} s)"

    hits = []
    for i, kill in enumerate(moments):
        dst = tmp_path / f"killed-{i}" / "data"
        shutil.copytree(base, dst)
        done = launcher.run(argv(dst), kill_at=kill)
        state = "missing" if not dst.exists() else "old" if digest(dst) == old else "new" if digest(dst) == new else "DIFFERENT"
        hits.append(f"run {i}: " + (f"killed at {done['elapsed']:.3f} s, --out {state}, beside it {beside(dst)}"
                                    if done["killed"] else f"finished before the kill at {show(kill)}"))
        where = f"run {i}; " + "; ".join(hits) + f"; {note}"
        assert done["killed"] or done["returncode"] == 0, f"{done['log']}; {where}"
        assert state in ("old", "new"), f"--out is {state} after the kill: {sorted(digest(dst)) if dst.exists() else []}; {where}"
        PreparedData(dst)  # whichever it is, it reads

        again = launcher.run(argv(dst))
        assert again["returncode"] == 0, f"prepare --force after the kill failed: {again['log']}; {where}"
        assert digest(dst) == new, f"the rerun's dataset differs from the uninterrupted one; {where}"
        assert beside(dst) == [], f"left beside {dst} after the rerun: {beside(dst)}; {where}"
    print("\n".join(["", note, *hits]))


@needs_fork
def test_export_killed_at_random_moments_leaves_no_destination_the_old_one_or_the_complete_new_one(launcher, tmp_path):  # noqa: F811
    from test_export import llama_model

    src = tmp_path / "ours"
    llama_model().save_pretrained(src)
    source = digest(src)
    old_dst = tmp_path / "old" / "native"  # what --force replaces: an export of other bytes (and a warm-up:
    assert launcher.run(["export", src, old_dst, "--dtype", "bfloat16"])["returncode"] == 0  # a first run is slower)
    old = digest(old_dst)

    full_dst = tmp_path / "full" / "native"
    full_dst.parent.mkdir()
    full = launcher.run(["export", src, full_dst], watch=full_dst.parent)
    assert full["returncode"] == 0, full["log"]
    new = digest(full_dst)
    moments, duration, staging = plans_of(full, "native")
    note = moments_note("export", moments, duration) + f" (staging from {staging:.3f} s)"

    hits = []
    for i, kill in enumerate(moments):  # odd-numbered runs replace an existing export with --force
        dst = tmp_path / f"killed-{i}" / "native"
        replacing = i % 2 == 1
        if replacing:
            shutil.copytree(old_dst, dst)
        else:
            dst.parent.mkdir()
        done = launcher.run(["export", src, dst, *(["--force"] if replacing else [])], kill_at=kill)
        state = "missing" if not dst.exists() else "old" if digest(dst) == old else "new" if digest(dst) == new else "DIFFERENT"
        hits.append(f"export {i}{' (--force over an old one)' if replacing else ''}: "
                    + (f"killed at {done['elapsed']:.3f} s, destination {state}, beside it {beside(dst)}"
                       if done["killed"] else f"finished before the kill at {show(kill)}"))
        where = f"export {i}; " + "; ".join(hits) + f"; {note}"
        assert done["killed"] or done["returncode"] == 0, f"{done['log']}; {where}"
        assert state in (("old", "new") if replacing else ("missing", "new")), f"the destination is {state}; {where}"
        assert digest(src) == source, f"the source changed; {where}"

        again = launcher.run(["export", src, dst, *(["--force"] if dst.exists() else [])])
        assert again["returncode"] == 0, f"export after the kill failed: {again['log']}; {where}"
        assert digest(dst) == new, f"the rerun's export differs from the uninterrupted one; {where}"
        assert beside(dst) == [], f"left beside {dst} after the rerun: {beside(dst)}; {where}"
    print("\n".join(["", note, *hits]))
