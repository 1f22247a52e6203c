"""float32 vs float64 serving: the tolerance a user gets, and NVE energy drift in MD.

Uses only what the package ships (no ``../shared`` needed): the embedded base and its
``water`` and ``aspirin`` adapters, served by ``MMEACalculator(..., default_dtype=...)`` in
float64 and in float32 (the same files: a base's fingerprint does not depend on the dtype).

* **Tolerance.** On the embedded held-out frames (``water_test.xyz``: 96-atom periodic water
  boxes; ``aspirin_test.xyz``: hot aspirin), float32 minus float64: energy per atom (meV/atom),
  forces (meV/Å; max and mean absolute component), stress (meV/Å³, water) and the extrapolation
  grade.
* **NVE.** A relaxed-free start: the first water frame, velocities drawn at 300 K (seeded),
  ``--steps`` velocity-Verlet steps of ``--dt`` fs in each dtype from the same state. Recorded:
  the total-energy drift (last minus first, and the slope of a straight-line fit) and its
  largest excursion, per atom; and the time per step, with the two dtypes run in interleaved
  blocks so that machine noise hits both alike.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/float32_md.py --steps 2000 --dt 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float64", "float32")


def _calculators(adapter: str) -> dict:
    from mmea_calc import MMEACalculator

    return {
        dtype: MMEACalculator("embedded", adapters="embedded", select=adapter, default_dtype=dtype)
        for dtype in DTYPES
    }


def _tolerance(adapter: str, path: Path) -> dict:
    """float32 minus float64 on held-out frames."""
    import ase.io

    calcs = _calculators(adapter)
    frames = ase.io.read(path, ":")
    rows = {d: [] for d in DTYPES}
    for atoms in frames:
        for dtype, calc in calcs.items():
            atoms.calc = calc
            row = {
                "energy": atoms.get_potential_energy() / len(atoms),
                "forces": atoms.get_forces().copy(),
                "grade": calc.results.get("adapter_extrapolation"),
            }
            if atoms.cell.rank == 3 and atoms.pbc.all():
                row["stress"] = atoms.get_stress().copy()
            rows[dtype].append(row)
    de = [1000 * abs(a["energy"] - b["energy"]) for a, b in zip(*rows.values(), strict=True)]
    df = np.concatenate(
        [1000 * np.abs(a["forces"] - b["forces"]).ravel() for a, b in zip(*rows.values(),
                                                                          strict=True)]
    )  # fmt: skip
    out = {
        "frames": len(frames),
        "atoms": [len(a) for a in frames][:1],
        "energy_per_atom_meV_max": float(max(de)),
        "energy_per_atom_meV_mean": float(np.mean(de)),
        "forces_meV_per_A_max": float(df.max()),
        "forces_meV_per_A_mean": float(df.mean()),
        "grade_abs_diff_max": float(
            max(abs(a["grade"] - b["grade"]) for a, b in zip(*rows.values(), strict=True))
        ),
    }
    if "stress" in rows["float64"][0]:
        ds = np.concatenate(
            [1000 * np.abs(a["stress"] - b["stress"]) for a, b in zip(*rows.values(), strict=True)]
        )
        out["stress_meV_per_A3_max"] = float(ds.max())
    return out


def _nve(steps: int, dt: float, block: int, seed: int) -> dict:
    """The same NVE run in both dtypes, advanced in interleaved blocks of ``block`` steps."""
    import ase.io
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    start = ase.io.read(ROOT / "mmea_calc" / "embedded" / "data" / "water_test.xyz", 0)
    MaxwellBoltzmannDistribution(start, temperature_K=300, rng=np.random.default_rng(seed))
    Stationary(start)
    calcs = _calculators("water")
    runs = {}
    for dtype in DTYPES:
        atoms = start.copy()
        atoms.calc = calcs[dtype]
        dyn = VelocityVerlet(atoms, timestep=dt * units.fs)
        energies = [atoms.get_total_energy()]
        dyn.attach(lambda a=atoms, e=energies: e.append(a.get_total_energy()), interval=1)
        runs[dtype] = {"atoms": atoms, "dyn": dyn, "energies": energies, "seconds": 0.0}
    done = 0
    while done < steps:
        n = min(block, steps - done)
        order = DTYPES if (done // block) % 2 == 0 else DTYPES[::-1]
        for dtype in order:
            run = runs[dtype]
            began = time.perf_counter()
            run["dyn"].run(n)
            run["seconds"] += time.perf_counter() - began
        done += n
    result = {}
    for dtype, run in runs.items():
        natoms = len(run["atoms"])
        energy = np.array(run["energies"][: steps + 1]) / natoms
        time_ps = np.arange(len(energy)) * dt / 1000
        slope = float(np.polyfit(time_ps, energy, 1)[0]) * 1000  # meV/atom/ps
        result[dtype] = {
            "drift_meV_per_atom": float((energy[-1] - energy[0]) * 1000),
            "drift_slope_meV_per_atom_per_ps": slope,
            "max_excursion_meV_per_atom": float(np.abs(energy - energy[0]).max() * 1000),
            "ms_per_step": 1000 * run["seconds"] / steps,
            "final_temperature_K": float(run["atoms"].get_temperature()),
        }
    result["float32_over_float64_time_per_step"] = (
        result["float32"]["ms_per_step"] / result["float64"]["ms_per_step"]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="NVE steps (2000 x 0.5 fs: 1 ps)")
    parser.add_argument("--dt", type=float, default=0.5, help="time step, fs")
    parser.add_argument("--block", type=int, default=50, help="steps per interleaved block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/float32_md.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    data = ROOT / "mmea_calc" / "embedded" / "data"
    with contextlib.redirect_stdout(sys.stderr):
        results = {
            "command": "python benchmarks/float32_md.py " + shlex.join(argv or sys.argv[1:]),
            "setup": {
                "threads": args.threads,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "machine": platform.machine(),
            },
            "tolerance": {
                "water": _tolerance("water", data / "water_test.xyz"),
                "aspirin": _tolerance("aspirin", data / "aspirin_test.xyz"),
            },
            "nve_water": _nve(args.steps, args.dt, args.block, args.seed),
        }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
