"""Per-step cost of an exported adapted model under LAMMPS' calling convention vs the bare base.

Base model: ``../shared/assets/models/mace-spice-small.model`` (skips with a message when absent).
Both files go through the same path, mace's ``LAMMPS_MACE`` + ``e3nn.util.jit.compile`` +
``torch.jit.save``/``torch.jit.load`` (what ``pair_style mace`` loads): the base as is, the
adapted model as :meth:`mmea_calc.AdaptedModel.freeze` with a rank-16 randomised adapter
(std 0.05) baked in. A step is what pair_mace asks per MD step: energy of the local atoms,
forces and virials (``model(data, local_or_ghost, True)``) on a periodic water box, with the
neighbour list built once outside the timing (LAMMPS builds its own). Steps alternate between
the two models; the median of the per-pair ratios cancels slow drifts in machine load.

Usage::

    python benchmarks/export_speed.py --threads 1 --out benchmarks/results/export_speed.json
"""

from __future__ import annotations

import argparse
import io
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


def lammps_data(atoms, info, dtype):
    """The dict pair_mace builds (no_domain_decomposition: periodic shifts, no ghost nodes)."""
    import torch

    from mmea_calc.data import atoms_to_graph, collate

    graph = collate([atoms_to_graph(atoms, info)], dtype=dtype)
    keys = ("batch", "cell", "edge_index", "node_attrs", "positions", "ptr", "shifts")
    data = {key: graph[key] for key in keys}
    data["unit_shifts"] = graph["unit_shifts"]
    data["cell"] = data["cell"].reshape(3, 3)
    local = torch.ones(len(atoms), dtype=torch.bool)
    return data, local


def step(module, data, local):
    """One pair_mace call on a fresh dict (the model writes displaced positions into it)."""
    fresh = dict(data)
    fresh["positions"] = data["positions"].clone()
    return module(fresh, local, True)


def reload(module):
    import torch

    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def build_models(args):
    """(adapted AdaptedModel, exported adapted file, exported base file), both reloaded."""
    import torch

    from mmea_calc import AdaptedModel, MMEAConfig, load_base
    from mmea_calc.build import water_box
    from mmea_calc.export import export_lammps, lammps_module
    from mmea_calc.testing import randomize_adapter
    from mmea_calc.train import calibrate_adapter

    base = load_base(MODEL, dtype=args.dtype)
    model = AdaptedModel(base)
    model.add_adapter("bench", MMEAConfig(rank=16))
    randomize_adapter(model, "bench", std=0.05, seed=0)
    # gate ranges as every fit records them (the file then saturates and fades like Python)
    calibrate_adapter(model, "bench", [water_box(10, seed=s) for s in range(3)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapted.pt"
        export_lammps(model, "bench", path, dtype=args.dtype)
        adapted = torch.jit.load(str(path))
    return model, adapted, reload(lammps_module(base, dtype=args.dtype))


def check(model, adapted, atoms, data, local):
    """|E, F| differences of the exported file vs MMEACalculator (a correctness sanity check)."""
    from mmea_calc.calculator import MMEACalculator

    ref = atoms.copy()
    ref.calc = MMEACalculator(model, select="bench")
    out = step(adapted, data, local)
    energy = float(out["total_energy_local"][0].detach())
    return {
        "energy_abs_diff_eV": abs(energy - ref.get_potential_energy()),
        "forces_max_abs_diff_eV_per_A": float(
            np.abs(out["forces"].detach().numpy() - ref.get_forces()).max()
        ),
    }


def per_step(adapted, base, data, local, repeats, warmup):
    for _ in range(warmup):
        step(adapted, data, local)
        step(base, data, local)
    ours, theirs = [], []
    for i in range(repeats):
        pair = [(adapted, ours), (base, theirs)]
        for module, times in pair if i % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            step(module, data, local)
            times.append(time.perf_counter() - start)
    ratios = np.asarray(ours) / np.asarray(theirs)
    q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
    return {
        "adapted_ms": 1e3 * statistics.median(ours),
        "base_ms": 1e3 * statistics.median(theirs),
        "ratio": statistics.median(ours) / statistics.median(theirs),
        "pair_ratio_median": float(q2),
        "pair_ratio_quartiles": [float(q1), float(q3)],
        "repeats": repeats,
    }


def run(args) -> dict:
    import torch

    from mmea_calc.build import water_box

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, adapted, base = build_models(args)
    results = {
        "machine": {
            "cpu": platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "base": {"file": MODEL.name, "fingerprint": model.fingerprint, "dtype": args.dtype},
        "adapter": {
            "rank": 16,
            "std": 0.05,
            "targets": len(model.adapter_targets("bench")),
            "parameters": model.num_trainable_parameters("bench"),
        },
        "per_step": [],
    }
    for n_molecules, repeats in zip(args.molecules, args.repeats, strict=True):
        atoms = water_box(n_molecules, seed=0)
        data, local = lammps_data(atoms, model.base_info, dtype)
        row = {"atoms": len(atoms), "edges": int(data["edge_index"].shape[1])}
        row.update(check(model, adapted, atoms, data, local))
        row.update(per_step(adapted, base, data, local, repeats, args.warmup))
        results["per_step"].append(row)
        print(
            f"{len(atoms):5d} atoms: adapted {row['adapted_ms']:8.1f} ms, base "
            f"{row['base_ms']:8.1f} ms, ratio {row['ratio']:.3f} (pairs: median "
            f"{row['pair_ratio_median']:.3f}, quartiles {row['pair_ratio_quartiles'][0]:.3f}-"
            f"{row['pair_ratio_quartiles'][1]:.3f}); |dE| vs calculator "
            f"{row['energy_abs_diff_eV']:.1e} eV",
            flush=True,
        )
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--molecules", type=int, nargs="+", default=[67, 333])
    parser.add_argument("--repeats", type=int, nargs="+", default=[30, 10])
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args(argv)
    if len(args.repeats) != len(args.molecules):
        parser.error("give one --repeats value per --molecules value")
    if not MODEL.is_file():
        print(
            f"skipped: base model {MODEL} is absent (only on the project's machines)",
            file=sys.stderr,
        )
        return 0
    results = run(args)
    given = sys.argv[1:] if argv is None else list(argv)
    results["command"] = shlex.join(["python", "benchmarks/export_speed.py", *given])
    if args.out:
        from mmea_calc.files import atomic_write_json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
