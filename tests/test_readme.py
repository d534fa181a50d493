"""The front page works as written (issue 25): the README's Python runs, its command lines are ones
the CLI takes, its transformers example loads an export without this package, and nothing in the
repository points outside it (a document that is not here, a path on one machine, a dead link)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def section(text: str, heading: str) -> str:
    """The text under the level-2 `heading`, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# the README's Python


def test_the_python_api_example_runs_and_prints_what_its_comment_says():
    (block,) = code_blocks(section(README.read_text(), "From Python"), "python")
    said = re.search(r"print\(.*#.*: (\S.*)$", block, flags=re.MULTILINE)
    assert said, "the example's print has no comment saying what it prints"
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == said.group(1).strip()


def test_the_transformers_example_loads_an_export_with_no_import_of_this_package(tmp_path, tokenizer_dir):
    """The README's plain-transformers block, run where runs/mine/qwen3moe is an export (of a tiny
    untrained llama-style Token Choice model), with `import mot_transition` made to fail."""
    from transformers import AutoTokenizer

    from conftest import tiny_config
    from mot_transition.export import export_checkpoint
    from mot_transition.modeling import MoTLMHeadModel

    text = section(README.read_text(), "From your corpus to a served model")
    (block,) = [b for b in code_blocks(text, "python") if "AutoModelForCausalLM" in b]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config("token_choice", block="llama", qk_norm=True, vocab_size=len(tokenizer), n_positions=64)
    MoTLMHeadModel(config).save_pretrained(tmp_path / "tc")
    tokenizer.save_pretrained(tmp_path / "tc")
    export_checkpoint(tmp_path / "tc", tmp_path / "runs" / "mine" / "qwen3moe")
    guarded = "import sys\nsys.modules['mot_transition'] = None  # import mot_transition raises ImportError\n" + block
    result = subprocess.run([sys.executable, "-c", guarded], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def main("), result.stdout


# ---------------------------------------------------------------------------------------------
# the README's command lines


def readme_command_lines() -> list[str]:
    """Every `mot-transition ...` line of the README's bash blocks, and every inline one."""
    text = README.read_text()
    lines = [line.split(" #")[0].strip() for block in code_blocks(text, "bash") for line in block.splitlines()]
    inline = re.findall(r"`(mot-transition [^`]*)`", text)
    return [line for line in lines if line.startswith("mot-transition ")] + [
        line for line in inline if not re.search(r"[A-Z]{2,}|\[|\.\.\.", line)  # not a synopsis like `train RECIPE [--out DIR]`
    ]


def test_the_readme_has_the_whole_path_in_commands():
    commands = {shlex.split(line)[1] for line in readme_command_lines()}
    assert {"prepare", "train", "convert", "transition", "compare", "export", "run"} <= commands, commands


@pytest.mark.parametrize("line", readme_command_lines())
def test_every_readme_command_line_is_one_the_cli_takes(line):
    """Parsed as the CLI parses it, and a recipe with its overrides loads: a renamed option, a
    removed recipe or a key that no longer exists fails here."""
    import typer

    import mot_transition.cli  # noqa: F401  (registers the commands)
    from mot_transition.cli.app import app
    from mot_transition.study.grid import is_grid_file, load_grid
    from mot_transition.train import load_recipe

    words = shlex.split(line)
    command = typer.main.get_command(app).commands[words[1]]
    context = command.make_context(words[1], words[2:])
    assert not context.args
    if words[1] == "study" and is_grid_file(context.params["recipe"]):
        load_grid(context.params["recipe"])  # a study grid: its recipe, sizes and sweep check out
    elif words[1] in ("train", "run", "study"):
        load_recipe(context.params["recipe"], context.params.get("overrides") or ())


# ---------------------------------------------------------------------------------------------
# nothing points outside the repository

OLD_SPEC = re.compile(r"\bS" r"PEC\b")  # the document this project once cited; written so this file does not cite it
OUTSIDE = [
    (OLD_SPEC, "cites the old spec, which is not in the repository: cite docs/design.md"),
    (re.compile(r"\.\./shared\b"), "points to the shared folder beside the checkout, outside the repository"),
    (re.compile(r"(?<![\w.~-])/wor[k]/"), "names a path on one machine (a folder under /work)"),
]


def tracked_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are not known")
    return [ROOT / name for name in names.decode().split("\0") if name and (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def test_no_tracked_file_points_outside_the_repository():
    found = []
    for path in tracked_files():
        text = text_of(path)
        for number, line in enumerate((text or "").splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{number}: {why}" for pattern, why in OUTSIDE if pattern.search(line)]
    assert not found, "\n".join(found)


def test_the_outside_patterns_find_what_they_are_for():
    lines = ["see S" + "PEC section 3", "(.." + "/shared/spec.md)", "cd /" + "work/main && make"]
    assert [any(p.search(line) for p, _ in OUTSIDE) for line in lines] == [True, True, True]
    assert not any(p.search("SPECIAL, spec, ~/work/x, /tmp/network/x") for p, _ in OUTSIDE)


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes for a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated one numbered."""
    made, seen = set(), {}
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        made.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return made


def test_anchors_are_made_as_github_makes_them():
    page = "# A page\n## 10.2 The comparison\n## llama.cpp: `export --to gguf`\n## Notes\n## Notes\n```\n# not a heading\n```\n"
    assert anchors(page) == {"a-page", "102-the-comparison", "llamacpp-export---to-gguf", "notes", "notes-1"}


def test_every_link_between_the_documents_reaches_a_file_and_heading_of_the_repository():
    files = tracked_files()
    tracked = {path.resolve() for path in files}
    broken = []
    for page in (path for path in files if path.suffix == ".md"):
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            where = (page.parent / file).resolve() if file else page.resolve()
            if not where.is_relative_to(ROOT):
                broken.append(f"{page.relative_to(ROOT)}: {target} leaves the repository")
            elif where not in tracked and not (where.is_dir() and any(t.is_relative_to(where) for t in tracked)):
                broken.append(f"{page.relative_to(ROOT)}: {target} is no file of the repository")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} has no heading '{anchor}'")
    assert not broken, "\n".join(broken)
