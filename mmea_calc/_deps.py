"""The one place that imports mace-torch and e3nn, in the order they need.

``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (a process-wide side effect we cannot
avoid), without which e3nn 0.4.4 fails to import under torch >= 2.6. Every module of this package
takes ``mace`` and ``o3`` from here instead of importing e3nn itself.
"""

from __future__ import annotations

import mace
from e3nn import o3

__all__ = ["mace", "o3"]
