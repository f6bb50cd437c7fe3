"""The run schema: pydantic models (one field per line, with its unit) are the only source of truth; ε is an ``Eps``
that remembers how it was written (``"8/255"``). Files and ``--set`` live in ``configfile.py``; the RoLI rule is here.
"""

from __future__ import annotations

import enum
import math
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import core_schema

from .errors import UserError

AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")
Norm = enum.Enum("Norm", {"LINF": "Linf", "L2": "L2"}, type=str)
Optimizer = enum.Enum("Optimizer", {"ADAMW": "adamw", "SGD": "sgd"}, type=str)


class Init(str, enum.Enum):
    RANLI = "ranli"  # random head
    ROLI = "roli"  # head from an adversarial linear probe (stage 1)


class Objective(str, enum.Enum):
    AT = "at"  # Madry PGD adversarial training: CE on PGD examples
    TRADES = "trades"  # CE(clean) + beta * KL(clean || adversarial)
    NATURAL = "natural"  # plain CE on clean images
    FGSM_RS = "fgsm-rs"  # one FGSM step from a uniform random start, step 1.25 eps (Wong et al. 2020)
    N_FGSM = "n-fgsm"  # noise in a 2-eps ball, FGSM step eps, no projection (de Jorge et al. 2022)


class Eps(float):
    """A radius as a float that keeps its text: ``Eps("8/255") == 8/255`` and ``== "8/255"``; ``str()`` is the text."""

    text: str

    def __new__(cls, value: Any) -> Eps:
        if isinstance(value, Eps):
            return value
        bad = UserError(f"eps: expected a number or a fraction like '8/255', got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad
        try:
            number = float(Fraction(str(value).strip()))
        except (ValueError, ZeroDivisionError, OverflowError):
            raise bad from None
        if not math.isfinite(number):
            raise UserError(f"eps: must be finite, got {value!r}")
        self = super().__new__(cls, number)
        self.text = str(value).strip()
        return self

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return self.text == other.strip() if isinstance(other, str) else float(self) == other

    __hash__ = float.__hash__

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        def parse(v: Any) -> Eps:
            try:
                return cls(v)
            except UserError as e:
                raise ValueError(str(e).removeprefix("eps: ")) from None

        return core_schema.no_info_plain_validator_function(parse, serialization=core_schema.to_string_ser_schema())


def parse_eps(value: Any) -> Eps:
    """``"8/255"`` -> ``Eps`` 0.0313..., ``"0.1"``/``0.1`` -> 0.1; anything else is a ``UserError``."""
    return Eps(value)


def _workers(v: Any) -> int | str:
    """``"auto"`` (min(8, CPUs / processes), see ``data.worker_count``) or a count >= 0 (0 = the main process)."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return v
    raise ValueError(f"workers must be >= 0 or 'auto', got {v!r}")


# list fields also take "a,b" (the form --set and the CLI take)
_listed = BeforeValidator(lambda v: [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v)
Floats = Annotated[tuple[float, ...], _listed]
Strings = Annotated[tuple[str, ...], _listed]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, coerce_numbers_to_str=True)


class DataConfig(Section):
    name: str = "fashion-mnist"  # a key of advtransfer.datasets.DATASETS, or a join like mnist[0-4]+fashion-mnist[0-4]
    root: str = ""  # folder of a disk dataset; embedded ones cache under $ADVTRANSFER_DATA
    download: bool = False  # allow torchvision to download CIFAR (needs internet)
    split_file: str = ""  # image-file datasets: "path label split" lines, a JSON file, or a folder of VPT json
    image_size: int = Field(0, ge=0)  # image-file datasets: crop side; Resize(side * 256/224) then crop (0 = 224)
    augment: bool = False  # image-file datasets: RandomCrop + RandomHorizontalFlip for training (else CenterCrop)
    n_train: int = Field(0, ge=0)  # subsample the training split to this many images (0 = all)
    n_val: int = Field(5000, ge=0)  # validation images carved from the training set (deterministic, never test)
    n_test: int = Field(0, ge=0)  # subsample the test split (0 = all)
    workers: Annotated[int | str, BeforeValidator(_workers)] = "auto"  # loader processes per image-file split
    variant: Literal["none", "invert", "rot90", "patch-shuffle"] = "none"  # a far-domain copy of every split
    resample: bool = False  # draw the n_train subset with the run seed (the validation carve-out stays fixed)


class ModelConfig(Section):
    backbone: str = ""  # any timm model name; "" = the one named by an advtransfer checkpoint
    kwargs: dict = {}  # passed to timm.create_model (img_size, depth, ...)
    checkpoint: str = ""  # source weights: our .safetensors, or a .pt/.pth state dict (weights_only)
    pretrained: bool = False  # timm hub weights (needs internet); ignored when checkpoint is set
    mean: Floats = ()  # normalisation override; default: checkpoint metadata, else timm's cfg
    std: Floats = ()
    input_size: int = Field(0, ge=0)  # resize inputs to this inside the model (0 = the backbone's own size)
    preprocess: Literal["", "imagenet", "ares", "inception", "clip"] = ""  # the source's mean/std by name
    head_init: Literal["timm", "kaiming-fan-out"] = "timm"  # new head init; the paper: kaiming fan-out, bias -log 99

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(x <= 0 for x in v):
            raise ValueError(f"std must be > 0, got {list(v)}")
        return v


class MethodConfig(Section):
    name: str = "linear"  # a key of advtransfer.methods.METHODS
    init: Init = Init.RANLI
    probe_run: str = ""  # RoLI: reuse this finished linear run (its dir) instead of running stage 1 here
    options: dict = {}  # method options, e.g. {rank: 8} for lora


class AttackConfig(Section):
    eps: Eps = Eps("8/255")  # threat-model radius in [0,1] pixel units at the data's native resolution
    norm: Norm = Norm.LINF
    steps: int = Field(7, ge=1)  # PGD steps used to craft training examples
    step_size: Eps | None = None  # None = eps/4 (the paper's default)
    iterate: Literal["last", "best"] = "last"  # PGD keeps the last iterate, or the best by batch-mean loss (paper code)

    @model_validator(mode="after")
    def _radius(self) -> AttackConfig:
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got '{self.eps}'")
        if self.norm == Norm.LINF and self.eps > 1:
            raise ValueError(f"eps must be <= 1 for Linf (pixels are in [0,1]), got '{self.eps}'")
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError(f"step_size must be > 0, got '{self.step_size}'")
        return self


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Optimizer = Optimizer.ADAMW
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)  # on the parameters that decay_on names
    # "matrices": ndim >= 2, not timm's no-decay tokens or VPT prompts; "non-bias": every name without "bias" (the
    # paper's code: norm weights and prompts decay too)
    decay_on: Literal["matrices", "non-bias"] = "matrices"
    momentum: float = Field(0.9, ge=0)  # SGD only
    warmup_epochs: float = Field(0.0, ge=0)  # linear warmup, then cosine decay to 0 (per step)
    objective: Objective = Objective.AT
    trades_beta: float = Field(6.0, ge=0)
    bf16: bool = False  # autocast bf16 for training and attack generation (evaluation stays fp32)
    compile: bool = False  # torch.compile the model for attack + training step (first steps pay the compile)
    grad_clip: float = Field(0.0, ge=0)  # max global grad norm (0 = off)
    accum_steps: int = Field(1, ge=1)  # split each batch into this many micro-batches (same step, less memory)
    betas: Floats = (0.9, 0.999)  # AdamW
    adam_eps: float = Field(1e-8, gt=0)  # AdamW (the paper's code: 1e-6)
    schedule_per_epoch: bool = False  # LR constant within an epoch (the paper's code: epoch 0 at LR 0 in warmup)
    tf32: bool = True  # fp32 matmuls/convolutions in TF32 on Ampere+ GPUs (recorded in the card)
    checkpoint_every: int = Field(0, ge=0)  # also checkpoint every N optimiser steps (0 = at each epoch end only)
    pgd_curriculum: bool = False  # PGD steps ramp linearly from 1 (first epoch) to attack.steps (last epoch)
    co_guard: Literal["off", "warn", "stop"] = "off"  # catastrophic overfitting: val PGD < half its best, train acc up

    @model_validator(mode="after")
    def _curriculum(self) -> TrainConfig:
        if self.pgd_curriculum and self.objective not in (Objective.AT, Objective.TRADES):
            raise ValueError(f"pgd_curriculum needs objective 'at' or 'trades' (PGD), got '{self.objective.value}'")
        return self


class EvalConfig(Section):
    val_pgd_steps: int = Field(10, ge=1)  # PGD steps of the per-epoch validation used for model selection
    pgd_steps: int = Field(10, ge=1)  # PGD steps at test
    pgd_restarts: int = Field(1, ge=1)
    autoattack: bool = True
    aa_version: Literal["standard", "custom"] = "standard"  # custom is non-standard and labelled so
    aa_attacks: Strings = ()  # custom version only, e.g. (apgd-ce, apgd-t)
    n_autoattack: int = Field(1000, ge=0)  # test examples for AutoAttack (0 = the whole test split)
    batch_size: int = Field(256, ge=1)
    early_exit: bool = False  # test PGD stops updating fooled examples: cheaper, per example at least as strong

    @model_validator(mode="after")
    def _aa(self) -> EvalConfig:
        bad = [a for a in self.aa_attacks if a not in AA_ATTACKS]
        if self.aa_version == "custom" and (bad or not self.aa_attacks):
            raise ValueError(f"aa_attacks must name attacks from {list(AA_ATTACKS)} for the custom version, got {bad}")
        return self


class TrackConfig(Section):
    tensorboard: bool = True  # TensorBoard event files in each stage directory (metrics.csv is always written)
    wandb: bool = False  # Weights & Biases (set WANDB_MODE=offline to log without an account or network)
    wandb_project: str = "advtransfer"
    log_every: float = Field(30.0, gt=0)  # seconds between progress lines (step, images/s, ETA) in the log


class RunConfig(Section):
    name: str = ""  # free-form label for reports
    seed: int = Field(0, ge=0, lt=2**32)  # what every RNG (torch, numpy, python) accepts
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    attack: AttackConfig = AttackConfig()
    train: TrainConfig = TrainConfig()
    probe: TrainConfig = TrainConfig(epochs=5, lr=1e-2, weight_decay=0.0)  # RoLI stage 1 (the linear probe)
    eval: EvalConfig = EvalConfig()
    track: TrackConfig = TrackConfig()

    @model_validator(mode="after")
    def _early_exit(self) -> RunConfig:
        if self.eval.early_exit and self.attack.iterate == "best":
            raise ValueError(
                "eval.early_exit needs attack.iterate 'last' (the 'best' rule compares whole-batch losses)"
            )
        return self


def to_dict(cfg: BaseModel) -> dict:
    """Plain nested dict (enums as values, tuples as lists, ε as written) — what YAML and result cards hold."""
    return cfg.model_dump(mode="json")


def probe_problems(probe: RunConfig, run: RunConfig, check_train: bool = True) -> list[str]:
    """Why a finished run ``probe`` cannot be RoLI stage 1 of ``run`` ([] = it fits); pipeline and sweep share it."""
    problems = []
    if (probe.method.name, probe.method.init) != ("linear", Init.RANLI):
        problems.append(f"its method is {probe.method.name!r} ({probe.method.init.value}), not 'linear' (ranli)")
    if probe.train.objective == Objective.NATURAL:
        problems.append("it was trained with the natural objective (a RoLI head must be adversarially trained)")
    for key in ("data", "model", "attack", "seed"):
        if getattr(probe, key) != getattr(run, key):
            problems.append(f"its {key} differs")
    if probe.eval.val_pgd_steps != run.eval.val_pgd_steps:
        problems.append("its validation attack differs")
    if check_train and probe.train != run.probe:  # the sweep passes False: it gives the linear run those settings
        got, want = to_dict(probe.train), to_dict(run.probe)
        diff = ", ".join(f"{k}: {got[k]!r} (probe wants {want[k]!r})" for k in got if got[k] != want[k])
        problems.append(f"it was trained with train={{{diff}}} instead of this run's probe settings")
    return problems
