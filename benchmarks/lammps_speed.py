"""LAMMPS per-step time of an exported adapted model vs the bare exported base (pair_style mace).

Needs LAMMPS with pair style ``mace`` (ACEsuit's fork, ``scripts/build_lammps.sh``): ``--lmp``,
else ``MMEA_LAMMPS``, else ``lmp`` on PATH; skips with a message without it. Models: the
embedded base and its embedded ``water`` adapter (no shared assets needed), both exported with
``mmea-calc export`` (float64 by default; the base without ``--adapter``). Systems: periodic
water boxes (``mmea_calc.build.water_box``) of about 100 and 800 atoms. Per case, LAMMPS runs
NVE from rest on one MPI rank with one OpenMP thread: ``run WARMUP`` then ``run STEPS pre no``;
the second run's loop time per step (and its Pair share) is the figure. Cases repeat
``--repeats`` times, adapted and base alternating; medians are reported.

``pair_style mace`` (domain decomposition) puts every ghost atom within num_interactions * r_max
(+ skin) of the box into the graph: ~40 times the atoms of a 96-atom water box, tens of seconds
per step on one core. Its cases (``--dd-molecules``) therefore time ``--dd-steps`` (1) step
after the setup call, ``--dd-repeats`` (1) time.

Two comparisons: adapted vs base (same pair style), and domain decomposition on one rank
(``pair_style mace``, ghost atoms as graph nodes) vs ``pair_style mace
no_domain_decomposition`` (ghosts folded into periodic shifts).

Usage::

    python benchmarks/lammps_speed.py --out benchmarks/results/lammps_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ELEMENTS = ["H", "O"]
PAIR_STYLES = ["mace no_domain_decomposition", "mace"]
SCRIPT = """
units metal
atom_style atomic
atom_modify map yes
newton on
read_data data.lammps
pair_style {pair_style}
pair_coeff * * {model} {elements}
timestep 0.0005
fix nve all nve
thermo {steps}
run {warmup}
run {steps} pre no
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def export(folder: Path, adapter: str | None, name: str, dtype: str) -> Path:
    """``mmea-calc export`` of the embedded base, with the embedded adapter ``adapter``."""
    from mmea_calc.base_format import embedded_adapter_dirs, embedded_base_dir
    from mmea_calc.cli import main

    out = folder / name
    args = ["export", "--base", str(embedded_base_dir()), "--out", str(out), "--dtype", dtype]
    if adapter is not None:
        (directory,) = [d for d in embedded_adapter_dirs() if d.name == adapter]
        args += ["--adapter", str(directory)]
    with contextlib.redirect_stdout(io.StringIO()):  # the input template it prints
        code = main([*args, "--elements", *ELEMENTS])
    if code != 0:
        raise RuntimeError(f"mmea-calc {shlex.join(args)} failed")
    return out


def time_case(
    lmp: str, folder: Path, model: Path, pair_style: str, steps: int, warmup: int
) -> dict[str, float]:
    script = SCRIPT.format(
        pair_style=pair_style, model=model, elements=" ".join(ELEMENTS), steps=steps, warmup=warmup
    )
    (folder / "in.lammps").write_text(script)
    command = [lmp, "-in", "in.lammps", "-log", "log.lammps", "-screen", "none"]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=_env())
    log = (folder / "log.lammps").read_text() if (folder / "log.lammps").exists() else ""
    if done.returncode != 0:
        raise RuntimeError(f"lmp failed in {folder}:\n{log[-2000:]}{done.stderr}")
    loops = re.findall(r"Loop time of ([0-9.eE+-]+) on 1 procs for (\d+) steps", log)
    pairs = re.findall(r"^Pair\s*\|[^|]*\|[^|]*\|\s*([0-9.eE+-]+)", log, re.M)
    loop, steps = loops[-1]
    return {
        "ms_per_step": 1e3 * float(loop) / int(steps),
        "pair_ms_per_step": 1e3 * float(pairs[-1]) / int(steps),
    }


