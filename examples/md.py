"""NVT molecular dynamics (Langevin thermostat) with MMEACalculator, saved to a trajectory file.

By default: a periodic box of 32 water molecules at liquid density, served by the base model
and adapters shipped with the package; automatic selection picks the adapter (printed).

    python examples/md.py [--structure FILE | --water N] [--steps 200] [--temperature 300]
                          [--traj md.traj] [--base embedded] [--adapters embedded | DIR ...]
"""

from __future__ import annotations

import argparse

import ase.io
import numpy as np
import torch
from ase import units
from ase.io.trajectory import Trajectory
from ase.md.langevin import Langevin

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from mmea_calc import MMEACalculator
from mmea_calc.build import water_box


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded", help="base dir, .model file or 'embedded'")
    parser.add_argument("--adapters", nargs="+", default=["embedded"], help="adapter dirs")
    parser.add_argument("--structure", help="start from the first frame of this file")
    parser.add_argument("--water", type=int, default=32, help="water molecules (no --structure)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--friction", type=float, default=0.01, help="1/fs")
    parser.add_argument("--traj", default="md.traj", help="trajectory file (ASE .traj)")
    parser.add_argument("--every", type=int, default=10, help="write/print every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    adapters = "embedded" if args.adapters == ["embedded"] else args.adapters
    calc = MMEACalculator(args.base, adapters=adapters, select="auto")

    if args.structure:
        atoms = ase.io.read(args.structure, index=0)
    else:
        atoms = water_box(args.water, seed=args.seed)  # relax it first for production runs
    atoms.calc = calc
    choice = calc.choose(atoms)
    print(
        f"{atoms.get_chemical_formula()} ({len(atoms)} atoms): adapter {choice.name!r} "
        f"({choice.reason}, router distance {choice.distance or 0.0:.2f})"
    )

    rng = np.random.default_rng(args.seed)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=rng)
    dyn = Langevin(
        atoms,
        args.timestep * units.fs,
        temperature_K=args.temperature,
        friction=args.friction / units.fs,
        fixcm=False,
        rng=rng,
    )
    traj = Trajectory(args.traj, "w", atoms)
    dyn.attach(traj.write, interval=args.every)

    def report() -> None:
        print(
            f"step {dyn.nsteps:6d}  E_pot {atoms.get_potential_energy():12.4f} eV  "
            f"T {atoms.get_temperature():7.1f} K  adapter {calc.results['adapter']}"
        )

    dyn.attach(report, interval=args.every)
    dyn.run(args.steps)
    traj.close()
    print(f"wrote {len(ase.io.read(args.traj, ':'))} frames to {args.traj}")


if __name__ == "__main__":
    main()
