"""advtransfer: adversarial transfer learning (Hua et al., CVPR 2024, "Initialization Matters for Adversarial
Transfer Learning") — RanLI / RoLI, Linear / Full-FT / PEFT methods, PGD and AutoAttack on any timm backbone."""

from .evaluate import evaluate

__all__ = ["evaluate"]
__version__ = "0.1.0"