def run(lmp: str, args) -> dict:
    import ase.io
    import torch

    from mmea_calc.build import water_box

    results = {
        "machine": {
            "cpu": platform.machine(),
            "mpi_ranks": 1,
            "omp_threads": 1,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "lammps": {"binary": lmp, "version": _version(lmp)},
        "models": {"base": "embedded", "adapter": "embedded water", "dtype": args.dtype},
        "per_step": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {
            "adapted": export(tmp, "water", "adapted.pt", args.dtype),
            "base": export(tmp, None, "base.pt", args.dtype),
        }
        cases = [(n, "mace no_domain_decomposition") for n in args.molecules]
        cases += [(n, "mace") for n in args.dd_molecules]
        for n_molecules, pair_style in cases:
            atoms = water_box(n_molecules, seed=0)
            dd = pair_style == "mace"
            steps, warmup = (args.dd_steps, 0) if dd else (args.steps, args.warmup)
            repeats = args.dd_repeats if dd else args.repeats
            times = {name: [] for name in models}
            for repeat in range(repeats):
                order = list(models) if repeat % 2 == 0 else list(models)[::-1]
                for name in order:
                    folder = tmp / f"{n_molecules}-{pair_style.split()[-1]}-{name}-{repeat}"
                    folder.mkdir()
                    ase.io.write(
                        folder / "data.lammps",
                        atoms,
                        format="lammps-data",
                        specorder=ELEMENTS,
                        atom_style="atomic",
                        masses=True,
                    )
                    timed = time_case(lmp, folder, models[name], pair_style, steps, warmup)
                    times[name].append(timed)
            row = {"atoms": len(atoms), "pair_style": pair_style, "steps": steps}
            row.update({"warmup": warmup, "repeats": repeats})
            for name, runs in times.items():
                for key in ("ms_per_step", "pair_ms_per_step"):
                    row[f"{name}_{key}"] = statistics.median(r[key] for r in runs)
                row[f"{name}_ms_per_step_all"] = [r["ms_per_step"] for r in runs]
            row["adapted_over_base"] = row["adapted_ms_per_step"] / row["base_ms_per_step"]
            results["per_step"].append(row)
            print(
                f"{len(atoms):5d} atoms, pair_style {pair_style:28s}: adapted "
                f"{row['adapted_ms_per_step']:9.1f} ms/step, base "
                f"{row['base_ms_per_step']:9.1f} ms/step, ratio {row['adapted_over_base']:.3f}",
                flush=True,
            )
    results["domain_decomposition_cost"] = _dd_cost(results["per_step"])
    return results


def _dd_cost(rows: list[dict]) -> list[dict]:
    """Per size and model: ms/step of pair_style mace over mace no_domain_decomposition."""
    out = []
    for atoms in sorted({row["atoms"] for row in rows}):
        by_style = {row["pair_style"]: row for row in rows if row["atoms"] == atoms}
        if len(by_style) < 2:
            continue
        for name in ("adapted", "base"):
            dd = by_style["mace"][f"{name}_ms_per_step"]
            ndd = by_style["mace no_domain_decomposition"][f"{name}_ms_per_step"]
            out.append({"atoms": atoms, "model": name, "mace_over_no_dd": dd / ndd})
    for row in out:
        print(
            f"{row['atoms']:5d} atoms, {row['model']:7s}: pair_style mace / mace "
            f"no_domain_decomposition = {row['mace_over_no_dd']:.2f} (1 rank)"
        )
    return out


def _version(lmp: str) -> str:
    text = subprocess.run([lmp, "-h"], capture_output=True, text=True, env=_env()).stdout
    match = re.search(r"Large-scale Atomic/Molecular Massively Parallel Simulator - (.*)", text)
    return match.group(1).strip() if match else "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lmp", help="lmp binary (default: $MMEA_LAMMPS, then lmp on PATH)")
    parser.add_argument(
        "--molecules", type=int, nargs="*", default=[32, 267],
        help="water molecules per box, pair_style mace no_domain_decomposition",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="timed MD steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed MD steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median)")
    parser.add_argument(
        "--dd-molecules", type=int, nargs="*", default=[32, 267],
        help="water molecules per box, pair_style mace (domain decomposition: slow on one rank)",
    )  # fmt: skip
    parser.add_argument("--dd-steps", type=int, default=1, help="timed steps, pair_style mace")
    parser.add_argument("--dd-repeats", type=int, default=1, help="runs, pair_style mace")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args(argv)
    from mmea_calc.export import find_lammps

    lmp, why = find_lammps(args.lmp)
    if lmp is None:
        print(f"skipped: {why}", file=sys.stderr)
        return 0
    results = run(lmp, args)
    given = sys.argv[1:] if argv is None else list(argv)
    results["command"] = shlex.join(["python", "benchmarks/lammps_speed.py", *given])
    if args.out:
        from mmea_calc.files import atomic_write_json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
