"""advtransfer: adversarial transfer learning (Hua et al., CVPR 2024, "Initialization Matters for Adversarial
Transfer Learning") — RanLI / RoLI, Linear / Full-FT / PEFT methods, PGD and AutoAttack on any timm backbone."""

import logging as _logging
from importlib.metadata import PackageNotFoundError, version

# silence torch's "No CUDA runtime is found" (a CUDA build on a CPU-only machine) on every peft/timm import
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

try:
    __version__ = version("advtransfer")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["evaluate"]


def __getattr__(name: str):
    """``advtransfer.evaluate`` on first use: ``import advtransfer`` (and ``advtransfer report``) loads no torch."""
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    raise AttributeError(name)
