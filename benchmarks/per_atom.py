"""Per-atom routing: aspirin solvated in liquid water, solute and solvent on different adapters.

Data: ``data/solvated_test.xyz`` (``scripts/make_xtb_data.py --sets solvated``): periodic boxes
of one aspirin and 56 H2O (189 atoms) with GFN2-xTB labels; ``arrays["solute"]`` marks aspirin.
Models: the package's embedded base and its embedded adapters ``water`` and ``aspirin``, all
served by one :class:`~mmea_calc.AdaptedModel`:

* ``base``, ``water``, ``aspirin``: the whole structure on one adapter (``MMEACalculator``,
  ``select=None`` / an adapter name);
* ``oracle``: the hard per-atom split, solute atoms on ``aspirin`` and water atoms on ``water``,
  given by the data's ``solute`` mask (no routing decision): the graph is built as
  ``MMEACalculator`` builds it and ``data[ADAPTER_INDEX_KEY]`` holds one adapter index per atom.

Accuracy: per model, force MAE (meV/Å) over all atoms, solute atoms and water atoms, and energy
MAE (meV/atom). A check records that the per-node path with every atom on ``water`` reproduces
``MMEACalculator(select="water")``.

Timing: per-step time (energy, forces and stress through ASE after a small move of the atoms,
as an MD driver asks) of each calculator in :func:`step_times` on a solvated frame (189 atoms)
and on that frame tiled 2x2x1 (756 atoms). Calculators take turns within each round (the order
rotates), so every step has neighbours of the others; medians and the median of the per-round
ratios to the single-adapter (``water``) step are reported.

* ``per-atom``: ``MMEACalculator(select="per-atom")`` with the default sharpness: every atom
  mixes the adapters with weights from its own neighbourhood (no mask used).

Usage::

    python benchmarks/per_atom.py --threads 1 --out benchmarks/results/per_atom.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "solvated_test.xyz"
#: the hard per-atom split: adapter of solute atoms, adapter of water atoms
ORACLE = ("aspirin", "water")
REFERENCE = "water"  # the single-adapter calculator timings are compared with
TILE = (2, 2, 1)


# ---------------------------------------------------------------------------- models
def load_model():
    """One float64 AdaptedModel holding the embedded base and every embedded adapter."""
    from mmea_calc import AdaptedModel
    from mmea_calc.base_format import embedded_adapter_dirs

    model = AdaptedModel("embedded", dtype="float64")
    for directory in embedded_adapter_dirs():
        model.load_adapter(directory, name=directory.name, set_active=False)
    return model


def node_index(model, atoms, solute: str | None, water: str | None):
    """Per-atom adapter indices (into ``model.adapter_names``; -1: the base) from the
    ``solute`` mask: solute atoms on ``solute``, the others on ``water``."""
    import torch

    names = model.adapter_names
    index = {None: -1, **{n: i for i, n in enumerate(names)}}
    mask = torch.as_tensor(np.asarray(atoms.arrays["solute"], dtype=bool))
    return torch.where(mask, index[solute], index[water]).to(torch.long)


def routed(model, atoms, index, stress: bool = False) -> dict:
    """Energy, forces (and stress) of one structure with per-node adapter ``index``, through
    the model API as ``MMEACalculator._run`` calls it."""
    from mmea_calc.data import atoms_to_graph, collate
    from mmea_calc.model import ADAPTER_INDEX_KEY

    graph = atoms_to_graph(atoms, model.base_info)
    data = collate([graph], dtype=model.dtype, device=model.device)
    data[ADAPTER_INDEX_KEY] = index.to(model.device)
    out = model(data, compute_stress=stress, training=False)
    result = {
        "energy": float(out["energy"].detach().cpu()[0]),
        "forces": out["forces"].detach().cpu().double().numpy(),
    }
    if stress:  # a full periodic cell: mace's cell is atoms.cell, no volume conversion needed
        result["stress"] = out["stress"].detach().cpu().double().numpy()[0]
    return result


def oracle_calculator(model):
    """An ASE calculator of the oracle split (for the timing; the accuracy calls
    :func:`routed` directly)."""
    from ase.calculators.calculator import Calculator, all_changes
    from ase.stress import full_3x3_to_voigt_6_stress

    class Oracle(Calculator):
        implemented_properties = ["energy", "free_energy", "forces", "stress"]  # noqa: RUF012

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            Calculator.calculate(self, atoms, properties, system_changes)
            index = node_index(model, self.atoms, *ORACLE)
            out = routed(model, self.atoms, index, stress=self.atoms.cell.rank == 3)
            self.results = {"energy": out["energy"], "free_energy": out["energy"],
                            "forces": out["forces"]}  # fmt: skip
            if "stress" in out:
                self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"])

    return Oracle()


def _through(calc, atoms) -> tuple[np.ndarray, float]:
    calc.calculate(atoms, ["energy", "forces"])
    return calc.results["forces"], calc.results["energy"]


def _oracle(model, atoms) -> tuple[np.ndarray, float]:
    out = routed(model, atoms, node_index(model, atoms, *ORACLE))
    return out["forces"], out["energy"]


def evaluators(model) -> dict[str, Callable]:
    """Model label -> ``function(atoms) -> (forces, energy)``."""
    from mmea_calc import MMEACalculator

    out: dict[str, Callable] = {
        label: functools.partial(_through, MMEACalculator(model, select=select))
        for label, select in (("base", None), ("water", "water"), ("aspirin", "aspirin"))
    }
    out["oracle"] = functools.partial(_oracle, model)
    out["per-atom"] = functools.partial(_through, MMEACalculator(model, select="per-atom"))
    return out


def timed_calculators(model) -> dict:
    """Label -> ASE calculator for :func:`step_times` (``REFERENCE`` must be among them)."""
    from mmea_calc import MMEACalculator

    out = {
        "water": MMEACalculator(model, select="water"),
        "base": MMEACalculator(model, select=None),
        "oracle": oracle_calculator(model),
    }
    out["per-atom"] = MMEACalculator(model, select="per-atom")
    return out


# ---------------------------------------------------------------------------- accuracy
def errors(functions: dict[str, Callable], frames: list) -> dict:
    """Per model: force MAE (meV/Å) over all / solute / water atoms, energy MAE (meV/atom)."""
    out = {}
    for label, function in functions.items():
        df, solute, de = [], [], []
        for atoms in frames:
            forces, energy = function(atoms)
            df.append(np.abs(forces - atoms.arrays["REF_forces"]))
            solute.append(np.asarray(atoms.arrays["solute"], dtype=bool))
            de.append(abs(energy - atoms.info["REF_energy"]) / len(atoms))
        df_all, mask = np.concatenate(df), np.concatenate(solute)
        out[label] = {
            "forces_mae_meV_per_A": {
                "all": float(1000 * df_all.mean()),
                "solute": float(1000 * df_all[mask].mean()),
                "water": float(1000 * df_all[~mask].mean()),
            },
            "energy_mae_meV_per_atom": float(1000 * np.mean(de)),
        }
    return out


def consistency(model, atoms) -> float:
    """Max |ΔF| (eV/Å) between the per-node path with every atom on ``water`` and
    ``MMEACalculator(select="water")``: the oracle's plumbing is the calculator's."""
    from mmea_calc import MMEACalculator

    forces, _ = _through(MMEACalculator(model, select="water"), atoms)
    mine = routed(model, atoms, node_index(model, atoms, "water", "water"))["forces"]
    return float(np.abs(forces - mine).max())


# ---------------------------------------------------------------------------- timing
def step_times(calcs: dict, atoms, repeats: int, reference: str = REFERENCE) -> dict:
    """Per-step medians (ms) of each calculator on ``atoms`` and the ratios to ``reference``.

    A step: a random move of 0.01 Å, then energy, forces and stress through ASE. In each round
    every calculator takes one step, the order rotating from round to round; the ratio of a
    calculator's step to the reference's step of the same round cancels slow drifts in machine
    load. Two warm-up rounds are not counted.
    """
    rng = np.random.default_rng(0)
    labels = list(calcs)
    probes = {}
    for label, calc in calcs.items():
        probes[label] = probe = atoms.copy()
        probe.calc = calc
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(repeats + 2):
        delta = rng.normal(scale=0.01, size=atoms.positions.shape)
        for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
            probe = probes[label]
            probe.positions = atoms.positions + delta
            start = time.perf_counter()
            probe.get_potential_energy()
            probe.get_forces()
            probe.get_stress()
            if i >= 2:
                times[label].append(time.perf_counter() - start)
    ref = np.asarray(times[reference])
    out = {"atoms": len(atoms), "repeats": repeats, "reference": reference, "calculators": {}}
    for label in labels:
        ratios = np.asarray(times[label]) / ref
        out["calculators"][label] = {
            "median_ms": 1000 * statistics.median(times[label]),
            "ratio_median": float(np.median(ratios)),
            "ratio_quartiles": [float(q) for q in np.quantile(ratios, [0.25, 0.75])],
        }
    return out


# ---------------------------------------------------------------------------- main
def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="solvated frames (extxyz)")
    parser.add_argument("--frames", type=int, default=None, help="first N frames (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per size")
    parser.add_argument("--no-timing", action="store_true", help="accuracy only")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/per_atom.json"))
    args = parser.parse_args(argv)
    import ase.io
    import torch

    torch.set_num_threads(args.threads)
    path = Path(args.data)
    if not path.is_file():
        print(f"{path} is missing: make it with scripts/make_xtb_data.py --sets solvated")
        return 1
    frames = ase.io.read(path, index=":" if args.frames is None else f":{args.frames}")
    tic = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        model = load_model()
        results: dict = {
            "command": "python benchmarks/per_atom.py " + shlex.join(argv or sys.argv[1:]),
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "threads": args.threads,
                        "python": platform.python_version(), "torch": torch.__version__},
            "data": {"path": _shown(path), "frames": len(frames),
                     "atoms": int(sum(len(a) for a in frames)),
                     "solute_atoms": int(sum(a.arrays["solute"].sum() for a in frames))},
            "adapters": model.adapter_names,
            "oracle": {"solute": ORACLE[0], "water": ORACLE[1]},
        }  # fmt: skip
        results["check_max_force_diff_eV_per_A"] = consistency(model, frames[0])
        results["errors"] = errors(evaluators(model), frames)
        results["accuracy_seconds"] = round(time.perf_counter() - tic, 1)
        if not args.no_timing:
            tic = time.perf_counter()
            calcs = timed_calculators(model)
            big = frames[0].repeat(TILE)
            results["timing"] = {
                str(len(a)): step_times(calcs, a, args.repeats) for a in (frames[0], big)
            }
            results["timing_seconds"] = round(time.perf_counter() - tic, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
