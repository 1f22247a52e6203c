"""Data-parallel fine-tuning on these CPUs: 1 process x 2 threads vs 2 ranks x 1 thread.

Both train the same adapter on the same global batches (per-rank batch ``--batch-size``, the
single process ``2 x`` that), ``mmea-calc finetune`` as a user runs it: the single process with
``OMP_NUM_THREADS=2``, the two ranks under ``torchrun --standalone --nproc_per_node 2`` with
one thread each. Recorded per dataset: the median seconds per epoch (training + validation, from
``training.json``), the wall time of the whole command, the peak resident memory of the largest
process (per rank for torchrun), and that both runs end with the same adapter (largest relative
tensor difference).

Datasets:

* ``aspirin``: rMD17 aspirin, 100 train / 50 valid frames, base ``mace-spice-small`` (from
  ``../shared``; skipped with a message when absent);
* ``water``: ``--water-structures`` periodic boxes of 8 H2O (24 atoms) at liquid density with
  random orientations and a 0.1 Å rattle, labelled by the package's embedded base with its
  ``water`` adapter (the timing does not depend on where labels come from), base: the embedded
  base. 10 % validation.

* memory: what one rank holds for a ``--memory-structures`` set of those water boxes (every
  rank holds every training graph): the resident memory added by building their labelled graphs
  (zero labels: the size does not depend on the values).

Usage::

    python benchmarks/distributed.py --epochs 3 --out benchmarks/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "models" / "mace-spice-small.model"
ASPIRIN = SHARED / "data" / "rmd17" / "aspirin"

#: runs a command and prints its children's peak RSS (kB) as the last line
PEAK = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def _water_set(path: Path, count: int, seed: int = 0) -> None:
    import ase.io
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import water_box

    from mmea_calc import MMEACalculator

    calc = MMEACalculator("embedded", adapters="embedded", select="water")
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        atoms = water_box(8, seed=seed + i)
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        atoms.calc = calc
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.info["REF_stress"] = atoms.get_stress()
        atoms.calc = None
        frames.append(atoms)
    ase.io.write(path, frames)


def _graph_memory(count: int) -> dict:
    """Resident memory (MB) added by the labelled graphs of ``count`` 24-atom water boxes."""
    import resource

    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import water_box

    from mmea_calc.base import load_base
    from mmea_calc.data import label_structures, labelled_graphs
    from mmea_calc.identity import base_info

    info = base_info(load_base("embedded"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    graphs = []
    for start in range(0, count, 500):  # labelled copies are dropped as we go
        frames = []
        for i in range(start, min(count, start + 500)):
            atoms = water_box(8, seed=i)
            atoms.info["REF_energy"] = 0.0
            atoms.arrays["REF_forces"] = np.zeros((len(atoms), 3))
            frames.append(atoms)
        graphs += labelled_graphs(label_structures(frames), info)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "structures": count,
        "atoms_each": 24,
        "edges_total": int(sum(g.edge_index.shape[1] for g in graphs)),
        "peak_rss_added_mb": (after - before) / 1024,
        "build_seconds": time.perf_counter() - began,
    }


def _run(args: list[str], env: dict, out: Path) -> dict:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK, *args], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed:\n{done.stderr[-3000:]}")
    training = json.loads((out / "training.json").read_text())
    epochs = [h["seconds"] for h in training["history"]]
    return {
        "seconds_per_epoch_median": statistics.median(epochs),
        "seconds_per_epoch": epochs,
        "wall_seconds": wall,
        "peak_rss_mb_largest_process": int(done.stdout.strip().splitlines()[-1]) / 1024,
        "valid_forces_mae_meV_per_A": training["metrics"]["valid"]["forces_mae_meV_per_A"],
        "loss_per_epoch": [h["loss"] for h in training["history"]],
    }


def _max_relative_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return max(float((ta[k] - tb[k]).abs().max() / ta[k].abs().max().clamp_min(1e-12)) for k in ta)


def _compare(name: str, base: str, train: str, valid: str | None, args, work: Path) -> dict:
    common = ["finetune", "--base", base, "--train", train, "--rank", str(args.rank)]
    common += ["--epochs", str(args.epochs), "--seed", "0"]
    if valid:
        common += ["--valid", valid]
    single_out, ddp_out = work / f"{name}-single", work / f"{name}-ddp"
    cli = [sys.executable, "-m", "mmea_calc.cli"]
    single = cli + common + ["--batch-size", str(2 * args.batch_size), "--out", str(single_out)]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp += ["-m", "mmea_calc.cli", *common, "--batch-size", str(args.batch_size)]
    ddp += ["--out", str(ddp_out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = {
        "1 process x 2 threads": _run(single, {**env, "OMP_NUM_THREADS": "2"}, single_out),
        "2 ranks x 1 thread": _run(ddp, {**env, "OMP_NUM_THREADS": "1"}, ddp_out),
    }
    a, b = rows.values()
    return {
        **rows,
        "epoch_time_ratio_2ranks_over_1process": (
            b["seconds_per_epoch_median"] / a["seconds_per_epoch_median"]
        ),
        "adapter_max_relative_difference": _max_relative_difference(single_out, ddp_out),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=5, help="per rank")
    parser.add_argument("--water-structures", type=int, default=1000)
    parser.add_argument("--datasets", default="aspirin,water")
    parser.add_argument("--memory-structures", type=int, default=10000, help="0: skip")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/distributed.json"))
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    results: dict = {
        "command": "python benchmarks/distributed.py " + shlex.join(argv or sys.argv[1:]),
        "setup": {"epochs": args.epochs, "rank": args.rank, "batch_size_per_rank": args.batch_size},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "aspirin" in datasets:
            if not MODEL.is_file():
                print(f"skipping aspirin: {MODEL} is absent", file=sys.stderr)
            else:
                results["aspirin"] = _compare(
                    "aspirin", str(MODEL), str(ASPIRIN / "train.xyz"),
                    str(ASPIRIN / "valid.xyz"), args, work,
                )  # fmt: skip
        if "water" in datasets:
            water = work / "water.xyz"
            _water_set(water, args.water_structures)
            base = str(ROOT / "mmea_calc" / "embedded" / "base")
            results["water"] = _compare("water", base, str(water), None, args, work)
            results["water"]["structures"] = args.water_structures
    if args.memory_structures:
        results["graph_memory_per_rank"] = _graph_memory(args.memory_structures)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
