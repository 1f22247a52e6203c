"""Inference cost of MMEA adapters, measured side by side with mace-torch's own calculator.

Base model: ``../shared/assets/models/mace-spice-small.model`` (skips with a message when absent).
Measures, in one process and interleaved so machine noise hits both sides alike, the parts named
by ``--parts`` (default ``spice,extras``, what this script always measured; ``all``: every part):

* ``spice``: per-step time (energy + forces + stress) of MMEACalculator with a calibrated
  rank-16 adapter vs ``mace.calculators.MACECalculator`` on liquid-water boxes of ~30, ~200 and
  ~1000 atoms (``--spice-molecules``), in each dtype of ``--dtypes``;
* ``foundation``: the same on a foundation-size ScaleShiftMACE built in-process with seeded
  random weights (:data:`FOUNDATION`: MACE-MP-0 / MACE-OFF23 "medium", H C N O): aspirin
  (21 atoms, the first rMD17 test frame in its 20 Å periodic box) and water boxes of 96 and 384
  atoms (``--foundation-systems``), with adapters calibrated on frames of the same kind;
* ``per-atom``: per-atom routing (``select="per-atom"``, two calibrated adapters with stored
  environments) vs a single adapter vs MACECalculator on a ~200-atom water box
  (``per_atom.step_times``: rounds with a rotating order);
* ``export``: the exported TorchScript model vs the exported bare base
  (``export_speed.run``, pair_mace's calling convention, ~200 atoms);
* ``training``: seconds per epoch of a short rank-16 fit (``fit_adapter``) on rMD17 aspirin;
* ``extras`` (float64): forward+backward of AdaptedModel vs the bare base on a ~100-atom box,
  adapter switch latency vs building a new MACECalculator from the file, ``calculate_batch``
  over 64 small molecules and 2 adapters vs 64 single calls, memory per extra loaded adapter.

Every per-step row carries its goal (issue 23: MMEA/MACE ≤ 1.03 at every size, ≤ 1.01 from 200
atoms), the median of the adjacent-pair ratios and the ratio of medians.

Usage::

    python benchmarks/speed.py --threads 2 --out benchmarks/results/speed.json \\
        --plot benchmarks/results/speed.png
    python benchmarks/speed.py --threads 1 --preset paper --out benchmarks/results/speed_paper.json
    python benchmarks/speed.py --threads 1 --dtypes float64,float32 \\
        --parts spice,per-atom,export,training,extras --out benchmarks/results/speed_23.json
    python benchmarks/speed.py --threads 1 --dtypes float64,float32 --parts foundation \\
        --out benchmarks/results/speed_23_foundation.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "assets" / "models" / "mace-spice-small.model"
RMD17 = ROOT.parent / "shared" / "assets" / "data" / "rmd17"
WATER_VOLUME = 29.9  # Å^3 per H2O at 1 g/cm^3
PARTS = ("spice", "foundation", "per-atom", "export", "training", "extras")
DEFAULT_PARTS = "spice,extras"
#: MACE-MP-0 / MACE-OFF23 "medium" (mace_run_train's defaults elsewhere: residual interaction
#: blocks, 5 polynomial cutoff functions, a 16x0e readout MLP), H C N O, r_max 5 Å as MACE-OFF23.
#: Weights are seeded random: a step's cost does not depend on them.
FOUNDATION = {
    "hidden_irreps": "128x0e+128x1o",
    "max_ell": 3,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "radial_MLP": [64, 64, 64],
    "correlation": 3,
    "num_interactions": 2,
    "interaction": "RealAgnosticResidualInteractionBlock",
    "interaction_first": "RealAgnosticResidualInteractionBlock",
    "MLP_irreps": "16x0e",
    "r_max": 5.0,
    "avg_num_neighbors": 20.0,
    "atomic_numbers": [1, 6, 7, 8],
}
BIG = 300  # atoms from which a size gets --big-repeats


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


def build_foundation(spec: dict | None = None, seed: int = 0):
    """A ScaleShiftMACE of :data:`FOUNDATION`'s architecture (float64, eval mode), weights seeded
    random, built under mace's default-dtype scope like ``mmea_calc.testing``'s tiny models;
    the global RNG is untouched."""
    import torch

    from mmea_calc._deps import mace, o3, torch_tools

    spec = dict(FOUNDATION if spec is None else spec)
    blocks = mace.modules.interaction_classes
    zs = [int(z) for z in spec["atomic_numbers"]]
    rng = np.random.default_rng(seed)
    kwargs = dict(
        r_max=float(spec["r_max"]),
        num_bessel=spec["num_bessel"],
        num_polynomial_cutoff=spec["num_polynomial_cutoff"],
        max_ell=spec["max_ell"],
        interaction_cls=blocks[spec["interaction"]],
        interaction_cls_first=blocks[spec["interaction_first"]],
        num_interactions=spec["num_interactions"],
        num_elements=len(zs),
        hidden_irreps=o3.Irreps(spec["hidden_irreps"]),
        MLP_irreps=o3.Irreps(spec["MLP_irreps"]),
        gate=torch.nn.functional.silu,
        atomic_energies=rng.uniform(-5.0, -1.0, size=len(zs)),
        avg_num_neighbors=float(spec["avg_num_neighbors"]),
        atomic_numbers=zs,
        correlation=spec["correlation"],
        radial_MLP=list(spec["radial_MLP"]),
    )
    with (
        torch.random.fork_rng(),
        torch_tools.default_dtype("float64"),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message="The TorchScript type system")
        torch.manual_seed(seed)
        model = mace.modules.ScaleShiftMACE(
            atomic_inter_scale=1.0, atomic_inter_shift=0.0, **kwargs
        )
    return model.eval()


def rmd17_frames(molecule: str, split: str, n: int | None = None) -> list:
    """The first ``n`` frames of ``RMD17/<molecule>/<split>.xyz`` (``[]`` when absent)."""
    import ase.io

    path = RMD17 / molecule / f"{split}.xyz"
    if not path.is_file():
        return []
    return ase.io.read(path, index=":" if n is None else f":{n}")


def boxed(atoms, side: float = 20.0):
    """``atoms`` in a periodic cubic box (as the rMD17 files store molecules) when not periodic,
    so that a step computes the stress as for the water boxes."""
    atoms = atoms.copy()
    if not atoms.pbc.all() or atoms.cell.rank < 3:
        atoms.set_cell([side] * 3)
        atoms.center()
        atoms.pbc = True
    return atoms


def _sibling(name: str):
    """``benchmarks/<name>.py`` as a module (registered under ``_bench_<name>``, as the tests
    load it), whether this file runs as a script or is imported."""
    module_name = f"_bench_{name}"
    if module_name not in sys.modules:
        path = Path(__file__).resolve().with_name(f"{name}.py")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield module
    finally:
        setattr(module, name, old)


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def per_step(mmea, mace, atoms, repeats, cpu: dict | None = None):
    """Per-step medians (s) of the two calculators on ``atoms``, and the per-pair ratios.

    A step is what an MD driver asks after moving the atoms: energy, forces and stress (when
    the cell is 3D) through ASE (``atoms.get_*``, so each calculator sees only a change of
    positions). Steps alternate between the calculators (who goes first alternates too), so
    each MMEA step has a MACE step next to it; the ratio of each adjacent pair cancels slow
    drifts in machine load, and the median and quartiles of those ratios are reported beside
    the ratio of medians. ``cpu`` (a dict), when given, receives each step's process CPU time
    under ``"mmea"`` and ``"mace"``: with one thread it is what the step computed, whatever
    other jobs took of the cores meanwhile.
    """
    rng = np.random.default_rng(0)
    stress = atoms.cell.rank == 3
    probes = {}
    for calc in (mmea, mace):
        probes[id(calc)] = probe = atoms.copy()
        probe.calc = calc
    ours, theirs = [], []
    cpu_times: dict[str, list[float]] = {"mmea": [], "mace": []}
    for i in range(repeats + 2):
        delta = rng.normal(scale=0.01, size=atoms.positions.shape)
        pair = [(mmea, ours), (mace, theirs)] if i % 2 == 0 else [(mace, theirs), (mmea, ours)]
        for calc, bucket in pair:
            probe = probes[id(calc)]
            probe.positions = atoms.positions + delta
            start, start_cpu = time.perf_counter(), time.process_time()
            probe.get_potential_energy()
            probe.get_forces()
            if stress:
                probe.get_stress()
            if i >= 2:  # warm-up
                bucket.append(time.perf_counter() - start)
                used = time.process_time() - start_cpu
                cpu_times["mmea" if calc is mmea else "mace"].append(used)
    if cpu is not None:
        cpu.update(cpu_times)
    ratios = np.asarray(ours) / np.asarray(theirs)
    return statistics.median(ours), statistics.median(theirs), ratios


def goal(n_atoms: int) -> float:
    """Issue 23's goal for MMEA/MACE per step: 1.03 at every size, 1.01 from 200 atoms."""
    return 1.01 if n_atoms >= 200 else 1.03


