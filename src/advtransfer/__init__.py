"""advtransfer: adversarial transfer learning (Hua et al., CVPR 2024, "Initialization Matters for Adversarial
Transfer Learning") — RanLI / RoLI, Linear / Full-FT / PEFT methods, PGD and AutoAttack on any timm backbone."""

import logging as _logging

# torch warns "No CUDA runtime is found" when a CUDA build of torch runs on a CPU-only machine; say it once, at
# debug level, instead of on every command (it is emitted when peft/timm import torch.utils.cpp_extension).
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

from .evaluate import evaluate  # noqa: E402

__all__ = ["evaluate"]
__version__ = "0.1.0"
