"""The run schema: defaults, YAML and ``--set`` overrides, ε fractions, errors that name the key, fuzzing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from advtransfer.attacks import Threat
from advtransfer.config import AttackConfig, Init, Norm, Objective, Optimizer, RunConfig, parse_eps, to_dict
from advtransfer.configfile import from_dict, load_config, parse_set
from advtransfer.errors import UserError


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- defaults and YAML


def test_defaults() -> None:
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.attack.eps == "8/255" and cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.attack.norm is Norm.LINF and cfg.attack.steps == 7
    assert Threat.of(cfg.attack).alpha == pytest.approx(2 / 255)  # default step is eps/4
    assert cfg.method.init is Init.RANLI and cfg.train.objective is Objective.AT
    assert (cfg.probe.epochs, cfg.probe.lr, cfg.probe.weight_decay) == (5, 1e-2, 0.0)
    assert cfg.data.n_val == 5000 and cfg.model.kwargs == {} and cfg.method.options == {}


def test_empty_yaml_is_defaults(tmp_path: Path) -> None:
    assert load_config(_yaml(tmp_path, "# nothing here\n")) == RunConfig()


def test_yaml_overrides(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        """
name: run1
seed: 3
data: {name: mnist, n_train: 100}
model: {backbone: vit_tiny_patch16_224, kwargs: {depth: 2, img_size: 28}, mean: [0.5], std: [0.25]}
method: {name: lora, init: roli, options: {rank: 8}}
attack: {eps: 0.5, norm: L2, steps: 3}
train: {optimizer: sgd, lr: 0.01, bf16: true, epochs: 2}
eval: {aa_attacks: [apgd-ce, apgd-t]}
""",
    )
    cfg = load_config(path)
    assert (cfg.name, cfg.seed) == ("run1", 3)
    assert (cfg.data.name, cfg.data.n_train, cfg.data.n_val) == ("mnist", 100, 5000)  # untouched keys keep defaults
    assert cfg.model.kwargs == {"depth": 2, "img_size": 28}
    assert cfg.model.mean == (0.5,) and cfg.model.std == (0.25,)
    assert cfg.method.init is Init.ROLI and cfg.method.options == {"rank": 8}
    assert cfg.attack.norm is Norm.L2 and cfg.attack.eps == "0.5" and cfg.attack.eps == 0.5
    assert cfg.train.optimizer is Optimizer.SGD and cfg.train.bf16 is True and cfg.train.epochs == 2
    assert cfg.train.batch_size == 128
    assert cfg.eval.aa_attacks == ("apgd-ce", "apgd-t")


def test_lr_written_without_a_dot(tmp_path: Path) -> None:
    """PyYAML reads ``3e-4`` as a string; a float field still takes it."""
    assert load_config(_yaml(tmp_path, "train: {lr: 3e-4}\n")).train.lr == pytest.approx(3e-4)
    assert load_config(overrides=["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


# ----------------------------------------------------------------------------- --set


@pytest.mark.parametrize(
    "item, parts, value",
    [
        ("seed=3", ["seed"], 3),
        ("train.lr=0.5", ["train", "lr"], 0.5),
        ("train.bf16=true", ["train", "bf16"], True),
        ("train.bf16=false", ["train", "bf16"], False),
        ("data.name=mnist", ["data", "name"], "mnist"),
        ("eval.aa_attacks=[apgd-ce, apgd-t]", ["eval", "aa_attacks"], ["apgd-ce", "apgd-t"]),
        ("model.kwargs.depth=4", ["model", "kwargs", "depth"], 4),
        (" train . epochs = 2", ["train", "epochs"], 2),
        ("name=a=b", ["name"], "a=b"),  # only the first '=' splits
        ("name=", ["name"], ""),
        ("name=null", ["name"], "null"),  # YAML null is kept as the text, not None
        ("attack.eps=8/255", ["attack", "eps"], "8/255"),
    ],
)
def test_parse_set(item: str, parts: list[str], value: object) -> None:
    got_parts, got_value = parse_set(item)
    assert got_parts == parts
    assert got_value == value and type(got_value) is type(value)


@pytest.mark.parametrize("item", ["seed", "=3", "train..lr=1", "train.=1", ".lr=1"])
def test_parse_set_bad(item: str) -> None:
    with pytest.raises(UserError, match="--set"):
        parse_set(item)


def test_set_overrides() -> None:
    cfg = load_config(
        overrides=[
            "seed=7",
            "train.lr=0.25",
            "train.bf16=true",
            "data.name=mnist",
            "eval.aa_attacks=[apgd-ce, apgd-t]",
            "model.kwargs.depth=4",
            "model.kwargs.img_size=28",
            "method.options.rank=4",
            "method.options.targets.qkv=true",
            "model.mean=[0.5, 0.5, 0.5]",
            "attack.norm=L2",
            "method.init=roli",
        ]
    )
    assert cfg.seed == 7 and cfg.train.lr == 0.25 and cfg.train.bf16 is True and cfg.data.name == "mnist"
    assert cfg.eval.aa_attacks == ("apgd-ce", "apgd-t")
    assert cfg.model.kwargs == {"depth": 4, "img_size": 28}
    assert cfg.method.options == {"rank": 4, "targets": {"qkv": True}}
    assert cfg.model.mean == (0.5, 0.5, 0.5)
    assert cfg.attack.norm is Norm.L2 and cfg.method.init is Init.ROLI


def test_set_comma_lists() -> None:
    cfg = load_config(overrides=["eval.aa_attacks=apgd-ce,apgd-t", "model.mean=0.5,0.25"])
    assert cfg.eval.aa_attacks == ("apgd-ce", "apgd-t")
    assert cfg.model.mean == (0.5, 0.25)
    # a scalar for a tuple field is an error, not silently a 1-tuple of something else
    with pytest.raises(UserError, match="model.std"):
        load_config(overrides=["model.std=1.0"])


def test_set_on_top_of_yaml_merges_sub_keys(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model: {kwargs: {depth: 2, img_size: 28}}\nmethod: {options: {rank: 8, alpha: 16}}\n")
    cfg = load_config(path, ["model.kwargs.depth=4", "method.options.rank=4"])
    assert cfg.model.kwargs == {"depth": 4, "img_size": 28}
    assert cfg.method.options == {"rank": 4, "alpha": 16}


def test_later_set_wins_and_base_is_not_mutated() -> None:
    base = {"train": {"lr": 0.5}, "method": {"options": {"rank": 2}}}
    cfg = load_config(overrides=["train.lr=0.1", "train.lr=0.2", "method.options.rank=3"], base=base)
    assert cfg.train.lr == 0.2 and cfg.method.options == {"rank": 3}
    assert base == {"train": {"lr": 0.5}, "method": {"options": {"rank": 2}}}
    # a scalar set earlier is replaced by a later sub-key override, not a crash
    cfg = load_config(overrides=["method.options.a=1", "method.options.a.b=2"])
    assert cfg.method.options == {"a": {"b": 2}}


def test_set_string_fields_keep_the_text() -> None:
    """YAML would read these as a date, an octal int, a bool and a shortened float; a string field keeps the text."""
    cfg = load_config(overrides=["name=2024-01-01", "data.root=012", "method.name=yes", "attack.eps=0.10"])
    assert (cfg.name, cfg.data.root, cfg.method.name, cfg.attack.eps) == ("2024-01-01", "012", "yes", "0.10")
    assert load_config(overrides=["name='a b'"]).name == "a b"  # YAML quoting still works


# ----------------------------------------------------------------------------- eps


@pytest.mark.parametrize(
    "text, value", [("8/255", 8 / 255), ("0.1", 0.1), (0.1, 0.1), (1, 1.0), (" 4/255 ", 4 / 255), ("1e-2", 0.01)]
)
def test_parse_eps(text: object, value: float) -> None:
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "1/0", "nan", "inf", "", True, "8/255/2", "1e400"])
def test_parse_eps_bad(text: object) -> None:
    with pytest.raises(UserError, match="eps"):
        parse_eps(text)


def test_eps_kept_as_written() -> None:
    cfg = load_config(overrides=["attack.eps=8/255", "attack.step_size=1/255"])
    assert cfg.attack.eps == "8/255" and cfg.attack.eps == pytest.approx(8 / 255)
    assert Threat.of(cfg.attack).alpha == pytest.approx(1 / 255)
    cfg = load_config(overrides=["attack.eps=0.03"])
    assert cfg.attack.eps == "0.03" and cfg.attack.eps == pytest.approx(0.03)
    assert Threat.of(cfg.attack).alpha == pytest.approx(0.0075)
    assert load_config(overrides=["attack.norm=L2", "attack.eps=2"]).attack.eps == 2.0  # L2 may exceed 1


# ----------------------------------------------------------------------------- errors name the key


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["train.lrr=1"], r"unknown key 'train\.lrr'.*did you mean 'train\.lr'"),
        (["sed=1"], r"unknown key 'sed'.*did you mean 'seed'"),
        (["nosuchthing=1"], r"unknown key 'nosuchthing'"),
        (["train.epochs=abc"], r"'train\.epochs' must be an integer"),
        (["train.epochs=2.5"], r"'train\.epochs' must be an integer"),
        (["train.bf16=3"], r"'train\.bf16' must be true or false"),
        (["train.lr=fast"], r"'train\.lr' must be a number"),
        (["train.lr=.nan"], r"'train\.lr' must be finite"),
        (["data=5"], r"'data' must be a mapping"),
        (["model.kwargs=3"], r"'model\.kwargs' must be a mapping"),
        (["name=[1, 2]"], r"'name' must be a string"),
        (["attack.eps=0"], r"attack\.eps must be > 0"),
        (["attack.eps=-1/255"], r"attack\.eps must be > 0"),
        (["attack.eps=2"], r"attack\.eps must be <= 1 for Linf"),
        (["attack.eps=abc"], r"eps"),
        (["attack.step_size=0"], r"attack\.step_size must be > 0"),
        (["attack.steps=0"], r"attack\.steps must be >= 1"),
        (["eval.pgd_restarts=0"], r"eval\.pgd_restarts must be >= 1"),
        (["train.epochs=0"], r"train\.epochs must be >= 1"),
        (["probe.lr=0"], r"probe\.lr must be > 0"),
        (["data.n_val=-1"], r"data\.n_val must be >= 0"),
        (["data.workers=-1"], r"data\.workers must be >= 0"),
        (["eval.n_autoattack=-5"], r"eval\.n_autoattack must be >= 0"),
        (["train.trades_beta=-1"], r"train\.trades_beta must be >= 0"),
        (["probe.momentum=-0.9"], r"probe\.momentum must be >= 0"),
        (["train.grad_clip=-1"], r"train\.grad_clip must be >= 0"),
        (["attack.norm=L3"], r"'attack\.norm' must be one of \['Linf', 'L2'\]"),
        (["method.init=random"], r"'method\.init' must be one of"),
        (["train.objective=mart"], r"'train\.objective' must be one of"),
        (["eval.aa_version=fast"], r"eval\.aa_version"),
        (["train.lr.x=1"], r"'lr' in 'train\.lr\.x' has no sub-keys"),
        (["data.name.x=1"], r"has no sub-keys"),
    ],
)
def test_errors_name_the_key(overrides: list[str], pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        load_config(overrides=overrides)


def test_unknown_yaml_key_did_you_mean(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown key 'train\.epoch'.*did you mean 'train\.epochs'"):
        load_config(_yaml(tmp_path, "train: {epoch: 3}\n"))
    with pytest.raises(UserError, match=r"unknown key 'atack'.*did you mean 'attack'"):
        load_config(_yaml(tmp_path, "atack: {eps: 0.1}\n"))


def test_wrong_type_in_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"'attack\.steps' must be an integer"):
        load_config(_yaml(tmp_path, "attack: {steps: many}\n"))
    with pytest.raises(UserError, match=r"'train' must be a mapping"):
        load_config(_yaml(tmp_path, "train: 3\n"))


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("train: {lr: [1, 2\n", r"not valid YAML"),
        ("a: b: c\n", r"not valid YAML at line 1"),
        ("- 1\n- 2\n", r"must hold a mapping"),
        ("just a string\n", r"must hold a mapping"),
        ("name: 2001-13-45\n", r"YAML cannot read"),  # a date YAML's constructor rejects
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        load_config(_yaml(tmp_path, text))


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UserError, match="not a text file|not valid YAML"):
        load_config(tmp_path / "bin.yaml")


# ----------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            "name=x",
            "attack.norm=L2",
            "attack.eps=1/2",
            "method.init=roli",
            "method.options.rank=4",
            "model.kwargs.depth=2",
            "model.mean=[0.1, 0.2, 0.3]",
            "train.optimizer=sgd",
            "probe.objective=trades",
            "eval.aa_attacks=[apgd-ce]",
        ]
    )
    plain = to_dict(cfg)
    assert plain["attack"]["norm"] == "L2" and plain["model"]["mean"] == [0.1, 0.2, 0.3]  # plain YAML types
    assert from_dict(RunConfig, plain) == cfg
    path = _yaml(tmp_path, yaml.safe_dump(plain))
    assert load_config(path) == cfg
    assert to_dict(RunConfig()) == to_dict(from_dict(RunConfig, to_dict(RunConfig())))


# ----------------------------------------------------------------------------- fuzzing


def _paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, f in cls.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out += _paths(f.annotation, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


KEYS = _paths(RunConfig) + ["model.kwargs.depth", "method.options.rank", "method.options.a.b", "train", "attack"]
assert "attack.eps" in KEYS and "eval.aa_attacks" in KEYS and len(KEYS) > 40

_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["8/255", "1/0", "-1", "0", "1e400", "2001-13-45", "[1, [2]]", "{a: 1}", ".nan", "~", "!!binary x"]
    ),
    st.integers().map(str),
    st.floats().map(str),
    st.lists(st.sampled_from(["0.5", "apgd-ce", "1", "true", ","]), max_size=4).map(",".join),
)
_item = st.one_of(st.text(max_size=40), st.tuples(st.sampled_from(KEYS), _values).map("=".join))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _is_value(v: object) -> bool:
    return v is not None


@FUZZ
@given(st.text(max_size=60))
def test_fuzz_parse_set(text: str) -> None:
    try:
        parts, value = parse_set(text)
    except UserError:
        return
    assert parts and all(p and p == p.strip() for p in parts)
    assert _is_value(value)


@FUZZ
@given(st.lists(_item, max_size=4))
def test_fuzz_load_config_overrides(items: list[str]) -> None:
    try:
        cfg = load_config(overrides=items)
    except UserError:
        return
    assert isinstance(cfg, RunConfig) and isinstance(cfg.attack, AttackConfig)
    assert 0 < cfg.attack.eps and cfg.attack.steps >= 1  # what validate promises
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


@FUZZ
@given(st.one_of(st.text(max_size=80), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_fuzz_load_config_yaml_file(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        cfg = load_config(path)
    except UserError:
        return
    assert isinstance(cfg, RunConfig)
