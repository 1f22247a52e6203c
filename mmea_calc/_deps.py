"""The one place that imports mace-torch and e3nn, in the order they need.

``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (a process-wide side effect we cannot
avoid), without which e3nn 0.4.4 fails to import under torch >= 2.6. Every module of this package
takes ``mace`` and ``o3`` from here instead of importing e3nn itself.
"""

from __future__ import annotations

import warnings

import mace

with warnings.catch_warnings():  # e3nn warns about the variable mace set; it is expected here
    warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
    from e3nn import o3

__all__ = ["mace", "o3"]
