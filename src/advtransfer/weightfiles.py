"""Reading any weights file safely (ours, bare safetensors, ``torch.save`` pickles through ``weights_only=True`` with
inert stand-ins for unknown globals) and fitting it onto a timm model, every key, shape and kind of dtype checked."""

import pickle
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from .errors import UserError
from .models import Classifier, ModelSpec, build

META_KEY = "advtransfer"
PICKLE_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt")
CONTAINERS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")  # first found is used
PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.")  # DDP, torch.compile, common wrappers


class _Call(Exception):
    """A pickle tried to call a global that torch does not allow."""


class Inert:
    """Stand-in for a global a pickle names (``argparse.Namespace``): keeps its pickled state as data, runs no code."""

    name = ""  # the global's full name

    def __new__(cls, *args: Any) -> "Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _Call(self.name)  # pickle's REDUCE calls; NEWOBJ + BUILD (how objects are restored) never do

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _condense(e: BaseException) -> str:
    """The cause inside a torch/pickle message: its first sentence, without ANSI codes or torch's advice."""
    text = re.sub(r"\x1b\[[\d;]*m", "", str(e)).split("WeightsUnpickler error:")[-1]
    line = re.split(r"(?<=[.;])\s", next((s.strip() for s in text.splitlines() if s.strip()), ""))[0].rstrip(".;")
    return line if " " in line else f"{type(e).__name__} {line}".strip()  # a bare token (KeyError 101) needs its type


def _refused(path: Path, why: str) -> UserError:
    return UserError(
        f"checkpoint: {path} refused: {why}; "
        "if you trust its source, re-save only its tensors (torch.save(model.state_dict()) or safetensors)"
    )


def _unpickle(path: Path) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)`` with inert stand-ins for the globals torch does not allow."""
    try:  # a static scan of the pickle's opcodes: nothing is imported or run
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError, EOFError):  # a legacy pickle: torch's allow-list alone decides
        unknown = []
    stand_ins = [(type(g, (Inert,), {"name": g}), g) for g in unknown]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(str(path), map_location="cpu", weights_only=True), unknown
    except _Call as e:
        raise _refused(path, f"unsafe pickle, loading it would run {e}") from None
    except pickle.UnpicklingError as e:  # a global torch refuses outright (os, sys, ...), a plain pickle's opcode
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"would run {found.group(1)}" if found else f"needs more than torch's safe unpickler ({_condense(e)})"
        raise _refused(path, "unsafe pickle, loading it " + why) from None
    except Exception as e:  # a damaged file fails anywhere in torch's reader or unpickler, with any exception type
        raise UserError(f"checkpoint: {path} is truncated or corrupt ({_condense(e)})") from None


def _names(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _tensors(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensor dict inside containers (``{'state_dict', 'state_dict_ema', 'args', ...}``, ``{'model': ...}``)."""
    notes = []
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in CONTAINERS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        others = sorted(str(k) for k in obj if k != key)
        notes.append(f"read '{key}'" + (f" (ignored {_names(others, 8)})" if others else ""))
        obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint: {path} holds no state dict of tensors")
    return dict(obj), notes


