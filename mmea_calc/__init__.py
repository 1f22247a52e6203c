"""mmea_calc: Magnitude-Modulated Equivariant Adapters for frozen MACE models.

Public API: :func:`load_base`, :class:`AdaptedModel`, :class:`MMEAConfig`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from mmea_calc.base import fingerprint, load_base
from mmea_calc.model import AdaptedModel, MMEAConfig

__all__ = ["AdaptedModel", "MMEAConfig", "__version__", "fingerprint", "load_base"]
