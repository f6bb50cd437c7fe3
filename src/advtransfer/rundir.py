"""Run directories: atomic writes.

Standard library only (no torch): ``advtransfer report`` writes its files through this module without loading
torch. Under torchrun only rank 0 writes (``RANK`` from the environment, which torchrun sets for every process).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # read the process umask (there is no getter) ...
os.umask(_UMASK)  # ... and put it back


def is_main() -> bool:
    """Whether this process is rank 0 under torchrun (always, outside it)."""
    return int(os.environ.get("RANK", "0")) == 0


def atomic_write(path: str | Path, write: Callable[[str], Any], all_ranks: bool = False) -> None:
    """Write via ``write(tmp_path)`` into a temporary file beside ``path``, fsync, then rename over it.

    Any failure removes the temporary file, so ``path`` holds either its old content or the new one, never
    a part. A full disk (``ENOSPC``, also when safetensors reports it) is raised as ``OSError(ENOSPC)``
    naming ``path``. Under torchrun only rank 0 writes (unless ``all_ranks``).
    """
    if not (all_ranks or is_main()):
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise
