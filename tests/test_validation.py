"""One declared rule per config key, recipe key and command-line option, enforced everywhere, and
thrown random and adversarial values by Hypothesis (issue 13): whatever comes in, the answer is a
valid object or one line naming the key, never a traceback; nothing is written; input unchanged."""

import dataclasses
import inspect
import math
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli, tiny_config, tree_digest
from mot_transition import MoTConfig
from mot_transition.config import MODEL_RULES, Rule
from mot_transition.convert import token_choice_config
from mot_transition.modeling import MoTLMHeadModel
from mot_transition.options import OPTION_RULES
from mot_transition.train.recipe import RECIPE_RULES, SECTIONS, load_recipe

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,  # the same examples on every run: reproducible CI
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# values a user, a script or a damaged file might give
ANY_VALUE = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1.0, 2**47, 1e-300, -0.0, float("nan"), float("inf"), "", "1", "none", "ab", "gpt2", "mot"]),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 40), st.text(max_size=3), st.floats(allow_nan=True)), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def kind_of(annotation) -> set[type]:
    """The kinds an annotation allows: int | None -> {int, NoneType}; list[int] -> {list}."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, __import__("types").UnionType):
        return set().union(*(kind_of(a) for a in typing.get_args(annotation)))
    return {origin or annotation}


# ---------------------------------------------------------------------------------------------
# the rules are declared for every key, and agree with the declared types


def test_every_config_field_has_a_rule_of_its_annotated_type():
    annotations = MoTConfig.__annotations__
    missing = sorted(set(annotations) - set(MODEL_RULES) - {"model_type", "attribute_map", "eos_token_id"})
    assert not missing, f"MoTConfig fields without a rule: {missing}"
    for name, rule in MODEL_RULES.items():
        kinds = kind_of(annotations[name])
        assert rule.kind in kinds and rule.optional == (type(None) in kinds), name


def test_every_recipe_key_has_a_rule_of_its_annotated_type():
    keys = {"name": str, "seed": int}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        keys.update({f"{section}.{f.name}": hints[f.name] for f in dataclasses.fields(cls)})
    assert set(keys) == set(RECIPE_RULES)
    for key, annotation in keys.items():
        kinds, rule = kind_of(annotation), RECIPE_RULES[key]
        assert rule.kind in kinds and rule.optional == (type(None) in kinds), key


def test_recipe_model_section_is_config_fields_with_config_defaults():
    """[model] in a recipe is MoTConfig's own fields with MoTConfig's defaults, so that a key left out
    means what it means in `MoTConfig()`; only n_positions differs (None: the data's seq_len)."""
    params = inspect.signature(MoTConfig.__init__).parameters
    for field in dataclasses.fields(SECTIONS["model"]):
        assert field.name in params, f"[model] {field.name} is not a MoTConfig field"
        if field.name != "n_positions":
            assert field.default == params[field.name].default, field.name
    unset = set(MODEL_RULES) - {f.name for f in dataclasses.fields(SECTIONS["model"])}
    # the tokenizer's (set from [data]) and run-time switches: a new field a recipe cannot set fails here
    assert unset == {"vocab_size", "bos_token_id", "pad_token_id", "use_cache", "output_router_logits"}, unset


def test_every_numeric_cli_option_has_a_rule():
    from mot_transition.cli.app import app
    import mot_transition.cli  # noqa: F401  (registers the commands)

    unchecked = set()
    for command in app.registered_commands:
        for parameter in inspect.signature(command.callback).parameters.values():
            default = parameter.default
            flags = getattr(default, "param_decls", None) or ()
            if parameter.annotation in (int, float) and flags:
                option = flags[0]
                assert option in OPTION_RULES or option in unchecked, f"{command.callback.__name__} {option} has no rule"


@pytest.mark.parametrize("rule, good, bad", [
    (Rule(int, low=1), [1, 7, 2**40], [0, -1, 1.0, True, "1", None, float("nan")]),
    (Rule(float, low=0, low_open=True), [1e-9, 3, 2.5], [0, -1.0, float("inf"), float("nan"), False, "1"]),
    (Rule(float, low=0, high=1, high_open=True, optional=True), [None, 0, 0.999], [1, 1.0, -0.1, float("nan")]),
    (Rule(list, item=int, low=0), [[], [0, 3], (1, 2)], [[-1], [1.0], "12", [True]]),
    (Rule(str, choices=("a", "b")), ["a", "b"], ["c", 1, None]),
])
def test_rule_accepts_exactly_what_it_describes(rule, good, bad):
    for value in good:
        rule.check("key", value)
    for value in bad:
        with pytest.raises(ValueError, match=rf"^key must be {__import__('re').escape(rule.describe())}, got "):
            rule.check("key", value)


# ---------------------------------------------------------------------------------------------
# properties: random values at the config, the recipe, the converter and the command line


def one_line_naming(error: BaseException, *names: str) -> bool:
    text = str(error)
    return "\n" not in text.strip() and any(name in text for name in names)


@FUZZ
@given(name=st.sampled_from(sorted(MODEL_RULES)), value=ANY_VALUE)
def test_config_takes_a_valid_value_or_names_the_field_in_one_line(name, value):
    try:
        fields = {"ffn_type": "mot", name: value}
        config = tiny_config(fields.pop("ffn_type"), **fields)
    except ValueError as error:
        assert one_line_naming(error, name, "head size", "flop-matched", "moe_layers", "num_experts_per_tok", "n_embd"), str(error)
        return
    stored = getattr(config, name)
    if value is not None:  # None may mean a default the config fills in
        MODEL_RULES[name].check(name, stored)
    assert all(math.isfinite(v) for v in vars(config).values() if isinstance(v, float))


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf else repr(value))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {toml_literal(v)}' for k, v in value.items()) + "}"
    return "none" if value is None else str(value)