def _read(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), []
        except (SafetensorError, OSError) as e:
            raise UserError(f"checkpoint: {path} is truncated or not safetensors ({_condense(e)})") from None
    if not path.name.endswith(PICKLE_SUFFIXES):
        raise UserError(f"checkpoint: unsupported file type {path.suffix!r} (use .safetensors, .pt, .pth or .pth.tar)")
    obj, unknown = _unpickle(path)
    state, notes = _tensors(obj, path)
    if unknown:
        notes.append(f"inert stand-ins for {_names(sorted(unknown), 3)} (never constructed)")
    return state, notes


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors in a file as stored (containers unwrapped, keys untouched): ours, safetensors or a safe pickle."""
    return _read(path)[0]


def metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise UserError(f"checkpoint: file not found: {path}")
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint: {path} is not a readable safetensors file ({_condense(e)})") from None


def read_spec(path: Path) -> ModelSpec:
    """The metadata of one of our checkpoints; a malformed field is a one-line ``UserError`` naming it."""
    meta = metadata(Path(path))
    if META_KEY not in meta:
        raise UserError(
            f"checkpoint: {path} has no advtransfer metadata (not written by advtransfer): "
            "name its architecture (eval: --backbone NAME [KEY=VALUE ...])"
        )
    return ModelSpec.parse(meta[META_KEY], f"checkpoint: {path}")


def _normaliser(state: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(normaliser prefix, model prefix) of a ``Sequential(normaliser, model)`` state: one prefix holds only ``mean``
    and ``std``, every other key lies under one other prefix (RobustBench ``0.``/``1.``, ours ``''``/``backbone.``)."""
    for key in state:
        p = key[: -len("mean")]
        if not key.endswith("mean") or key.count(".") > 1 or (p and not p.endswith(".")) or p + "std" not in state:
            continue
        rest = [k for k in state if k not in (key, p + "std")]
        tops = {k.split(".", 1)[0] for k in rest}
        if rest and len(tops) == 1 and all("." in k for k in rest) and tops != {p[:-1]}:
            return p, tops.pop() + "."
    return None


@dataclass
class Source:
    """A weights file ready for a timm model: its keys, the mean/std it carries (or None) and what was done."""

    state: dict[str, torch.Tensor]
    mean: list[float] | None = None
    std: list[float] | None = None
    notes: list[str] = field(default_factory=list)
    spec: ModelSpec | None = None  # ours only


def read_source(path: Path) -> Source:
    """Read any supported weights file and peel its wrappers down to the backbone's keys (no model needed)."""
    path = Path(path)
    state, notes = _read(path)
    src = Source(state, notes=notes, spec=read_spec(path) if META_KEY in metadata(path) else None)
    while True:
        norm = _normaliser(src.state)
        if norm is not None and src.mean is None:
            p, inner = norm
            src.mean, src.std = ([round(x, 7) for x in src.state[p + s].flatten().tolist()] for s in ("mean", "std"))
            src.notes.append(
                f"mean/std from {f'the normaliser {p!r}' if p else 'top-level buffers'}, model under {inner!r}"
            )
            src.state = {k[len(inner) :]: v for k, v in src.state.items() if k.startswith(inner)}
            continue
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in src.state)), None)
        if prefix is None:
            return src
        src.notes.append(f"stripped '{prefix}'")
        src.state = {k[len(prefix) :]: v for k, v in src.state.items()}


def check_keys(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], path: Path, skip: set[str]) -> None:
    """Raise ``UserError`` naming missing, unexpected and shape-mismatched keys (``skip`` is exempt); an integer tensor
    where a float weight belongs (or the reverse) is refused, never silently cast."""
    missing = [k for k in target if k not in source and k not in skip]
    unexpected = [k for k in source if k not in target and k not in skip]
    both = [(k, source[k], target[k]) for k in target if k in source and k not in skip]
    shapes = [f"{k} {tuple(s.shape)} vs {tuple(t.shape)}" for k, s, t in both if s.shape != t.shape]
    kinds = [
        f"{k} is {s.dtype}, expected {t.dtype}" for k, s, t in both if s.is_floating_point() != t.is_floating_point()
    ]
    groups = (("missing keys", missing, 5), ("unexpected keys", unexpected, 5))
    groups += (("shape mismatch", shapes, 3), ("dtype mismatch", kinds, 3))
    found = [f"{what}: {_names(keys, n)}" for what, keys, n in groups if keys]
    if found:
        raise UserError(f"checkpoint: {path} does not fit the model — " + "; ".join(found))