def step_row(mmea, mace, atoms, repeats, **labels) -> dict:
    """One per-step row (see :func:`per_step`), printed as it is measured: wall-clock times
    (what the goal is about), process CPU times beside them, and the load average before and
    after (the machine's other jobs)."""
    load_before = os.getloadavg()[0]
    cpu: dict[str, list[float]] = {}
    ours, theirs, ratios = per_step(mmea, mace, atoms, repeats, cpu=cpu)
    q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
    cpu_ratios = np.asarray(cpu["mmea"]) / np.asarray(cpu["mace"])
    c1, c2, c3 = np.percentile(cpu_ratios, [25, 50, 75])
    row = {
        **labels,
        "atoms": len(atoms),
        "mmea_ms": 1e3 * ours,
        "mace_ms": 1e3 * theirs,
        "ratio": ours / theirs,
        "pair_ratio_median": float(q2),
        "pair_ratio_quartiles": [float(q1), float(q3)],
        "repeats": repeats,
        "goal": goal(len(atoms)),
        "cpu": {
            "mmea_ms": 1e3 * statistics.median(cpu["mmea"]),
            "mace_ms": 1e3 * statistics.median(cpu["mace"]),
            "ratio": statistics.median(cpu["mmea"]) / statistics.median(cpu["mace"]),
            "pair_ratio_median": float(c2),
            "pair_ratio_quartiles": [float(c1), float(c3)],
        },
        "load_average": [load_before, os.getloadavg()[0]],
    }
    row["meets_goal"] = bool(row["pair_ratio_median"] <= row["goal"])
    tag = " ".join(str(v) for v in labels.values())
    print(
        f"per step {tag} {len(atoms):5d} atoms: MMEA {1e3 * ours:8.2f} ms, "
        f"MACE {1e3 * theirs:8.2f} ms, ratio {ours / theirs:.3f} "
        f"(pairs: median {q2:.3f}, quartiles {q1:.3f}-{q3:.3f}; goal {row['goal']}); "
        f"CPU time: ratio {row['cpu']['ratio']:.3f}, pairs median {c2:.3f} "
        f"({c1:.3f}-{c3:.3f}); load {load_before:.1f}-{row['load_average'][1]:.1f}",
        file=sys.stderr,
        flush=True,
    )
    return row


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


