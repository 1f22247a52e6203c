"""The examples users copy from run (quick settings, tiny stand-in assets), so they cannot rot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], **env: str) -> str:
    environ = dict(os.environ, **env)
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}"
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environ)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _model_args(assets: Path) -> list[str]:
    adapters = [str(assets / "adapters" / name) for name in ("water", "ethanol")]
    return ["--base", str(assets / "base"), "--adapters", *adapters]


def test_md_example_writes_trajectory(demo_assets, tmp_path):
    traj = tmp_path / "md.traj"
    out = _run([sys.executable, "examples/md.py", *_model_args(demo_assets), "--water", "8",
                "--steps", "4", "--every", "2", "--traj", str(traj)])  # fmt: skip
    assert "adapter 'water'" in out and "step      4" in out
    frames = ase.io.read(traj, ":")
    assert len(frames) == 3 and all(f.pbc.all() for f in frames)
    assert (frames[-1].positions != frames[0].positions).any()


def test_relax_example_moves_positions_and_cell(demo_assets, tmp_path):
    relaxed = tmp_path / "relaxed.extxyz"
    out = _run([sys.executable, "examples/relax.py", *_model_args(demo_assets), "--water", "8",
                "--steps", "3", "--out", str(relaxed)])  # fmt: skip
    assert "after 3 BFGS steps" in out and "GPa" in out
    from mmea_calc.build import water_box

    start, final = water_box(8), ase.io.read(relaxed)
    assert abs(final.get_volume() - start.get_volume()) > 1e-6  # the cell moved too


@pytest.mark.slow
def test_finetune_script_data_to_md(demo_assets, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(demo_assets / "data" / "ethanol_test.xyz", data / f"{split}.xyz")
    out = tmp_path / "run"
    stdout = _run(["bash", "examples/finetune.sh", str(demo_assets / "base"), str(data), "1"],
                  OUT=str(out), RANK="2", BATCH="2", MD_STEPS="2")  # fmt: skip
    assert (out / "mmea" / "adapter_config.json").is_file()
    assert (out / "mmea-test.json").is_file()
    assert len(ase.io.read(out / "md.traj", ":")) >= 1
    assert "adapter 'mmea'" in stdout  # MD ran with the new adapter


def test_finetune_script_skips_without_data(tmp_path):
    done = subprocess.run(
        ["bash", "examples/finetune.sh", "embedded", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and "skipping" in done.stderr


def test_torchsim_example_runs_a_mixed_batch(tmp_path):
    """Water boxes and aspirins, each with its adapter, NVT then FIRE (needs torch-sim >= 0.6:
    Python >= 3.12; .ci/run runs it in its 3.12 environment)."""
    ts = pytest.importorskip("torch_sim")
    if not hasattr(ts, "Integrator"):
        pytest.skip("torch-sim-atomistic >= 0.6 not installed")
    out = _run([sys.executable, "examples/torchsim_md.py", "--water-boxes", "1", "--water", "8",
                "--molecules", "1", "--steps", "10", "--relax-steps", "3",
                "--traj", str(tmp_path)])  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert [row[2] for row in rows] == ["water", "aspirin"] * 3  # start, after NVT, after FIRE
    with ts.TorchSimTrajectory(tmp_path / "system_1.h5", mode="r") as trajectory:
        assert trajectory.get_array("positions").shape == (2, 21, 3)  # steps 0 and 10
        assert trajectory.get_array("adapter_extrapolation").shape == (2, 1)
