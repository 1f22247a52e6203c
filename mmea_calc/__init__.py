"""mmea_calc: Magnitude-Modulated Equivariant Adapters for frozen MACE models.

Public API: :func:`load_base`, :class:`AdaptedModel`, :class:`MMEAConfig`,
:class:`MMEACalculator`, :func:`fit_adapter`, :class:`TrainConfig`, :func:`describe_environment`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from mmea_calc.base import fingerprint, load_base
from mmea_calc.calculator import MMEACalculator
from mmea_calc.model import AdaptedModel, MMEAConfig
from mmea_calc.selection import describe_environment
from mmea_calc.train import TrainConfig, fit_adapter

__all__ = [
    "AdaptedModel",
    "MMEACalculator",
    "MMEAConfig",
    "TrainConfig",
    "__version__",
    "describe_environment",
    "fingerprint",
    "fit_adapter",
    "load_base",
]
