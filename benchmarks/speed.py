"""Inference cost of MMEA adapters, measured side by side with mace-torch's own calculator.

Base model: ``../shared/assets/models/mace-spice-small.model`` (skips with a message when absent).
Measures, in one process and interleaved so machine noise hits both sides alike:

* per-step time (energy + forces + stress) of MMEACalculator with a rank-16 adapter vs
  ``mace.calculators.MACECalculator`` on liquid-water boxes of ~30, ~200 and ~1000 atoms;
* forward+backward (energy and forces) of AdaptedModel vs the bare base on a ~100-atom box;
* adapter switch latency vs building a new MACECalculator from the file;
* ``calculate_batch`` over 64 small molecules and 2 adapters vs 64 single calls;
* memory per extra loaded adapter.

Usage::

    python benchmarks/speed.py --threads 2 --out benchmarks/results/speed.json \\
        --plot benchmarks/results/speed.png
    python benchmarks/speed.py --threads 1 --preset paper --out benchmarks/results/speed_paper.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "mace-spice-small.model"
WATER_VOLUME = 29.9  # Å^3 per H2O at 1 g/cm^3


def water_box(n_molecules: int, seed: int = 0):
    """``n_molecules`` randomly oriented H2O on a cubic grid at liquid density (periodic)."""
    from ase import Atoms
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    k = int(np.ceil(n_molecules ** (1 / 3)))
    side = (n_molecules * WATER_VOLUME) ** (1 / 3)
    spacing = side / k
    atoms = Atoms(cell=[side] * 3, pbc=True)
    sites = [(i, j, m) for i in range(k) for j in range(k) for m in range(k)]
    for index in rng.permutation(len(sites))[:n_molecules]:
        h2o = molecule("H2O")
        h2o.rotate(rng.uniform(0, 360), rng.normal(size=3))
        h2o.translate((np.asarray(sites[index]) + 0.5) * spacing)
        atoms += h2o
    atoms.wrap()
    return atoms


def small_molecules(n: int):
    """``n`` gas-phase molecules of H, C, N, O from ASE's g2 set (cycled, rattled)."""
    from ase.build import molecule
    from ase.collections import g2

    names = sorted(n for n in g2.names if set(molecule(n).symbols) <= {"H", "C", "N", "O"})
    out = []
    for i in range(n):
        atoms = molecule(names[i % len(names)])
        atoms.rattle(0.02, seed=i)
        out.append(atoms)
    return out


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def per_step(mmea, mace, atoms, repeats):
    """Per-step medians (s) of the two calculators on ``atoms``, and the per-pair ratios.

    A step is what an MD driver asks after moving the atoms: energy, forces and stress through
    ASE (``atoms.get_*``, so each calculator sees only a change of positions). Steps alternate
    between the calculators (who goes first alternates too), so each MMEA step has a MACE step
    next to it; the ratio of each adjacent pair cancels slow drifts in machine load, and the
    median and quartiles of those ratios are reported beside the ratio of medians.
    """
    rng = np.random.default_rng(0)
    probes = {}
    for calc in (mmea, mace):
        probes[id(calc)] = probe = atoms.copy()
        probe.calc = calc
    ours, theirs = [], []
    for i in range(repeats + 2):
        delta = rng.normal(scale=0.01, size=atoms.positions.shape)
        pair = [(mmea, ours), (mace, theirs)] if i % 2 == 0 else [(mace, theirs), (mmea, ours)]
        for calc, bucket in pair:
            probe = probes[id(calc)]
            probe.positions = atoms.positions + delta
            start = time.perf_counter()
            probe.get_potential_energy()
            probe.get_forces()
            probe.get_stress()
            if i >= 2:  # warm-up
                bucket.append(time.perf_counter() - start)
    ratios = np.asarray(ours) / np.asarray(theirs)
    return statistics.median(ours), statistics.median(theirs), ratios


