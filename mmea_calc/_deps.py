"""The one place that imports mace-torch and e3nn, in the order they need.

``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (a process-wide side effect we cannot
avoid), without which e3nn 0.4.4 fails to import under torch >= 2.6. Every module of this package
takes ``mace`` and ``o3`` from here instead of importing e3nn itself.

mace-torch also *prints* a notice on stdout when ``mace.modules`` is first imported (no
cuequivariance installed); we import it here with stdout sent to stderr, so that programs using
this package (``mmea-calc ... --json`` above all) keep stdout for their own output.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import mace

with warnings.catch_warnings():  # e3nn warns about the variable mace set; it is expected here
    warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
    from e3nn import o3

with contextlib.redirect_stdout(sys.stderr):  # mace.tools.cg prints its cuequivariance notice
    import mace.modules

__all__ = ["mace", "o3"]
