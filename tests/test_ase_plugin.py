"""The ``mmea`` ASE calculator plugin (entry-point group ``ase.plugins``; needs the package
installed, e.g. ``pip install -e .``, so that its entry points are registered)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DISCOVER = """
import sys
from ase._4.plugins import plugins
names = sorted(p.name for p in plugins.calculators)
assert "mmea" in names, names
assert "torch" not in sys.modules, "discovering plugins imported torch"
plugin = next(p for p in plugins.calculators if p.name == "mmea")
cls = plugin.implementation
import mmea_calc
assert cls is mmea_calc.MMEACalculator, cls
print("ok", plugin.package)
"""

CHEAP = """
import sys
import mmea_calc, mmea_calc.ase_plugin
heavy = sorted(m for m in ("torch", "mace", "e3nn") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""

NO_API = """
import sys
sys.modules["ase._4"] = None  # an ASE without the experimental plugin API
import mmea_calc.ase_plugin as plugin
assert plugin.__ase_plugins__ == set(), plugin.__ase_plugins__
print("ok")
"""


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_ase_discovers_mmea_plugin_without_importing_torch():
    pytest.importorskip("ase._4.plugins.plugin", reason="ASE without the plugin API (< 3.29)")
    assert _run(DISCOVER).split() == ["ok", "mmea_calc"]


def test_import_is_cheap_and_survives_missing_api():
    assert _run(CHEAP).strip() == "ok"
    assert _run(NO_API).strip() == "ok"
