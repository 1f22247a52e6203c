from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import mmea_calc.base_format as base_format
from mmea_calc.build import water_box
from mmea_calc.calculator import MMEACalculator
from mmea_calc.cli import main
from mmea_calc.demo import QUICK, _check_errors, run_demo
from mmea_calc.errors import DemoError, EmbeddedAssetsMissingError

ROOT = Path(__file__).resolve().parents[1]
# small enough to be fast on tiny stand-ins, big enough to exercise every step
TINY = replace(QUICK, water_steps=8, molecule_steps=8, n_water=8, test_frames=4, prerelax_steps=5)


@pytest.fixture(scope="module")
def assets(demo_assets):
    return demo_assets


def test_water_box_density_and_spacing():
    box = water_box(32, seed=3)
    density = box.get_masses().sum() / box.get_volume() * 1.66053907  # amu/Å³ -> g/cm³
    assert abs(density - 0.997) < 1e-3
    oxygens = [i for i, z in enumerate(box.numbers) if z == 8]
    distances = box.get_all_distances(mic=True)[oxygens][:, oxygens]
    assert distances[distances > 0].min() >= 2.6 - 1e-9


def test_run_demo_end_to_end_on_stand_ins(assets):
    out, bars = io.StringIO(), io.StringIO()
    report = run_demo(assets, settings=TINY, out=out, progress=bars)
    text = out.getvalue()
    chosen = {label.split(" ")[0]: s["adapter"] for label, s in report.selections.items()}
    assert chosen == {"water": "water", "ethanol": "ethanol"}  # molecule named by its adapter
    assert "router distance" in text and "demo passed" in text
    assert "step" in bars.getvalue()  # tqdm progress bars went to their own stream
    for md in report.md.values():
        assert md["steps"] == 8 and 0 < md["max_K"] < TINY.blowup_factor * md["target_K"]
        assert 0.0 <= md["max_extrapolation"] < 1e3  # the stand-in adapters are calibrated
    molecule_md = next(v for k, v in report.md.items() if k.startswith("ethanol"))
    assert molecule_md["target_K"] == 600.0  # from the test frames' temperature_K
    assert report.relax["fmax"] <= TINY.relax_fmax
    assert report.relax["final_eV"] < report.relax["start_eV"]
    for row in report.errors.values():
        assert row["frames"] == 4
        assert row["adapted"]["forces_mae_meV_per_A"] < row["base"]["forces_mae_meV_per_A"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"blowup_factor": 1e-3}, "temperature blow-up"),
        ({"relax_steps": 1, "water_steps": 1, "molecule_steps": 1}, "did not converge"),
    ],
)
def test_demo_fails_loudly(assets, changes, match):
    with pytest.raises(DemoError, match=match):
        run_demo(assets, settings=replace(TINY, **changes), out=io.StringIO())


def test_demo_refuses_wrong_adapter_and_worse_errors(assets, monkeypatch):
    import mmea_calc.demo as demo

    monkeypatch.setattr(demo, "_roles", lambda calc: {"water": "ethanol", "molecule": "water"})
    with pytest.raises(DemoError, match="automatic selection chose 'water'"):
        run_demo(assets, settings=TINY, out=io.StringIO())
    row = {"base": {"energy_mae_meV_per_atom": 1.0, "forces_mae_meV_per_A": 10.0}}
    row["adapted"] = {"energy_mae_meV_per_atom": 0.5, "forces_mae_meV_per_A": 12.0}
    with pytest.raises(DemoError, match="does not improve the force error"):
        _check_errors({"water": row})


def test_embedded_spec_loads_every_shipped_adapter(assets, monkeypatch):
    monkeypatch.setattr(base_format, "EMBEDDED_DIR", Path(assets))
    calc = MMEACalculator(base="embedded", adapters="embedded")
    assert calc.adapter_names == ["ethanol", "water"]


def test_cli_demo_without_assets_fails_in_one_line(tmp_path, capsys):
    assert main(["demo", "--quick", "--assets", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no embedded base model" in err


def _embedded_missing() -> str | None:
    try:
        base_format.embedded_base_dir()
        base_format.embedded_adapter_dirs()
    except EmbeddedAssetsMissingError as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_real_cli_demo_quick():
    missing = _embedded_missing()
    if missing:
        pytest.skip(f"embedded assets are not built yet: {missing}")
    done = subprocess.run(
        [sys.executable, "-m", "mmea_calc.cli", "demo", "--quick", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo passed" in done.stdout
    assert "adapter 'water'" in done.stdout
    # the shipped solvated frames: per-atom routing serves solute and water, and is checked
    assert "per-atom routing, solvated aspirin" in done.stdout
    assert "force MAE (meV/Å) on 2 solvated frames" in done.stdout