def _repeats(args, n_atoms: int) -> int:
    return args.big_repeats if n_atoms >= BIG else args.repeats


def _spice_adapters(args, tmp: Path):
    """The float64 AdaptedModel of the SPICE-small base with two calibrated rank-16 adapters,
    saved with their environments (for per-atom routing): ``water`` (water boxes) and
    ``organic`` (small gas-phase molecules)."""
    from mmea_calc import AdaptedModel, MMEAConfig, load_base
    from mmea_calc.selection import describe_environment
    from mmea_calc.testing import randomize_adapter
    from mmea_calc.train import calibrate_adapter

    model = AdaptedModel(load_base(MODEL, dtype="float64"))
    base_parameters = sum(p.numel() for p in model.base_model.parameters())  # before adapters
    frames = {
        "water": [water_box(10, seed=s) for s in range(3)],
        "organic": small_molecules(16),
    }
    for i, (name, structures) in enumerate(frames.items()):
        model.add_adapter(name, MMEAConfig(rank=16, preset=args.preset))
        randomize_adapter(model, name, std=args.adapter_std, seed=i)
        # gate ranges as every fit records them: the step then pays for saturation, fade and
        # the extrapolation grade too
        environment = describe_environment(model, structures)
        calibrate_adapter(model, name, structures)
        model.save_adapter(name, tmp / name, environment=environment)
    return model, base_parameters


