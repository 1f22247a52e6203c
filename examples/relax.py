"""Relax atomic positions *and* the cell with MMEACalculator (FrechetCellFilter + BFGS).

By default: a periodic box of 32 water molecules, served by the base model and adapters
shipped with the package (automatic selection); stress comes from the same model.

    python examples/relax.py [--structure FILE | --water N] [--fmax 0.05] [--steps 300]
        [--out relaxed.extxyz] [--base embedded] [--adapters embedded | DIR ...]
"""

from __future__ import annotations

import argparse

import ase.io
import torch
from ase import units
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS

from mmea_calc import MMEACalculator
from mmea_calc.build import water_box


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded", help="base dir, .model file or 'embedded'")
    parser.add_argument("--adapters", nargs="+", default=["embedded"], help="adapter dirs")
    parser.add_argument("--structure", help="start from the first frame of this (periodic) file")
    parser.add_argument("--water", type=int, default=32, help="water molecules (no --structure)")
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å (and the cell's analogue)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="relaxed.extxyz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


def describe(atoms: ase.Atoms, label: str) -> None:
    stress = atoms.get_stress()  # Voigt, eV/Å³
    pressure_gpa = -stress[:3].mean() / units.GPa
    density = atoms.get_masses().sum() / atoms.get_volume() * 1.66053907  # g/cm³
    print(
        f"{label}: E {atoms.get_potential_energy():.4f} eV, V {atoms.get_volume():.1f} Å³ "
        f"({density:.3f} g/cm³), P {pressure_gpa:.3f} GPa"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    adapters = "embedded" if args.adapters == ["embedded"] else args.adapters
    calc = MMEACalculator(args.base, adapters=adapters, select="auto")

    atoms = ase.io.read(args.structure, index=0) if args.structure else water_box(args.water)
    atoms.calc = calc
    describe(atoms, "start")
    print(f"adapter {calc.results['adapter']!r}")

    opt = BFGS(FrechetCellFilter(atoms), logfile=None)
    converged = opt.run(fmax=args.fmax, steps=args.steps)
    describe(
        atoms, f"after {opt.nsteps} BFGS steps ({'converged' if converged else 'not converged'})"
    )
    atoms.calc = None
    ase.io.write(args.out, atoms)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
