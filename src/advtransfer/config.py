"""The run schema: frozen dataclasses are the only source of truth; YAML and ``--set`` hold overrides.

Unknown keys and wrong types are errors (``UserError``), never silently ignored. ε is written as a
fraction string (``"8/255"``) or a decimal and kept as given, so results record exactly what was asked.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class Norm(str, enum.Enum):
    LINF = "Linf"
    L2 = "L2"


class Init(str, enum.Enum):
    RANLI = "ranli"  # random head
    ROLI = "roli"  # head from an adversarial linear probe (stage 1)


class Objective(str, enum.Enum):
    AT = "at"  # Madry PGD adversarial training: CE on PGD examples
    TRADES = "trades"  # CE(clean) + beta * KL(clean || adversarial)
    NATURAL = "natural"  # plain CE on clean images


class Optimizer(str, enum.Enum):
    ADAMW = "adamw"
    SGD = "sgd"


def parse_eps(value: str | float | int) -> float:
    """``"8/255"`` -> 0.0313..., ``"0.1"`` / ``0.1`` -> 0.1. Raises ``UserError`` on anything else."""
    if isinstance(value, bool):
        raise UserError(f"eps: expected a number or a fraction like '8/255', got {value!r}")
    try:
        eps = float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UserError(f"eps: expected a number or a fraction like '8/255', got {value!r}") from None
    if not math.isfinite(eps):
        raise UserError(f"eps: must be finite, got {value!r}")
    return eps


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion-mnist"  # a key of advtransfer.datasets.DATASETS, or a join like mnist[0-4]+fashion-mnist[0-4]
    root: str = ""  # folder of a disk dataset; embedded ones cache under $ADVTRANSFER_DATA
    download: bool = False  # allow torchvision to download CIFAR (needs internet)
    split_file: str = ""  # image-file datasets: "path label split" lines, a JSON file, or a folder of VPT json
    image_size: int = 0  # image-file datasets: crop side; Resize(side * 256/224) then crop, as the paper (0 = 224)
    augment: bool = False  # image-file datasets: RandomCrop + RandomHorizontalFlip for training (else CenterCrop)
    n_train: int = 0  # subsample the training split to this many images (0 = all)
    n_val: int = 5000  # validation images carved from the training set (deterministic, never test)
    n_test: int = 0  # subsample the test split (0 = all)
    workers: str = "auto"  # DataLoader processes per image-file split: "auto" = min(8, CPUs / processes), 0 = none
    variant: str = "none"  # none | invert (1 - x) | rot90 | patch-shuffle (fixed 4x4 patch permutation): far domains
    resample: bool = False  # draw the n_train subset with the run seed (the validation carve-out stays fixed)

    def __post_init__(self) -> None:
        if str(self.workers) != "auto" and not (str(self.workers).isdigit() and str(self.workers).isascii()):
            raise UserError(f"config: data.workers must be >= 0 or 'auto', got {self.workers!r}")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = ""  # any timm model name; "" = the one named by an advtransfer checkpoint
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (img_size, depth, ...)
    checkpoint: str = ""  # source weights: our .safetensors, or a .pt/.pth state dict (weights_only)
    pretrained: bool = False  # timm hub weights (needs internet); ignored when checkpoint is set
    mean: tuple[float, ...] = ()  # normalisation override; default: checkpoint metadata, else timm's cfg
    std: tuple[float, ...] = ()
    input_size: int = 0  # resize inputs to this inside the model (0 = the backbone's own size)


@dataclass(frozen=True)
class MethodConfig:
    name: str = "linear"  # a key of advtransfer.methods.METHODS
    init: Init = Init.RANLI
    probe_run: str = ""  # RoLI: reuse this finished stage-1 run dir instead of running stage 1 here
    options: dict = field(default_factory=dict)  # method options, e.g. {rank: 8} for lora


@dataclass(frozen=True)
class AttackConfig:
    eps: str = "8/255"  # threat-model radius in [0,1] pixel units at the data's native resolution
    norm: Norm = Norm.LINF
    steps: int = 7  # PGD steps used to craft training examples
    step_size: str = ""  # "" = eps/4 (the paper's default)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: Optimizer = Optimizer.ADAMW
    lr: float = 1e-3
    weight_decay: float = 0.05  # applied to parameters with ndim >= 2 only
    momentum: float = 0.9  # SGD only
    warmup_epochs: float = 0.0  # linear warmup, then cosine decay to 0 (per step)
    objective: Objective = Objective.AT
    trades_beta: float = 6.0
    bf16: bool = False  # autocast bf16 for training and attack generation (evaluation stays fp32)
    compile: bool = False  # torch.compile the model for attack + training step (first steps pay the compile)
    grad_clip: float = 0.0  # max global grad norm (0 = off)
    checkpoint_every: int = 0  # also checkpoint every N optimiser steps (0 = at each epoch end only)


@dataclass(frozen=True)
class EvalConfig:
    val_pgd_steps: int = 10  # PGD steps of the per-epoch validation used for model selection
    pgd_steps: int = 10  # PGD steps at test
    pgd_restarts: int = 1
    autoattack: bool = True
    aa_version: str = "standard"  # standard | custom (non-standard, labelled so)
    aa_attacks: tuple[str, ...] = ()  # custom version only, e.g. (apgd-ce, apgd-t)
    n_autoattack: int = 1000  # test examples for AutoAttack (0 = the whole test split)
    batch_size: int = 256


@dataclass(frozen=True)
class RunConfig:
    name: str = ""  # free-form label for reports
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=1e-2, weight_decay=0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def eps(self) -> float:
        return parse_eps(self.attack.eps)

    @property
    def step_size(self) -> float:
        return parse_eps(self.attack.step_size) if self.attack.step_size else self.eps / 4


# ----------------------------------------------------------------------------- building from dicts


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: '{where}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where + ".")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        if isinstance(value, tp):
            return value
        if value not in choices:
            raise UserError(f"config: '{where}' must be one of {choices}, got {value!r}")
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config: '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config: '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise UserError(f"config: '{where}' must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config: '{where}' must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise UserError(f"config: '{where}' is too large, got {value!r}") from None
        if not math.isfinite(value):
            raise UserError(f"config: '{where}' must be finite, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"config: '{where}' must be a string, got {value!r}")
        try:
            return str(value)
        except ValueError:  # an int beyond Python's str-conversion digit limit
            raise UserError(f"config: '{where}' is too long a number") from None
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config: '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config: '{where}' must be a list, got {value!r}")
        return tuple(
            _coerce(v.strip() if isinstance(v, str) else v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)
        )
    raise TypeError(f"unsupported config type {tp} at {where}")  # a schema bug, not a user error


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) nested dict; unknown keys raise ``UserError``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UserError(f"config: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (enums as values, tuples as lists) — what YAML and result cards hold."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_set(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). The value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise UserError(f"--set: expected KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise UserError(f"--set: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, OverflowError):  # e.g. the date 2001-13-45, a 5000-digit int
        value = raw
    if isinstance(value, (dict, list)) or value is None:
        value = raw if value is None else value
    return [p.strip() for p in parts], value


def _apply_set(tree: dict, cls: type, parts: list[str], value: Any, full: str, prefix: str = "", raw: str = "") -> None:
    """Set ``parts`` in ``tree``. A string field takes the ``raw`` text when YAML read it as something else
    (``name=2024-01-01`` is not a date, ``attack.eps=0.10`` stays ``"0.10"``, ``name=012`` is not octal 10)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    head = parts[0]
    if head not in names:
        close = difflib.get_close_matches(head, list(names), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise UserError(f"--set: unknown key '{full}'{hint}")
    tp = hints[head]
    if len(parts) == 1:
        if tp is str and raw and not isinstance(value, (str, dict, list)):
            value = raw
        tree[head] = value
    elif dataclasses.is_dataclass(tp):
        _apply_set(_subtree(tree, head), tp, parts[1:], value, full, f"{prefix}{head}.", raw)
    elif tp is dict or typing.get_origin(tp) is dict:  # free-form options: any sub-key
        sub = _subtree(tree, head)
        for p in parts[1:-1]:
            sub = _subtree(sub, p)
        sub[parts[-1]] = value
    else:
        raise UserError(f"--set: '{'.'.join(parts[:1])}' in '{full}' has no sub-keys")


def _subtree(tree: dict, key: str) -> dict:
    """``tree[key]`` as a dict to set into; a scalar an earlier override put there is replaced (later wins)."""
    if not isinstance(tree.get(key), dict):
        tree[key] = {}
    else:
        tree[key] = dict(tree[key])  # copy: never mutate the caller's base or the loaded YAML
    return tree[key]


def load_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = (), base: dict | None = None
) -> RunConfig:
    """YAML file (optional) + ``--set`` overrides -> a validated ``RunConfig``."""
    tree: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config: file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"config: {p} is not valid YAML{at}") from None
        except UnicodeDecodeError:  # before ValueError, its base class
            raise UserError(f"config: {p} is not a text file") from None
        except (ValueError, OverflowError) as e:  # a YAML scalar its constructor rejects, e.g. 2001-13-45
            raise UserError(f"config: {p} holds a value YAML cannot read: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config: {p} must hold a mapping at the top level")
        tree = _merge(tree, loaded)
    for item in overrides:
        parts, value = parse_set(item)
        key, raw = item.split("=", 1)
        _apply_set(tree, RunConfig, parts, value, key.strip(), raw=raw.strip())
    cfg = from_dict(RunConfig, tree)
    validate(cfg)
    return cfg


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: RunConfig) -> None:
    """Value checks the types cannot express. Names (dataset, backbone, method) are checked where they live."""
    if not 0 <= cfg.seed < 2**32:  # what every RNG (torch, numpy, python) accepts and the data order can offset
        raise UserError(f"config: seed must be in [0, 2**32), got {cfg.seed}")
    eps = cfg.eps
    if eps <= 0:
        raise UserError(f"config: attack.eps must be > 0, got {cfg.attack.eps!r}")
    if cfg.attack.norm == Norm.LINF and eps > 1:
        raise UserError(f"config: attack.eps must be <= 1 for Linf (pixels are in [0,1]), got {cfg.attack.eps!r}")
    if cfg.attack.step_size and cfg.step_size <= 0:
        raise UserError(f"config: attack.step_size must be > 0, got {cfg.attack.step_size!r}")
    if cfg.attack.steps < 1:
        raise UserError(f"config: attack.steps must be >= 1, got {cfg.attack.steps}")
    for name, t in (("train", cfg.train), ("probe", cfg.probe)):
        if t.epochs < 1:
            raise UserError(f"config: {name}.epochs must be >= 1, got {t.epochs}")
        if t.batch_size < 1:
            raise UserError(f"config: {name}.batch_size must be >= 1, got {t.batch_size}")
        if t.lr <= 0:
            raise UserError(f"config: {name}.lr must be > 0, got {t.lr}")
        for key in ("weight_decay", "momentum", "warmup_epochs", "trades_beta", "grad_clip", "checkpoint_every"):
            if getattr(t, key) < 0:
                raise UserError(f"config: {name}.{key} must be >= 0, got {getattr(t, key)}")
    for key in ("val_pgd_steps", "pgd_steps", "pgd_restarts", "batch_size"):
        if getattr(cfg.eval, key) < 1:
            raise UserError(f"config: eval.{key} must be >= 1, got {getattr(cfg.eval, key)}")
    if cfg.eval.aa_version not in ("standard", "custom"):
        raise UserError(f"config: eval.aa_version must be 'standard' or 'custom', got {cfg.eval.aa_version!r}")
    if cfg.eval.n_autoattack < 0:
        raise UserError(f"config: eval.n_autoattack must be >= 0, got {cfg.eval.n_autoattack}")
    for key in ("n_train", "n_val", "n_test", "image_size"):
        if getattr(cfg.data, key) < 0:
            raise UserError(f"config: data.{key} must be >= 0, got {getattr(cfg.data, key)}")
