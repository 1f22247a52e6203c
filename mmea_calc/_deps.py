"""The one place that imports mace-torch and e3nn, in the order they need.

``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (a process-wide side effect we cannot
avoid), without which e3nn 0.4.4 fails to import under torch >= 2.6. Every module of this package
takes mace's and e3nn's pieces from here instead of importing them itself.

mace-torch also *prints* a notice on stdout when ``mace.modules`` is first imported (no
cuequivariance installed); every mace import happens here with stdout sent to stderr, so that
importing this package never prints and programs using it (``mmea-calc ... --json`` above all)
keep stdout for their own output.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

with contextlib.redirect_stdout(sys.stderr):  # mace.tools.cg prints its cuequivariance notice
    import mace

    with warnings.catch_warnings():  # e3nn warns about the variable mace set; expected here
        warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
        from e3nn import o3

    import mace.modules
    from mace import data as mace_data
    from mace.modules import lora
    from mace.tools import torch_geometric, torch_tools, utils
    from mace.tools.default_keys import DefaultKeys

# LAMMPS export (mmea_calc.export, adapter.FrozenMMEALinear): mace's wrappers, e3nn's compiler
with contextlib.redirect_stdout(sys.stderr):
    from e3nn.util import jit as e3nn_jit
    from mace.calculators.lammps_mace import LAMMPS_MACE
    from mace.calculators.lammps_mliap_mace import LAMMPS_MLIAP_MACE

__all__ = [
    "LAMMPS_MACE",
    "LAMMPS_MLIAP_MACE",
    "DefaultKeys",
    "e3nn_jit",
    "lora",
    "mace",
    "mace_data",
    "o3",
    "torch_geometric",
    "torch_tools",
    "utils",
]
