"""Quickstart: adapt a frozen MACE model to new reference data and run MD/relaxation with it.

Runs anywhere in about a minute on 2 CPU cores, nothing downloaded: a small MACE built in-process
stands in for a pretrained model, and ASE's EMT labels a new "environment" of C/O clusters.

    python examples/quickstart.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from mmea_calc import MMEACalculator, TrainConfig, fit_adapter
from mmea_calc.testing import build_tiny_mace, random_cluster


def labelled(n: int, seed: int) -> list:
    """C/O clusters with EMT energies and forces stored as REF_energy / REF_forces."""
    frames = []
    for s in range(seed, seed + n):
        atoms = random_cluster(6, ("C", "O"), density=0.05, min_distance=1.2, seed=s)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    return frames


def force_mae(calc: MMEACalculator, frames: list) -> float:
    errors = [
        np.abs(r["forces"] - a.arrays["REF_forces"]).mean()
        for a, r in zip(frames, calc.calculate_batch(frames), strict=True)
    ]
    return 1000 * float(np.mean(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mmea-quickstart-"))
    workdir.mkdir(parents=True, exist_ok=True)

    base_path = workdir / "base.model"  # stand-in for a pretrained mace .model file
    torch.save(build_tiny_mace(dtype=torch.float32), base_path)
    train, test = labelled(40, seed=0), labelled(10, seed=100)

    result = fit_adapter(
        str(base_path),
        train,
        config=TrainConfig(epochs=20, rank=8, lr=1e-2),
        name="emt_co",
        out_dir=workdir / "emt_co",
        overwrite=True,
    )
    print(
        f"trained adapter 'emt_co': {result.trainable_parameters} trainable parameters, "
        f"{result.seconds_per_epoch:.2f} s/epoch -> {workdir / 'emt_co'}"
    )

    calc = MMEACalculator(str(base_path), adapters=[workdir / "emt_co"])  # select="auto"
    base_calc = MMEACalculator(str(base_path), select=None)
    print(
        f"test force MAE: base {force_mae(base_calc, test):.1f} meV/Å, "
        f"adapted {force_mae(calc, test):.1f} meV/Å"
    )

    atoms = test[0].copy()
    atoms.calc = calc
    dyn = Langevin(
        atoms,
        0.5 * units.fs,
        temperature_K=300,
        friction=0.02,
        fixcm=False,
        rng=np.random.default_rng(0),
    )
    dyn.run(20)
    print(
        f"Langevin MD: 20 steps, adapter {calc.results['adapter']!r} "
        f"(router distance {calc.results['adapter_distance']:.2f}), "
        f"E = {atoms.get_potential_energy():.3f} eV"
    )
    converged = BFGS(atoms, logfile=None).run(fmax=0.05, steps=200)
    print(f"BFGS relaxation converged: {converged}, E = {atoms.get_potential_energy():.3f} eV")
    if not converged:
        raise SystemExit("relaxation did not converge")


if __name__ == "__main__":
    main()
