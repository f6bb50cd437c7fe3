"""A stage's per-epoch records as ``metrics.csv``, TensorBoard events and (``track.wandb``) Weights & Biases.

``metrics.jsonl`` stays the record a run resumes from; these are views of it (``WANDB_MODE=offline`` needs no account).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .config import RunConfig, to_dict
from .errors import UserError
from .rundir import is_main, read_jsonl, write_text


class Tracker:
    """``log(record)`` after each epoch of one stage; ``close()`` at its end. Only rank 0 tracks."""

    def __init__(self, stage_dir: Path, cfg: RunConfig, resuming: bool) -> None:
        self.dir, self.cfg, self.resuming, self.tb, self.wandb = Path(stage_dir), cfg, resuming, None, None
        self.on = is_main()
        if self.on and cfg.track.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("track.wandb: the wandb package is not installed (pip install wandb)") from None
            name, project = cfg.name or self.dir.name, cfg.track.wandb_project
            self.wandb = wandb.init(
                project=project, dir=str(self.dir), config=to_dict(cfg), name=name, reinit="create_new"
            )

    def log(self, record: dict) -> None:
        if not self.on:
            return
        rows, out = read_jsonl(self.dir / "metrics.jsonl"), io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.dir / "metrics.csv", out.getvalue())
        step = record["epoch"] + 1  # the initial model of a RoLI stage 2 is step 0
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k != "epoch"}
        if self.cfg.track.tensorboard:
            if self.tb is None:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed stage drops the events of the epochs it trains again
                self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=step if self.resuming else None)
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
