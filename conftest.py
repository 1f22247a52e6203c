"""Collection settings for ``pytest --doctest-modules mmea_calc tests``."""

from __future__ import annotations

import importlib.util

# mmea_calc.torchsim needs torch-sim-atomistic >= 0.6 (Python >= 3.12): where it is missing,
# importing the module raises by design (tests/test_torchsim.py checks the message), so its
# doctests are not collected there.
collect_ignore = []
if importlib.util.find_spec("torch_sim") is None:
    collect_ignore.append("mmea_calc/torchsim.py")