def fit_state(backbone: nn.Module, state: dict[str, torch.Tensor], path: Path, head: str) -> tuple[dict, list[str]]:
    """Map ``state`` onto ``backbone``'s keys and check them (``head`` keys exempt): non-persistent buffers dropped,
    then timm's ``checkpoint_filter_fn`` if they do not fit, unless it would resample a tensor (reported instead)."""
    target, notes = backbone.state_dict(), []
    buffers = dict(backbone.named_buffers())
    volatile = [k for k in state if k in buffers and k not in target]
    if volatile:
        state = {k: v for k, v in state.items() if k not in volatile}
        counts = ", ".join(f"{n} x{c}" for n, c in Counter(k.rsplit(".", 1)[-1] for k in volatile).items())
        notes.append(f"dropped {len(volatile)} non-persistent buffers ({counts})")

    def skip(keys: dict) -> set[str]:
        return {k for k in (*target, *keys) if k.startswith(head)}

    module = sys.modules.get(type(backbone).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    try:
        check_keys(target, state, path, skip(state))
        return state, notes
    except UserError:
        if filter_fn is None:
            raise
    try:
        mapped = filter_fn(dict(state), backbone)
    except (KeyError, RuntimeError, AttributeError, ValueError, TypeError, IndexError):
        mapped = state
    if any(k in state and v.numel() != state[k].numel() for k, v in mapped.items()):
        mapped = state  # timm would interpolate (pos_embed, patch_embed, ...): report the sizes instead
    check_keys(target, mapped, path, skip(mapped))
    gone, new = sorted(state.keys() - mapped.keys()), sorted(mapped.keys() - state.keys())
    shaped = [k for k, v in mapped.items() if k in state and v.shape != state[k].shape]
    parts = {"keys out": gone, "in": new, "reshaped": shaped}
    done = ", ".join(f"{len(keys)} {what} ({_names(keys, 2)})" for what, keys in parts.items() if keys)
    notes.append(f"timm {module.__name__.rsplit('.', 1)[-1]}.checkpoint_filter_fn: {done}")
    return mapped, notes


def load_backbone_weights(model: Classifier, path: Path) -> list[str]:
    """Load a source file into ``model.backbone`` except the head (it belongs to the target task); notes for the log."""
    src = read_source(path)
    head = model.head_name + "."
    state, notes = fit_state(model.backbone, src.state, Path(path), head)
    model.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)}, strict=False)
    return src.notes + notes


def load_foreign(path: Path, spec: ModelSpec) -> tuple[Classifier, ModelSpec, list[str]]:
    """(eval-mode model, completed spec, notes) from a file without our metadata (ARES, RobustBench). ``num_classes`` 0:
    the file's head size; ``mean``/``std`` are needed only without a normaliser in the file, and must agree with one."""
    path, src = Path(path), read_source(path)
    if src.mean is None and not spec.mean:
        hint = "give them (eval: --mean/--std; ARES models use ImageNet's 0.485,0.456,0.406 / 0.229,0.224,0.225)"
        raise UserError(f"checkpoint: {path} carries no mean/std (no normaliser): {hint}")
    if src.mean is not None and spec.mean:
        given, found = torch.tensor([spec.mean, spec.std]), torch.tensor([src.mean, src.std])
        if given.shape != found.shape or not torch.allclose(given, found, atol=1e-6):
            raise UserError(f"checkpoint: {path} normalises with mean {src.mean} std {src.std}, not the given ones")
    spec = ModelSpec(
        spec.backbone, dict(spec.kwargs), spec.num_classes, mean=src.mean or spec.mean, std=src.std or spec.std
    )
    model = build(spec)
    head = model.head_name + "."
    state, notes = fit_state(model.backbone, src.state, path, head)
    if not spec.num_classes:
        if (weight := state.get(head + "weight")) is None:
            raise UserError(f"checkpoint: {path} has no classifier head ({head}weight): it cannot classify")
        model.backbone.reset_classifier(weight.shape[0])
        spec.num_classes = weight.shape[0]
    check_keys(model.backbone.state_dict(), state, path, skip=set())
    model.backbone.load_state_dict(state)
    return model.eval(), spec, src.notes + notes