def _spice(args, tmp: Path) -> list[dict]:
    from mace.calculators import MACECalculator

    from mmea_calc import MMEACalculator

    rows = []
    for dtype in args.dtypes:
        mmea = MMEACalculator(
            str(MODEL), adapters=[tmp / "water", tmp / "organic"], select="water",
            default_dtype=dtype,
        )  # fmt: skip
        mace = MACECalculator(model_paths=str(MODEL), device="cpu", default_dtype=dtype)
        for n_mol in args.spice_molecules:
            atoms = water_box(n_mol)
            repeats = _repeats(args, len(atoms))
            rows.append(
                step_row(mmea, mace, atoms, repeats, model="spice-small", dtype=dtype,
                         system="water")
            )  # fmt: skip
    return rows


def _foundation_systems(args) -> list[tuple[str, object]]:
    systems = []
    for token in args.foundation_systems:
        if token == "aspirin":
            frames = rmd17_frames(args.molecule, "test", 1)
            if not frames:
                print(f"skipping aspirin: {RMD17 / args.molecule} is absent", file=sys.stderr)
                continue
            systems.append(("aspirin", boxed(frames[0])))
        else:
            systems.append(("water", water_box(int(token))))
    return systems


def _foundation(args, tmp: Path) -> dict:
    """Per-step rows of the foundation-size model, its adapters' sizes and the build time."""
    from mace.calculators import MACECalculator

    from mmea_calc import AdaptedModel, MMEACalculator, MMEAConfig
    from mmea_calc.testing import randomize_adapter
    from mmea_calc.train import calibrate_adapter

    tic = time.perf_counter()
    base = build_foundation()
    build_s = time.perf_counter() - tic
    model = AdaptedModel(copy.deepcopy(base))
    calibration = {"water": [water_box(10, seed=s) for s in range(3)]}
    aspirin = rmd17_frames(args.molecule, "train", 5)
    if aspirin:
        calibration["aspirin"] = [boxed(a) for a in aspirin]
    for i, (name, structures) in enumerate(calibration.items()):
        model.add_adapter(name, MMEAConfig(rank=16, preset=args.preset))
        randomize_adapter(model, name, std=args.adapter_std, seed=10 + i)
        calibrate_adapter(model, name, structures)
        model.save_adapter(name, tmp / "foundation" / name)
    info = {
        "architecture": FOUNDATION,
        "build_s": build_s,
        "base_parameters": sum(p.numel() for p in base.parameters()),
        "adapter": {
            "rank": 16,
            "preset": args.preset,
            "std": args.adapter_std,
            "targets": len(model.adapter_targets("water")),
            "trainable_parameters": model.num_trainable_parameters("water"),
            "calibrated_on": {k: len(v) for k, v in calibration.items()},
        },
    }
    systems = _foundation_systems(args)
    rows = []
    for dtype in args.dtypes:
        mmea = MMEACalculator(
            copy.deepcopy(base), adapters={n: tmp / "foundation" / n for n in calibration},
            select="water", default_dtype=dtype,
        )  # fmt: skip
        mace = MACECalculator(models=copy.deepcopy(base), device="cpu", default_dtype=dtype)
        for system, atoms in systems:
            mmea.set_adapter(system)
            repeats = _repeats(args, len(atoms))
            rows.append(
                step_row(mmea, mace, atoms, repeats, model="foundation", dtype=dtype,
                         system=system)
            )  # fmt: skip
    info["per_step"] = rows
    return info