@FUZZ
@given(key=st.sampled_from(sorted(RECIPE_RULES)), value=ANY_VALUE)
def test_recipe_takes_a_valid_value_or_names_the_key_in_one_line(key, value):
    try:
        recipe = load_recipe("tiny", [f"{key}={toml_literal(value)}"])
    except ValueError as error:
        assert one_line_naming(error, key, "recipe [model]", "recipe key"), str(error)
        return
    section, _, leaf = key.rpartition(".")
    RECIPE_RULES[key].check(key, getattr(getattr(recipe, section) if section else recipe, leaf))


@FUZZ
@given(text=st.text(max_size=30))
def test_any_override_text_is_a_recipe_or_one_line(text):
    try:
        load_recipe("tiny", [text])
    except ValueError as error:
        assert "\n" not in str(error).strip()


@FUZZ
@given(top_k=ANY_VALUE, capacity=ANY_VALUE)
def test_conversion_options_give_a_token_choice_config_or_one_line(top_k, capacity):
    config = tiny_config("mot")
    try:
        converted = token_choice_config(config, top_k, capacity)
    except ValueError as error:
        assert one_line_naming(error, "--top-k", "--capacity-factor"), str(error)
        return
    assert converted.ffn_type == "token_choice" and 1 <= converted.num_experts_per_tok <= config.n_expert


@pytest.fixture(scope="module")
def mot_source(tmp_path_factory) -> Path:
    """A tiny MoT checkpoint with its tokenizer."""
    import argparse

    from mot_transition.data import load_corpus, train_tokenizer

    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "corpus.txt").write_text(Path(argparse.__file__).read_text()[:20_000])
    tokenizer = train_tokenizer(load_corpus(folder / "corpus.txt"), 300, cache_dir=folder / "cache")
    MoTLMHeadModel(tiny_config("mot", vocab_size=len(tokenizer))).save_pretrained(folder / "mot")
    tokenizer.save_pretrained(folder / "mot")
    return folder / "mot"


OPTION_TEXT = st.one_of(ANY_VALUE.map(toml_literal), st.text(max_size=6), st.sampled_from(["1", "2", "0", "-1", "inf", "nan", "1e400", "0x10", " 2"]))


@FUZZ
@given(top_k=OPTION_TEXT, capacity=OPTION_TEXT, calibrate=OPTION_TEXT)
def test_convert_cli_converts_or_says_one_line_and_writes_nothing(mot_source, tmp_path_factory, capsys, top_k, capacity, calibrate):
    before = tree_digest(mot_source)
    dst = tmp_path_factory.mktemp("dst") / "tc"
    code, out, err = run_cli(["convert", mot_source, dst, "--top-k", top_k, "--capacity-factor", capacity, "--calibrate", calibrate], capsys)
    assert "Traceback" not in err
    if code == 0:
        assert (dst / "model.safetensors").is_file()
        MoTConfig.from_pretrained(dst).check()
    else:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert not dst.exists() and not list(dst.parent.iterdir())
    assert tree_digest(mot_source) == before


@FUZZ
@given(args=st.lists(st.sampled_from(["--max-new-tokens", "--temperature", "--top-p", "--seed"]), min_size=1, max_size=3),
       values=st.lists(OPTION_TEXT, min_size=3, max_size=3))
def test_generate_cli_options_generate_or_say_one_line(mot_source, capsys, args, values):
    command = ["generate", mot_source, "--prompt", "x"]
    for flag, value in zip(args, values):
        command += [flag, value]
    code, out, err = run_cli(command, capsys)
    assert "Traceback" not in err
    errors = [line for line in err.strip().splitlines() if not line.startswith("warning:")]  # MoT alone: a warning
    assert code == 0 and out.startswith("x") and not errors or code != 0 and len(errors) == 1 and errors[0].startswith("error: "), err


class Reached(Exception):
    """The recipe passed every check and training would start."""


@FUZZ
@given(key=st.sampled_from(sorted(RECIPE_RULES)), value=ANY_VALUE)
def test_train_cli_starts_only_with_a_valid_recipe_else_one_line(capsys, monkeypatch, key, value):
    import mot_transition.train as train_package

    def reached(recipe, *args, **kwargs):
        raise Reached(recipe)

    monkeypatch.setattr(train_package, "train", reached)
    try:
        code, out, err = run_cli(["train", "tiny", f"{key}={toml_literal(value)}", "--out", "/nonexistent/never-written"], capsys)
    except Reached:
        return
    assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_integers_too_big_for_a_float_or_int64_are_one_line_everywhere(mot_source, capsys):
    huge = "1" + "0" * 400
    with pytest.raises(ValueError, match=r"^n_embd must be an integer >= 1, got 1000.*\.\.\.$"):
        MoTConfig(n_embd=int(huge))
    with pytest.raises(ValueError, match=r"recipe key 'optim.lr' must be a finite number > 0"):
        load_recipe("tiny", [f"optim.lr={huge}"])
    for option in ("--max-new-tokens", "--temperature", "--seed"):
        code, _, err = run_cli(["generate", mot_source, "--prompt", "x", option, huge], capsys)
        assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
