"""advtransfer: adversarial transfer learning (Hua et al., CVPR 2024, "Initialization Matters for Adversarial
Transfer Learning") — RanLI / RoLI, Linear / Full-FT / PEFT methods, PGD and AutoAttack on any timm backbone.

``advtransfer.evaluate`` (the function) loads torch on first use, so that ``import advtransfer.report`` does not.
"""

import logging as _logging
import sys as _sys
import types as _types

# torch warns "No CUDA runtime is found" when a CUDA build of torch runs on a CPU-only machine; say it once, at
# debug level, instead of on every command (it is emitted when peft/timm import torch.utils.cpp_extension).
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

__all__ = ["evaluate"]
__version__ = "0.1.0"


class _Package(_types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Loading the submodule advtransfer.evaluate sets this attribute to the module: keep the function instead.
        if name == "evaluate" and isinstance(value, _types.ModuleType):
            value = value.evaluate
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> object:
        if name == "evaluate":
            from .evaluate import evaluate

            return evaluate
        raise AttributeError(f"module 'advtransfer' has no attribute {name!r}")


_sys.modules[__name__].__class__ = _Package