def _per_atom(args, tmp: Path) -> dict:
    """Per-atom routing vs the single ``water`` adapter vs MACECalculator, ~200-atom box."""
    from mace.calculators import MACECalculator

    from mmea_calc import MMEACalculator

    step_times = _sibling("per_atom").step_times
    atoms = water_box(args.per_atom_molecules)
    out = {}
    for dtype in args.dtypes:
        adapters = [tmp / "water", tmp / "organic"]
        calcs = {
            "single": MMEACalculator(str(MODEL), adapters=adapters, select="water",
                                     default_dtype=dtype),
            "per-atom": MMEACalculator(str(MODEL), adapters=adapters, select="per-atom",
                                       default_dtype=dtype),
            "mace": MACECalculator(model_paths=str(MODEL), device="cpu", default_dtype=dtype),
        }  # fmt: skip
        row = step_times(calcs, atoms, _repeats(args, len(atoms)), reference="single")
        probe = atoms.copy()
        probe.calc = calcs["per-atom"]
        probe.get_potential_energy()
        weights = np.asarray(probe.calc.results["adapter_weights"])
        row["mean_adapter_weights"] = dict(
            zip(calcs["per-atom"].adapter_names, weights.mean(axis=0).tolist(), strict=True)
        )
        out[dtype] = row
        per = row["calculators"]["per-atom"]
        print(
            f"per-atom {dtype} {len(atoms)} atoms: per-atom {per['median_ms']:.1f} ms, single "
            f"{row['calculators']['single']['median_ms']:.1f} ms, MACE "
            f"{row['calculators']['mace']['median_ms']:.1f} ms; per-atom/single pairs median "
            f"{per['ratio_median']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return out


def _export(args) -> dict:
    """``export_speed.run`` on this base, per dtype (exported adapted file vs exported base)."""
    export_speed = _sibling("export_speed")
    out = {}
    with _patched(export_speed, "MODEL", MODEL):
        for dtype in args.dtypes:
            ns = argparse.Namespace(
                threads=args.threads,
                molecules=[args.export_molecules],
                repeats=[args.export_repeats],
                warmup=args.export_warmup,
                dtype=dtype,
            )
            out[dtype] = export_speed.run(ns)
    return out


def _training(args) -> dict:
    """Seconds per epoch of a short rank-16 fit on rMD17 ``--molecule`` (SPICE-small base)."""
    from mmea_calc import load_base
    from mmea_calc.train import TrainConfig, fit_adapter

    train = rmd17_frames(args.molecule, "train", args.train_frames)
    valid = rmd17_frames(args.molecule, "valid", args.valid_frames)
    if not train or not valid:
        print(f"skipping training: {RMD17 / args.molecule} is absent", file=sys.stderr)
        return {}
    out = {"molecule": args.molecule, "n_train": len(train), "n_valid": len(valid)}
    for dtype in args.dtypes:
        config = TrainConfig(rank=16, epochs=args.train_epochs, dtype=dtype, preset=args.preset)
        tic = time.perf_counter()
        result = fit_adapter(load_base(MODEL), train, valid, config=config, name="bench")
        seconds = [float(h["seconds"]) for h in result.history]
        out[dtype] = {
            "epochs": result.epochs_completed,
            "batch_size": config.batch_size,
            "seconds_per_epoch": seconds,
            "mean_s_per_epoch": float(np.mean(seconds)),
            "mean_s_per_epoch_after_first": float(np.mean(seconds[1:])) if seconds[1:] else None,
            "wall_s": time.perf_counter() - tic,
        }
        print(
            f"training {dtype}: s/epoch {[round(x, 2) for x in seconds]}",
            file=sys.stderr,
            flush=True,
        )
    return out


def _extras(args, model, tmp: Path, base_parameters: int) -> dict:
    from mace.calculators import MACECalculator

    from mmea_calc import AdaptedModel, MMEACalculator, MMEAConfig, load_base

    results: dict = {}
    mmea = MMEACalculator(str(MODEL), adapters=[tmp / "water", tmp / "organic"], select="water")
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
    n_params = model.num_trainable_parameters("water")
    results["memory"] = {
        "adapter_tensor_kib": n_params * 8 / 1024,
        "rss_per_adapter_kib": 1024 * (_rss_mb() - before) / 20,
        "base_tensor_kib": base_parameters * 8 / 1024,
    }
    return results


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="mmea-speed-"))
    parts = args.parts
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            # which mmea_calc ran (before/after runs point PYTHONPATH at another checkout)
            "mmea_calc": _code_version(),
            "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        },
        "setup": {
            "parts": list(parts),
            "dtypes": list(args.dtypes),
            "repeats": args.repeats,
            "big_repeats": args.big_repeats,
            "big_from_atoms": BIG,
            "goal": "MMEA/MACE per step <= 1.03 at every size, <= 1.01 from 200 atoms",
        },
    }
    timings: dict[str, float] = {}
    model = None
    if {"spice", "per-atom", "extras"} & set(parts):
        model, base_parameters = _spice_adapters(args, tmp)
        results["adapter"] = {
            "rank": 16,
            "preset": args.preset,
            "trainable_parameters": model.num_trainable_parameters("water"),
            "base_parameters": base_parameters,
            "targets": len(model.adapter_targets("water")),
            "std": args.adapter_std,
        }
    results["per_step"] = []
    for part in parts:
        tic = time.perf_counter()
        if part == "spice":
            results["per_step"] += _spice(args, tmp)
        elif part == "foundation":
            foundation = _foundation(args, tmp)
            results["per_step"] += foundation.pop("per_step")
            results["foundation"] = foundation
        elif part == "per-atom":
            results["per_atom"] = _per_atom(args, tmp)
        elif part == "export":
            results["export"] = _export(args)
        elif part == "training":
            results["training"] = _training(args)
        elif part == "extras":
            results.update(_extras(args, model, tmp, base_parameters))
        timings[part] = round(time.perf_counter() - tic, 1)
    results["seconds"] = timings
    return results


