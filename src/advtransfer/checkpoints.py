"""Our checkpoints (safetensors + ``ModelSpec`` JSON metadata; *compact*: only what trains, plus the source file's path
and SHA-256, refused if it changed), whole models back from any weights file, the RoLI head, and the resume state."""

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .embedded import sha256
from .errors import UserError
from .methods import apply_method
from .models import Classifier, ModelSpec, build
from .rundir import atomic_write
from .weightfiles import META_KEY, check_keys, load_backbone_weights, load_foreign, metadata, read_spec, read_state


def plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU tensors that safetensors accepts: tied weights and views into larger storage are cloned."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu()
        storage = v.untyped_storage()
        whole = v.is_contiguous() and v.storage_offset() == 0 and storage.nbytes() == v.numel() * v.element_size()
        if not whole or (storage.nbytes() and storage.data_ptr() in seen):
            v = v.clone(memory_format=torch.contiguous_format)
        elif storage.nbytes():
            seen.add(storage.data_ptr())
        out[k] = v
    return out


def compact_keys(model: torch.nn.Module) -> list[str]:
    """Trainable parameters and the buffers of every module with a trainable parameter of its own (a BatchNorm's)."""
    keys = []
    for name, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        if any(p.requires_grad for p in own.values()):
            prefix = f"{name}." if name else ""
            keys += [prefix + n for n, p in own.items() if p.requires_grad]
            keys += [prefix + n for n, b in m.named_buffers(recurse=False) if b is not None]
    return keys


def save_checkpoint(model: Classifier, spec: ModelSpec, path: Path, only: list[str] | None = None) -> None:
    """Weights + spec metadata as one safetensors file, written atomically; ``only``: a compact checkpoint."""
    state = model.state_dict()
    state = state if only is None else {k: state[k] for k in only}
    meta = {META_KEY: spec.model_dump_json(), "compact": json.dumps(only is not None)}
    atomic_write(path, lambda tmp: save_file(plain_tensors(state), tmp, metadata=meta))


def source_of(path: Path) -> dict:
    """What a compact checkpoint records about its source file: the path and its SHA-256."""
    return {"source": str(Path(path).resolve()), "source_sha256": sha256(Path(path))}


def load_classifier(path: Path) -> tuple[Classifier, ModelSpec]:
    """Rebuild a whole trained model (backbone, method, head) from one of our checkpoints, full or compact."""
    path = Path(path)
    spec, compact = read_spec(path), json.loads(metadata(path).get("compact", "false"))
    model = build(spec)
    if compact:
        src = Path(spec.trained.get("source", ""))
        if not src.is_file():
            raise UserError(f"checkpoint: {path} is compact and its source checkpoint {src} is missing")
        if sha256(src) != spec.trained.get("source_sha256"):
            raise UserError(f"checkpoint: {path} is compact and its source {src} changed since (SHA-256 differs)")
        load_backbone_weights(model, src)
    apply_method(model, spec.method["name"], spec.method.get("options", {}))
    state, target = read_state(path), model.state_dict()
    check_keys({k: target[k] for k in state} if compact else target, state, path, skip=set())
    model.load_state_dict(state, strict=not compact)
    return model.eval(), spec


def load_checkpoint(path: Path, backbone: str = "", num_classes: int = 0, mean=(), std=(), kwargs: dict | None = None):
    """(model, spec, notes) of any weights file: ours from its metadata, a foreign one as ``backbone`` (+ kwargs)."""
    if not backbone:
        if kwargs or mean or std:
            raise UserError("eval: backbone kwargs, --mean and --std go with --backbone (a file without our metadata)")
        return (*load_classifier(path), [])
    spec = ModelSpec(backbone, dict(kwargs or {}), num_classes, mean=list(mean), std=list(std))
    return load_foreign(Path(path), spec)


def load_head(model: Classifier, path: Path) -> None:
    """RoLI: copy the classifier head of a stage-1 checkpoint into ``model`` (names and shapes checked)."""
    prefix = model.head_prefix
    source = {k: v for k, v in read_state(path).items() if k.startswith(prefix)}
    target = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    check_keys(target, source, path, skip=set())
    model.load_state_dict(source, strict=False)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    py, npy = random.getstate(), np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]], "numpy": [npy[0], npy[1].tolist(), *npy[2:]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")])
    py, npy = meta["python"], meta["numpy"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))


def save_state(path: Path, model, opt, sched, progress: dict, only: list[str] | None = None) -> None:
    """Everything needed to continue bit-identically, as one safetensors file (atomic); ``only``: the model tensors
    that change. Tied weights are stored as copies, loaded back into the model's own parameters (the tie survives)."""
    state = model.state_dict()
    tensors = {f"model/{k}": state[k] for k in (state if only is None else only)}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        tensors.update({f"optim/{pid}/{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in st.items()})
    rng_t, rng_m = rng_state()
    sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    meta = dict(
        progress=progress, param_groups=osd["param_groups"], scheduler=sched_state, rng=rng_m, compact=only is not None
    )
    tensors = plain_tensors({**tensors, **rng_t})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))


def load_state(path: Path, model, opt, sched) -> dict:
    """Restore what ``save_state`` wrote; a damaged or foreign state file is a ``UserError``."""
    try:
        meta = json.loads(metadata(Path(path))["state"])
        tensors = load_file(str(path))
    except (UserError, SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"resume: {path} is damaged ({type(e).__name__}); start again with --overwrite") from None
    try:
        model_part = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
        result = model.load_state_dict(model_part, strict=False)
        if result.unexpected_keys or (result.missing_keys and not meta.get("compact")):
            raise KeyError(f"model tensors differ: {(result.unexpected_keys or result.missing_keys)[:5]}")
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, pid, name = k.split("/", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        sched.load_state_dict({**sched.state_dict(), **meta["scheduler"]})
        set_rng_state(tensors, meta["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"resume: {path} does not fit this run ({why}); start again with --overwrite") from None
    return meta["progress"]