def forward_backward(model, atoms, repeats):
    """Median time (s) of energy+forces of AdaptedModel with its adapter vs with none."""
    from mmea_calc.data import atoms_to_graph, collate

    data = collate([atoms_to_graph(atoms, model.base_info)], dtype=model.dtype)
    name = model.adapter_names[0]
    adapted, bare = [], []
    for i in range(repeats + 2):
        for which in (name, None) if i % 2 == 0 else (None, name):
            model.set_adapter(which)
            start = time.perf_counter()
            out = model(dict(data), compute_stress=False)
            out["forces"].sum().item()
            if i >= 2:
                (adapted if which else bare).append(time.perf_counter() - start)
    return statistics.median(adapted), statistics.median(bare)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def run(args) -> dict:
    import torch
    from mace.calculators import MACECalculator

    from mmea_calc import AdaptedModel, MMEACalculator, MMEAConfig, load_base
    from mmea_calc.testing import randomize_adapter
    from mmea_calc.train import calibrate_adapter

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="mmea-speed-"))
    model = AdaptedModel(load_base(MODEL, dtype="float64"))
    base_parameters = sum(p.numel() for p in model.base_model.parameters())  # before adapters
    for i, name in enumerate(("water", "organic")):
        model.add_adapter(name, MMEAConfig(rank=16, preset=args.preset))
        randomize_adapter(model, name, std=0.1, seed=i)
        # gate ranges as every fit records them: the step then pays for saturation, fade and
        # the extrapolation grade too
        calibrate_adapter(model, name, [water_box(10, seed=s) for s in range(3)])
        model.save_adapter(name, tmp / name)
    n_params = model.num_trainable_parameters("water")
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "adapter": {
            "rank": 16,
            "preset": args.preset,
            "trainable_parameters": n_params,
            "base_parameters": base_parameters,
        },
    }
    mmea = MMEACalculator(str(MODEL), adapters=[tmp / "water", tmp / "organic"], select="water")
    mace = MACECalculator(model_paths=str(MODEL), device="cpu", default_dtype="float64")

    rows = []
    for n_mol, repeats in (
        (10, args.repeats),
        (67, args.repeats),
        (333, max(args.repeats // 3, 5)),
    ):
        atoms = water_box(n_mol)
        ours, theirs, ratios = per_step(mmea, mace, atoms, repeats)
        q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
        rows.append(
            {
                "atoms": len(atoms),
                "mmea_ms": 1e3 * ours,
                "mace_ms": 1e3 * theirs,
                "ratio": ours / theirs,
                "pair_ratio_median": float(q2),
                "pair_ratio_quartiles": [float(q1), float(q3)],
                "repeats": repeats,
            }
        )
        print(
            f"per step {len(atoms):5d} atoms: MMEA {1e3 * ours:8.2f} ms, "
            f"MACE {1e3 * theirs:8.2f} ms, ratio {ours / theirs:.3f} "
            f"(pairs: median {q2:.3f}, quartiles {q1:.3f}-{q3:.3f})",
            file=sys.stderr,
        )
    results["per_step"] = rows

    fb_adapted, fb_bare = forward_backward(model, water_box(33), args.repeats)
    results["forward_backward_99_atoms"] = {
        "adapted_ms": 1e3 * fb_adapted,
        "bare_ms": 1e3 * fb_bare,
        "ratio": fb_adapted / fb_bare,
    }

    switch = _timed(lambda: (mmea.set_adapter("organic"), mmea.set_adapter("water")), 1000)
    build = _timed(
        lambda: MACECalculator(model_paths=str(MODEL), device="cpu", default_dtype="float64"), 5
    )
    results["switch"] = {
        "set_adapter_us": 1e6 * statistics.median(switch) / 2,
        "new_mace_calculator_ms": 1e3 * statistics.median(build),
    }
    results["switch"]["ratio"] = (results["switch"]["set_adapter_us"] / 1e3) / results["switch"][
        "new_mace_calculator_ms"
    ]

    molecules = small_molecules(64)
    for i, atoms in enumerate(molecules):
        atoms.info["mmea_adapter"] = ("water", "organic")[i % 2]
    auto = MMEACalculator(str(MODEL), adapters=[tmp / "water", tmp / "organic"])
    auto.calculate_batch(molecules[:4])  # warm-up
    batch_t, single_t = [], []
    for _ in range(args.batch_repeats):
        start = time.perf_counter()
        auto.calculate_batch(molecules)
        batch_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        for atoms in molecules:
            auto.calculate(atoms, ["energy", "forces"])
        single_t.append(time.perf_counter() - start)
    results["batch_64_molecules"] = {
        "atoms": sum(len(a) for a in molecules),
        "batch_s": statistics.median(batch_t),
        "single_s": statistics.median(single_t),
        "throughput_ratio": statistics.median(single_t) / statistics.median(batch_t),
    }

    extra = AdaptedModel(load_base(MODEL, dtype="float64"))
    before = _rss_mb()
    for i in range(20):
        extra.add_adapter(f"extra{i}", MMEAConfig(rank=16))
    results["memory"] = {
        "adapter_tensor_kib": n_params * 8 / 1024,
        "rss_per_adapter_kib": 1024 * (_rss_mb() - before) / 20,
        "base_tensor_kib": base_parameters * 8 / 1024,
    }
    return results


def plot(results: dict, path: Path) -> None:
    """Per-step time vs atoms for both calculators (log-log), with the ratio on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["per_step"]
    atoms = [row["atoms"] for row in rows]
    fig, (ax, ax_ratio) = plt.subplots(
        2, 1, figsize=(4.8, 4.8), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    ax.plot(atoms, [row["mace_ms"] for row in rows], "o-", label="MACECalculator (base)")
    ax.plot(atoms, [row["mmea_ms"] for row in rows], "s--", label="MMEACalculator (rank 16)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (E, F, stress)")
    ax.legend(fontsize=8)
    ax.set_title(f"liquid water, float64, {results['machine']['threads']} CPU threads", fontsize=9)
    if all("pair_ratio_median" in row for row in rows):
        mid = [row["pair_ratio_median"] for row in rows]
        low = [m - row["pair_ratio_quartiles"][0] for m, row in zip(mid, rows, strict=True)]
        high = [row["pair_ratio_quartiles"][1] - m for m, row in zip(mid, rows, strict=True)]
        ax_ratio.errorbar(atoms, mid, yerr=[low, high], fmt="k.-", capsize=3,
                          label="adjacent pairs: median, quartiles")  # fmt: skip
    else:
        ax_ratio.plot(atoms, [row["ratio"] for row in rows], "k.-", label="ratio of medians")
    ax_ratio.axhline(1.03, color="r", lw=0.8, ls=":", label="goals: 1.03 (30 atoms), 1.02")
    ax_ratio.axhline(1.02, color="r", lw=0.8, ls=":")
    ax_ratio.axhline(1.0, color="0.6", lw=0.8)
    ax_ratio.set_ylabel("MMEA / MACE")
    ax_ratio.set_xlabel("atoms")
    ax_ratio.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-repeats", type=int, default=5)
    parser.add_argument(
        "--preset", default="gates", choices=["gates", "paper"], help="the adapters' MMEA preset"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/speed.json"))
    parser.add_argument("--plot", default=None, help="PNG of per-step time vs atoms")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw --plot from the results in --out"
    )
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PATH")
        plot(json.loads(Path(args.out).read_text()), Path(args.plot))
        return 0
    if not MODEL.is_file():
        print(f"skipping: shared asset {MODEL} is absent", file=sys.stderr)
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # mace prints on stdout when building
        results = run(args)
    results["command"] = "python benchmarks/speed.py " + shlex.join(argv or sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, Path(args.plot))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