def _code_version() -> dict:
    """Where the imported ``mmea_calc`` lives and its git commit (``None`` outside a checkout)."""
    import subprocess

    import mmea_calc

    where = Path(mmea_calc.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, ""
    return {"path": str(where), "commit": commit, "modified": bool(dirty)}


def _group(row: dict) -> tuple[str, str]:
    """(model, dtype) of a per-step row; rows of files before issue 23 are SPICE-small float64."""
    return row.get("model", "spice-small"), row.get("dtype", "float64")


def plot(results: dict, path: Path) -> None:
    """Per-step time vs atoms for both calculators (log-log), one colour per model and dtype,
    with the ratio on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for row in results["per_step"]:
        groups.setdefault(_group(row), []).append(row)
    fig, (ax, ax_ratio) = plt.subplots(
        2, 1, figsize=(4.8, 4.8 + 0.4 * (len(groups) - 1)), sharex=True,
        gridspec_kw={"height_ratios": [3, 1.3]},
    )  # fmt: skip
    single = len(groups) == 1
    for index, ((model, dtype), rows) in enumerate(groups.items()):
        color = f"C{index}"
        tag = "" if single else f" {model} {dtype}"
        atoms = [row["atoms"] for row in rows]
        ax.plot(atoms, [row["mace_ms"] for row in rows], "o-", color="C0" if single else color,
                label=f"MACECalculator (base){tag}")  # fmt: skip
        ax.plot(atoms, [row["mmea_ms"] for row in rows], "s--", color="C1" if single else color,
                label=f"MMEACalculator (rank 16){tag}")  # fmt: skip
        color = "k" if single else color
        if all("pair_ratio_median" in row for row in rows):
            mid = [row["pair_ratio_median"] for row in rows]
            low = [m - row["pair_ratio_quartiles"][0] for m, row in zip(mid, rows, strict=True)]
            high = [row["pair_ratio_quartiles"][1] - m for m, row in zip(mid, rows, strict=True)]
            ax_ratio.errorbar(atoms, mid, yerr=[low, high], fmt=".-", color=color, capsize=3,
                              label="adjacent pairs: median, quartiles" + tag)  # fmt: skip
        else:
            ax_ratio.plot(atoms, [row["ratio"] for row in rows], ".-", color=color,
                          label="ratio of medians" + tag)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (E, F, stress)")
    ax.legend(fontsize=6 if not single else 8)
    if single:
        model, dtype = next(iter(groups))
        title = f"liquid water, {model}, {dtype}, {results['machine']['threads']} CPU threads"
    else:
        title = f"{results['machine']['threads']} CPU threads"
    ax.set_title(title, fontsize=9)
    ax_ratio.axhline(1.03, color="r", lw=0.8, ls=":", label="goals: 1.03, 1.01 from 200 atoms")
    ax_ratio.axhline(1.01, color="r", lw=0.8, ls=":")
    ax_ratio.axhline(1.0, color="0.6", lw=0.8)
    ax_ratio.set_ylabel("MMEA / MACE")
    ax_ratio.set_xlabel("atoms")
    ax_ratio.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _names(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(valid)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; valid: {', '.join(valid)}")
    return [n for n in valid if n in names]  # canonical order, no duplicates


def _system(token: str) -> str:
    if token != "aspirin" and not (token.isdigit() and int(token) > 0):
        raise argparse.ArgumentTypeError(f"{token!r}: 'aspirin' or a number of water molecules")
    return token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=30, help="timed step pairs per size (below --big sizes)"
    )
    parser.add_argument(
        "--big-repeats", type=int, default=None,
        help=f"timed step pairs from {BIG} atoms (default: max(repeats // 3, 5))",
    )  # fmt: skip
    parser.add_argument("--batch-repeats", type=int, default=5)
    parser.add_argument(
        "--adapter-std", type=float, default=0.05,
        help="std of the random adapter tensors before calibration (export_speed: 0.05)",
    )  # fmt: skip
    parser.add_argument(
        "--preset", default="gates", choices=["gates", "paper"], help="the adapters' MMEA preset"
    )
    parser.add_argument(
        "--parts", default=DEFAULT_PARTS, type=lambda t: _names(t, PARTS, "parts"),
        help=f"comma-separated, of {', '.join(PARTS)} or 'all' (default {DEFAULT_PARTS})",
    )  # fmt: skip
    parser.add_argument(
        "--dtypes", "--dtype", default=["float64"],
        type=lambda t: _names(t, ("float64", "float32"), "dtypes"),
        help="comma-separated: float64, float32 (both calculators; default float64)",
    )  # fmt: skip
    parser.add_argument(
        "--spice-molecules", type=int, nargs="+", default=[10, 67, 333],
        help="water molecules per SPICE-small box (default: 30, 201, 999 atoms)",
    )  # fmt: skip
    parser.add_argument(
        "--foundation-systems", type=_system, nargs="+", default=["aspirin", "32", "128"],
        help="'aspirin' (rMD17 --molecule) or water molecules per box (default: 21, 96, 384 "
        "atoms)",
    )  # fmt: skip
    parser.add_argument(
        "--molecule", default="aspirin", help="rMD17 molecule for foundation and training"
    )
    parser.add_argument("--per-atom-molecules", type=int, default=67, help="201 atoms")
    parser.add_argument("--export-molecules", type=int, default=67, help="201 atoms")
    parser.add_argument("--export-repeats", type=int, default=30)
    parser.add_argument("--export-warmup", type=int, default=3)
    parser.add_argument("--train-frames", type=int, default=50)
    parser.add_argument("--valid-frames", type=int, default=10)
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/speed.json"))
    parser.add_argument("--plot", default=None, help="PNG of per-step time vs atoms")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw --plot from the results in --out"
    )
    args = parser.parse_args(argv)
    if args.big_repeats is None:
        args.big_repeats = max(args.repeats // 3, 5)
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
    if args.plot and results["per_step"]:
        plot(results, Path(args.plot))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
