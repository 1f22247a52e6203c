"""mmea_calc: Magnitude-Modulated Equivariant Adapters for frozen MACE models.

Public API: :func:`load_base`, :class:`AdaptedModel`, :class:`MMEAConfig`,
:class:`MMEACalculator`, :func:`fit_adapter`, :class:`TrainConfig`, :func:`describe_environment`.

Names are imported on first use, so that ``import mmea_calc`` (and the ASE plugin module
:mod:`mmea_calc.ase_plugin`) stay cheap: torch and mace load only when a name is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mmea_calc._version import __version__

if TYPE_CHECKING:
    from mmea_calc.base import fingerprint, load_base
    from mmea_calc.calculator import MMEACalculator
    from mmea_calc.model import AdaptedModel, MMEAConfig
    from mmea_calc.selection import describe_environment
    from mmea_calc.train import TrainConfig, fit_adapter

_EXPORTS = {
    "AdaptedModel": "mmea_calc.model",
    "MMEACalculator": "mmea_calc.calculator",
    "MMEAConfig": "mmea_calc.model",
    "TrainConfig": "mmea_calc.train",
    "describe_environment": "mmea_calc.selection",
    "fingerprint": "mmea_calc.base",
    "fit_adapter": "mmea_calc.train",
    "load_base": "mmea_calc.base",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmea_calc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
