"""Run-directory size of a ViT-B/16 LoRA run: compact checkpoints (what a run writes) vs full-model files (before).

    python benchmarks/rundir_size.py     # docs/performance.md, "Run directories"

Builds ViT-B/16 (``vit_base_patch16_224``, random weights: the size does not depend on them) as a source checkpoint,
applies LoRA with its defaults and a 10-class head as a run does, takes one optimiser step so that AdamW holds its
state, then saves ``best.safetensors`` and ``state.safetensors`` the way ``pipeline``/``train`` do: compact
(``checkpoints.compact_keys``: trainable tensors and the buffers of modules that train, plus the source's path and
SHA-256) and full (every tensor, as before). Checks that the compact best checkpoint reloads to the same logits.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from advtransfer.checkpoints import compact_keys, load_classifier, save_checkpoint, save_state, source_of
from advtransfer.config import TrainConfig
from advtransfer.methods import apply_method
from advtransfer.models import ModelSpec, build
from advtransfer.train import make_optimizer, make_scheduler
from advtransfer.weightfiles import load_backbone_weights


def main() -> None:
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix="rundir_size_"))
    src_spec = ModelSpec("vit_base_patch16_224", {}, 1000)
    source = out / "source.safetensors"
    save_checkpoint(build(src_spec), src_spec, source)
    method = {"name": "lora", "options": {}}
    spec = ModelSpec("vit_base_patch16_224", {}, 10, trained=source_of(source), method=method)
    model = build(spec)
    load_backbone_weights(model, source)
    apply_method(model, "lora", {})
    cfg = TrainConfig()
    opt = make_optimizer(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    sched = make_scheduler(opt, cfg, 10)
    progress = {"epoch": 1, "step": 0, "best": None, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    only = compact_keys(model)
    sizes = {}
    for kind, keep in (("compact", only), ("full", None)):
        save_checkpoint(model, spec, out / f"best_{kind}.safetensors", only=keep)
        save_state(out / f"state_{kind}.safetensors", model, opt, sched, progress, keep)
        sizes[kind] = {f: (out / f"{f}_{kind}.safetensors").stat().st_size / 1e6 for f in ("best", "state")}
    t = time.perf_counter()
    again, _ = load_classifier(out / "best_compact.safetensors")
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        same = torch.equal(again(x), model.eval()(x))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"ViT-B/16 + LoRA (defaults), 10 classes: {trainable:,} of {total:,} parameters train; {len(only)} tensors kept"
    )
    print(f"source checkpoint (referenced, not copied): {source.stat().st_size / 1e6:.1f} MB")
    for kind, s in sizes.items():
        print(
            f"{kind:<8} best {s['best']:8.2f} MB  state {s['state']:8.2f} MB  run directory {sum(s.values()):8.2f} MB"
        )
    ratio = sum(sizes["full"].values()) / sum(sizes["compact"].values())
    print(
        f"compact / full: {ratio:.0f}x smaller; compact reload (source SHA-256 checked) "
        f"{time.perf_counter() - t:.1f} s, logits bit-identical: {same}"
    )
    for f in out.iterdir():
        f.unlink()
    out.rmdir()


if __name__ == "__main__":
    main()
