"""Run directories: atomic writes, JSON/JSONL, the run lock, fresh / resume / overwrite, signals, the environment.
Standard library only (``report`` and ``sweep`` write through it without torch); under torchrun only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there are not locked
    fcntl = None

RESULT, LOCK, REPLACED = "result.json", ".lock", ".replaced"
# what a run writes; --overwrite moves exactly these aside (never other files a user keeps beside them)
ARTIFACTS = {RESULT, "config.yaml", "env.json", "metrics.jsonl", "metrics.csv", "tensorboard", "log.txt", "wandb"}
ARTIFACTS |= {"best.safetensors", "state.safetensors", "masks.safetensors", "autoattack_state.json", "stage1", "stage2"}
_UMASK = os.umask(0o022)  # read the process umask (there is no getter) ...
os.umask(_UMASK)  # ... and put it back


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def atomic_write(path: str | Path, write: Callable[[str], Any], all_ranks: bool = False) -> None:
    """``write(tmp)`` beside ``path``, fsync, rename over it: ``path`` holds old or new content, never a part."""
    if not (all_ranks or is_main()):
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # after writing: a writer that replaces the file would reset the mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e):  # (safetensors' wording)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[dict]:
    """The complete records of a JSON-lines file ([] if absent); a line a foreign editor broke is skipped."""
    out = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def environment() -> dict:
    """Git SHA, Python and library versions, recorded with every run."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    libs = {}
    for lib in ("torch", "torchvision", "timm", "peft", "pyautoattack"):
        try:
            libs[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            libs[lib] = "absent"
    return {"git_sha": sha or "unknown", "python": platform.python_version(), **libs, "machine": platform.machine()}


class RunDir:
    """A run directory, locked (``flock``) while in use: fresh, resumed, or overwriting (old run in ``.replaced/``)."""

    def __init__(self, path: str | Path, config: dict, *, resume: bool = False, overwrite: bool = False) -> None:
        if resume and overwrite:
            raise UserError("run: --resume and --overwrite contradict each other; choose one")
        self.path, self._fd, self.resuming, self.replacing = Path(path), None, False, False
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run: --out {self.path} is a file, not a directory")
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run: cannot create run directory {self.path}: {e.strerror or e}") from None
        self._acquire()
        try:
            self.resuming = self._decide(config, resume, overwrite)
        except BaseException:
            self._unlock()  # a refused run changes nothing
            raise
        self.replacing = (self.path / REPLACED).is_dir()

    @classmethod
    def follower(cls, resuming: bool) -> RunDir:
        """The run directory as a torchrun rank other than 0 sees it: rank 0's decision, no lock, no writes."""
        rd = cls.__new__(cls)
        rd.path, rd._fd, rd.resuming, rd.created, rd.replacing = None, None, resuming, False, False
        return rd

    def _own(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name in ARTIFACTS or (p.name[0] == "." and p.name[-4:] == ".tmp")]

    def _decide(self, config: dict, resume: bool, overwrite: bool) -> bool:
        saved = self.path / "config.yaml"
        if (self.path / RESULT).exists() and not overwrite:
            raise UserError(f"run: {self.path} already holds a finished run (use --overwrite to replace it)")
        others = [p for p in self.path.iterdir() if p.name not in (LOCK, REPLACED)]
        if overwrite:
            if others and not saved.exists():
                raise UserError(f"run: {self.path} is not a run directory (no config.yaml); refusing to overwrite it")
            aside = self.path / REPLACED
            if aside.exists():  # a killed overwrite's copy there is older: what is here is its partial run
                self._remove(self._own())
            else:
                aside.mkdir()
                for p in self._own():
                    p.rename(aside / p.name)
            return False
        if resume and saved.exists():
            try:
                old = yaml.safe_load(saved.read_text())
            except (yaml.YAMLError, ValueError) as e:
                raise UserError(f"run: cannot resume, {saved} is unreadable ({e})") from None
            if old != config:
                raise UserError(
                    f"run: --resume with a config that differs from {saved} ({first_difference(old, config)})"
                )
            for tmp in self.path.rglob(".*.tmp"):  # what a killed run was writing: never complete
                tmp.unlink()
            return True
        if others and not resume:
            raise UserError(f"run: {self.path} is not empty (use --resume to continue it or --overwrite)")
        if others:  # --resume, but the run died before it wrote its config: nothing of it is worth keeping
            if len(self._own()) != len(others):
                raise UserError(f"run: nothing to resume in {self.path} (no config.yaml) and it holds other files")
            self._remove(self._own())
        return False

    @staticmethod
    def _remove(paths: list[Path]) -> None:
        for p in paths:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def _acquire(self) -> None:
        if fcntl is None:
            return
        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise UserError(f"run: {self.path} is in use by {who} (a run holds its lock)") from None
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    break
            os.close(fd)  # a holder that released between our open and flock unlinked the file we hold: retry
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self, ok: bool, discard: bool = False, keep: bool = False) -> None:
        """Unlock; a replaced run is deleted if ``ok``, else put back unless ``keep``; ``discard``: remove our files."""
        if self.path is None:  # a follower
            return
        aside = self.path / REPLACED
        restore = self.replacing and not ok and not keep
        try:
            if restore:
                self.log(f"this run failed: the finished run it was replacing is put back from {aside}")
            if discard or restore:
                self._remove(self._own())
            if self.replacing and not keep:
                for p in aside.iterdir() if restore else ():
                    p.rename(self.path / p.name)
                shutil.rmtree(aside)
        finally:
            self._unlock()
            if discard and self.created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()  # only if empty: never removes anything it did not create

    def _unlock(self) -> None:
        if self._fd is not None:
            (self.path / LOCK).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def log(self, msg: str) -> None:
        if self.path is None:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.path / "log.txt", "a") as f:
            f.write(line + "\n")


def first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
    return f"{where or 'config'}: saved {a!r}, now {b!r}"


def record_resume(path: Path, now: dict, log: Callable[[str], None]) -> dict:
    """``env.json`` keeps the first environment and appends each resume's; changed versions or code are logged."""
    try:
        first = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return now  # no readable record of the first process: this one is the best there is
    resumes = [*first.pop("resumes", []), now]
    changed = sorted(k for k in now if first.get(k) != now[k])
    if changed:
        log(f"warning: resumed with different {', '.join(changed)} than the run started with (env.json keeps both)")
    return {**first, "resumes": resumes}


class StopRequest:
    """Defers SIGINT/SIGTERM to the next safe point (no half-updated saved state); a second one force-quits."""

    def __init__(self) -> None:
        self.requested, self._old = False, {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
