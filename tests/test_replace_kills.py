"""Replace, never destroy (issue 24, item 1): `prepare --force` and `export` killed with SIGKILL at
seeded random moments leave the destination as it was or complete, never half of either and never
missing while an old one existed; the same command again completes it and leaves nothing beside it.
And `study` and `eval` killed the same way: the same command again ends as if never killed.

The kills are real SIGKILLs of the CLI's `main()` in children forked from test_faults.py's launcher
(one process that imported the CLI once); moments are drawn from `random.Random(SEED)`, uniform over
an uninterrupted run's duration, plus some inside the write (after the staging folder appears).
Every assertion message names the seed and the moments.
"""

import json
import random
import shutil

from conftest import LM_EVAL
from mot_transition.data.prepare import prepare
from mot_transition.data.shards import PreparedData
from test_faults import SEED, digest, launcher, moments_note, needs_fork, show  # noqa: F401  (launcher: the fixture)
from test_prepare import _big_corpus

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


@needs_fork
def test_study_killed_at_random_moments_goes_on_to_the_numbers_of_a_study_never_killed(launcher, tmp_path, data_dir):  # noqa: F811
    """A micro study (dense, MoT, Token Choice, the conversion and one transition) killed with
    SIGKILL at 3 seeded moments of an uninterrupted run, each kill followed by the same command:
    the rerun ends with every number of the uninterrupted study (wall-clock seconds aside) and no
    lock or staging left; a killed study never leaves a results.json of another study."""
    from test_study import MICRO, without_seconds

    corpus = [*MICRO, f"data.source={json.dumps(str(data_dir / 'corpus.txt'))}"]
    argv = lambda out: ["study", "tiny", *corpus, "--seeds", "1", "--transitions", "25", "--temperatures", "none",  # noqa: E731
                        "--calibrate", "0", "--out", out, "--quiet"]
    env = {"MOT_TRANSITION_CACHE": str(tmp_path / "cache")}
    full_out = tmp_path / "full"
    full = launcher.run(argv(full_out), timeout=600, env=env)
    assert full["returncode"] == 0, full["log"]
    expected = without_seconds(json.loads((full_out / "results.json").read_text()))
    rng = random.Random(SEED)
    moments = sorted(rng.uniform(0, full["elapsed"]) for _ in range(3))
    note = moments_note("study", moments, full["elapsed"])
    hits = []
    for i, kill in enumerate(moments):
        out = tmp_path / f"killed-{i}"
        done = launcher.run(argv(out), kill_at=kill, timeout=600, env=env)
        hits.append(f"study {i}: " + (f"killed at {done['elapsed']:.3f} s" if done["killed"] else f"finished before {show(kill)}"))
        where = "; ".join(hits) + f"; {note}"
        assert done["killed"] or done["returncode"] == 0, f"{done['log']}; {where}"
        if (out / "results.json").exists():  # written last, atomically: only by a study that finished
            assert without_seconds(json.loads((out / "results.json").read_text())) == expected, where
        again = launcher.run(argv(out), timeout=600, env=env)
        assert again["returncode"] == 0, f"the study after the kill failed: {again['log']}; {where}"
        assert without_seconds(json.loads((out / "results.json").read_text())) == expected, f"other numbers; {where}"
        assert beside(out) == [], f"left beside {out}: {beside(out)}; {where}"
    print("\n".join(["", note, *hits]))


@needs_fork
@LM_EVAL
def test_eval_killed_at_random_moments_leaves_no_scores_or_whole_ones(launcher, tmp_path, tokenizer_dir):  # noqa: F811
    """`eval --out SCORES` killed at 4 seeded moments: the scores file is absent or the whole one
    an uninterrupted evaluation writes (the same tasks), and the same command again writes it."""
    from conftest import saved_model
    from test_pipeline import _local_task

    model = saved_model(tmp_path / "model", "token_choice", tokenizer_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _local_task(tasks)
    argv = lambda out: ["eval", model, "--tasks", "tiny_choice", "--include-path", tasks, "--out", out]  # noqa: E731
    env = {"HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    full = launcher.run(argv(tmp_path / "full.json"), timeout=300, env=env)
    assert full["returncode"] == 0, full["log"]
    expected = json.loads((tmp_path / "full.json").read_text())
    rng = random.Random(SEED)
    moments = sorted(rng.uniform(0, full["elapsed"]) for _ in range(4))
    note = moments_note("eval", moments, full["elapsed"])
    for i, kill in enumerate(moments):
        scores = tmp_path / f"killed-{i}.json"
        done = launcher.run(argv(scores), kill_at=kill, timeout=300, env=env)
        assert done["killed"] or done["returncode"] == 0, f"{done['log']}; {note}"
        if scores.exists():
            assert set(json.loads(scores.read_text())) == set(expected), f"eval {i}: a partial scores file; {note}"
        again = argv(scores) + (["--force"] if scores.exists() else [])  # a whole scores file is replaced only with --force
        assert launcher.run(again, timeout=300, env=env)["returncode"] == 0, f"eval {i} again failed; {note}"
        assert set(json.loads(scores.read_text())) == set(expected)
        assert beside(scores) == [], f"left beside {scores}: {beside(scores)}; {note}"
