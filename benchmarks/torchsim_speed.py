"""TorchSim throughput: one batched MMEAModel call against a loop of ASE MMEACalculator calls,
and the bare base through MMEAModel against mace's own MaceTorchSimModel.

Systems: half periodic water boxes of 8 H2O (24 atoms, liquid density, random orientations),
half aspirin frames (21 atoms, the package's embedded test set) in 20 Å periodic boxes; the
package's embedded base and its calibrated ``water``/``aspirin`` adapters, ``select="auto"``
(each system gets its own adapter). One step = energies, forces and stresses of every system
from positions rattled anew (0.01 Å) before each step, so nothing is served from a cache.

Engines, timed in interleaved rounds (one step each, in turn; the machine is shared):

* ``ase``: ``MMEACalculator`` (the same adapters, auto selection), one call per system;
* ``mmea``: ``MMEAModel(select="auto")``, one batched call;
* ``mmea_base``: ``MMEAModel(select=None)`` (the bare base through our model);
* ``mace``: mace's ``MaceTorchSimModel`` on a copy of the bare base.

Reported per size and dtype: median seconds per step, atom-steps per second, the median of the
per-round ratios ase/mmea (the speed-up of batching with adapters), mmea_base/mace (our
overhead on the bare base; goal <= 1.05) and mmea/mace (adapters and all), and each engine's
peak resident memory added over the loaded models, measured in a process of its own.

Usage (Python >= 3.12 with ``mmea-calc[torchsim]``)::

    OMP_NUM_THREADS=1 python benchmarks/torchsim_speed.py --sizes 8,32,128 \\
        --dtypes float64,float32 --rounds 7 --out benchmarks/results/torchsim_speed.json

Large batches allocate message tensors of hundreds of MB per step; glibc hands such blocks
back to the kernel after each step and page-faults them in again on the next. Running the same
command with ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
MALLOC_TOP_PAD_=1073741824`` (kept heap) measures what that costs (recorded under
``machine.environment``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("ase", "mmea", "mmea_base", "mace")


def _systems(n_systems: int, seed: int = 0) -> list:
    import ase.io

    from mmea_calc.base_format import embedded_base_dir
    from mmea_calc.build import water_box

    n_water = n_systems // 2
    water = [water_box(8, seed=seed + i) for i in range(n_water)]
    source = embedded_base_dir().parent / "data" / "aspirin_test.xyz"
    frames = ase.io.read(source, ":")
    molecules = []
    for i in range(n_systems - n_water):
        atoms = frames[i % len(frames)].copy()
        atoms.cell = [20.0, 20.0, 20.0]
        atoms.pbc = True
        atoms.center()
        molecules.append(atoms)
    return water + molecules


def _engines(dtype: str, names: tuple[str, ...] = ENGINES) -> dict:
    """``{name: step(atoms_list) -> None}`` for the engines asked for."""
    import torch
    import torch_sim as ts
    from mace.calculators.mace_torchsim import MaceTorchSimModel

    from mmea_calc import MMEACalculator
    from mmea_calc.serving import served_model
    from mmea_calc.torchsim import MMEAModel

    adapted = served_model("embedded", "embedded", dtype=dtype)
    steps = {}

    def batched(model):
        def step(atoms_list):
            state = ts.io.atoms_to_state(atoms_list, dtype=model.dtype, device=model.device)
            out = model(state)
            assert out["stress"].shape == (len(atoms_list), 3, 3)

        return step

    if "ase" in names:
        calc = MMEACalculator(adapted, select="auto")

        def ase_step(atoms_list):
            for atoms in atoms_list:
                calc.calculate(atoms, ["energy", "forces", "stress"])

        steps["ase"] = ase_step
    if "mmea" in names:
        steps["mmea"] = batched(MMEAModel(adapted, select="auto"))
    if "mmea_base" in names:
        steps["mmea_base"] = batched(MMEAModel(adapted, select=None))
    if "mace" in names:
        base = copy.deepcopy(adapted.base_model)
        steps["mace"] = batched(
            MaceTorchSimModel(base, device=torch.device("cpu"), dtype=adapted.dtype)
        )
    return steps


def _rattled(systems: list, rng) -> list:
    out = []
    for atoms in systems:
        atoms = atoms.copy()
        atoms.positions += rng.normal(scale=0.01, size=atoms.positions.shape)
        out.append(atoms)
    return out


def time_size(n_systems: int, dtype: str, rounds: int, warmup: int) -> dict:
    import numpy as np

    systems = _systems(n_systems)
    n_atoms = sum(len(a) for a in systems)
    steps = _engines(dtype)
    rng = np.random.default_rng(1)
    for _ in range(warmup):
        batch = _rattled(systems, rng)
        for step in steps.values():
            step(batch)
    times = {name: [] for name in steps}
    for r in range(rounds):
        batch = _rattled(systems, rng)
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            steps[name](batch)
            times[name].append(time.perf_counter() - start)

    def ratio(a: str, b: str) -> dict:
        values = [x / y for x, y in zip(times[a], times[b], strict=True)]
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        return {"median": statistics.median(values), "quartiles": [q[0], q[2]]}

    return {
        "n_systems": n_systems,
        "n_atoms": n_atoms,
        "dtype": dtype,
        "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
        "atom_steps_per_second": {k: n_atoms / statistics.median(v) for k, v in times.items()},
        "ase_over_mmea": ratio("ase", "mmea"),
        "mmea_base_over_mace": ratio("mmea_base", "mace"),
        "mmea_over_mace": ratio("mmea", "mace"),
        "times": times,
    }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def md_run(n_systems: int, dtype: str, steps: int) -> dict:
    """Whole MD runs: ``ts.integrate`` NVE of the batch (MMEAModel, auto) against ASE's
    VelocityVerlet over each system in turn (MMEACalculator, auto), ``steps`` steps of 0.5 fs
    from rest, after one warm-up step of each; both compute stress (TorchSim's model always
    does; the calculator computes it whenever the cell allows)."""
    import torch_sim as ts
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from mmea_calc import MMEACalculator
    from mmea_calc.serving import served_model
    from mmea_calc.torchsim import MMEAModel

    systems = _systems(n_systems)
    n_atoms = sum(len(a) for a in systems)
    adapted = served_model("embedded", "embedded", dtype=dtype)
    model = MMEAModel(adapted, select="auto")
    calc = MMEACalculator(adapted, select="auto")

    def torchsim(n: int) -> float:
        state = ts.io.atoms_to_state(systems, dtype=model.dtype)
        start = time.perf_counter()
        ts.integrate(system=state, model=model, integrator=ts.Integrator.nve, n_steps=n,
                     temperature=0.0, timestep=0.0005)  # fmt: skip
        return time.perf_counter() - start

    def ase_loop(n: int) -> float:
        start = time.perf_counter()
        for atoms in systems:
            atoms = atoms.copy()
            atoms.calc = calc
            VelocityVerlet(atoms, timestep=0.5 * units.fs).run(n)
        return time.perf_counter() - start

    torchsim(1), ase_loop(1)
    seconds = {"torchsim": torchsim(steps), "ase": ase_loop(steps)}
    return {
        "n_systems": n_systems,
        "n_atoms": n_atoms,
        "dtype": dtype,
        "steps": steps,
        "seconds": seconds,
        "atom_steps_per_second": {k: n_atoms * steps / v for k, v in seconds.items()},
        "ase_over_torchsim": seconds["ase"] / seconds["torchsim"],
    }


def memory_worker(engine: str, n_systems: int, dtype: str) -> None:
    """In its own process: the peak resident memory (MB) two steps of one engine add over the
    loaded models and systems (Linux: the peak is reset through /proc/self/clear_refs after
    loading, whose own peak — torch's libraries — would hide the steps'), printed as JSON."""
    import numpy as np

    systems = _systems(n_systems)
    step = _engines(dtype, (engine,))[engine]
    rng = np.random.default_rng(1)
    batches = [_rattled(systems, rng) for _ in range(2)]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    loaded = _status_kb("VmRSS")
    for batch in batches:
        step(batch)
    peak = _status_kb("VmHWM")
    print(json.dumps({"loaded_kb": loaded, "peak_kb": peak, "added_mb": (peak - loaded) / 1024}))


def memory(engine: str, n_systems: int, dtype: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--memory-worker", engine, str(n_systems), dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32,128", help="systems per batch")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--rounds", type=int, default=7, help="0: no per-step timing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-worker", nargs=3, metavar=("ENGINE", "N", "DTYPE"))
    parser.add_argument(
        "--md-steps", type=int, default=0, help="also time whole NVE runs of this many steps"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_worker:
        engine, n, dtype = args.memory_worker
        memory_worker(engine, int(n), dtype)
        return 0
    import torch_sim

    import mmea_calc

    results = {
        "command": "python benchmarks/torchsim_speed.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_sim": torch_sim.__version__,
            "mmea_calc": mmea_calc.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg(),
            "environment": {
                k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_"))
            },
        },
        "runs": [],
        "md_runs": [],
    }
    for dtype in args.dtypes.split(",") if args.rounds > 0 else ():
        for n in (int(s) for s in args.sizes.split(",")):
            row = time_size(n, dtype, args.rounds, args.warmup)
            if not args.no_memory:
                row["memory_added_mb"] = {e: memory(e, n, dtype)["added_mb"] for e in ENGINES}
            results["runs"].append(row)
            sec = row["seconds_per_step"]
            print(
                f"{dtype} {n:4d} systems ({row['n_atoms']} atoms): "
                + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in sec.items())
                + f"  ase/mmea {row['ase_over_mmea']['median']:.2f}"
                f"  mmea_base/mace {row['mmea_base_over_mace']['median']:.3f}"
                f"  mmea/mace {row['mmea_over_mace']['median']:.3f}",
                flush=True,
            )
    for dtype in args.dtypes.split(",") if args.md_steps else ():
        for n in (int(s) for s in args.sizes.split(",")):
            row = md_run(n, dtype, args.md_steps)
            results["md_runs"].append(row)
            print(
                f"MD {dtype} {n:4d} systems, {args.md_steps} NVE steps: ts.integrate "
                f"{row['seconds']['torchsim']:.1f} s, ASE loop {row['seconds']['ase']:.1f} s, "
                f"ase/torchsim {row['ase_over_torchsim']:.2f}",
                flush=True,
            )
    results["machine"]["load_after"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
