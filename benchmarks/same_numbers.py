"""Do two versions of mmea_calc compute the same numbers? (issue 23: a speed-up must not change
results beyond float rounding.)

``--save FILE`` evaluates, with whichever ``mmea_calc`` is imported (point ``PYTHONPATH`` at
another checkout for the other version), the SPICE-small base (``../shared/assets``) with two
calibrated rank-16 adapters (random weights, std 0.1; one with the logit bound, one without) on
water boxes inside their ranges and scaled 0.8× / 1.5× far outside them, and on gas-phase
molecules: one adapter for all, mixed routes, per-atom routing and the frozen model, in float64
and float32; then trains a rank-16 adapter for three epochs on rMD17 aspirin (30 / 10 frames,
seed 0) and keeps its history. ``--compare A B`` prints and writes the largest absolute and
relative difference of every quantity.

Usage::

    PYTHONPATH=/path/to/old/checkout python benchmarks/same_numbers.py --save /tmp/old.npz
    python benchmarks/same_numbers.py --save /tmp/new.npz
    python benchmarks/same_numbers.py --compare /tmp/old.npz /tmp/new.npz \\
        --out benchmarks/results/same_numbers.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np


def _speed():
    name = "_bench_speed"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("speed.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def save(
    path: Path, molecule: str = "aspirin", train_frames: int = 30, valid_frames: int = 10
) -> dict:
    import torch

    from mmea_calc import AdaptedModel, MMEAConfig, load_base
    from mmea_calc.data import atoms_to_graph, collate
    from mmea_calc.selection import describe_environment
    from mmea_calc.testing import evaluate, randomize_adapter
    from mmea_calc.train import TrainConfig, calibrate_adapter, fit_adapter

    speed = _speed()
    torch.set_num_threads(1)
    out: dict[str, np.ndarray] = {}
    frames = {"water": [speed.water_box(10, seed=s) for s in range(3)]}
    frames["organic"] = speed.small_molecules(16)
    structures = [speed.water_box(10, seed=7), speed.water_box(12, seed=8)]
    for factor in (0.8, 1.5):  # far outside the ranges: saturation and fade at work
        box = speed.water_box(10, seed=9)
        box.set_cell(box.cell * factor, scale_atoms=True)
        structures.append(box)
    structures += speed.small_molecules(16)[:3]
    for dtype in ("float64", "float32"):
        model = AdaptedModel(load_base(speed.MODEL, dtype=dtype))
        for i, (name, data) in enumerate(frames.items()):
            model.add_adapter(name, MMEAConfig(rank=16, logit_bound=10.0 if i == 0 else None))
            randomize_adapter(model, name, std=0.1, seed=i)
            calibrate_adapter(model, name, data)
            model.set_adapter_environment(name, describe_environment(model, data))
        n = len(structures)
        routes = {"water": ["water"] * n, "organic": ["organic"] * n}
        routes["mixed"] = (["water", "organic", None] * n)[:n]
        results = {k: evaluate(model, structures, adapters=r, compute_stress=True)
                   for k, r in routes.items()}  # fmt: skip
        batch = collate([atoms_to_graph(a, model.base_info) for a in structures], model.dtype)
        model.route_per_atom(batch, ["water", "organic"])
        results["per-atom"] = model(batch, compute_stress=True, training=False)
        results["frozen"] = evaluate(model.freeze("water"), structures, compute_stress=True)
        for route, result in results.items():
            for key in ("energy", "forces", "stress", "adapter_extrapolation"):
                if result.get(key) is not None:
                    out[f"{dtype}/{route}/{key}"] = result[key].detach().double().numpy()
    train = speed.rmd17_frames(molecule, "train", train_frames)
    valid = speed.rmd17_frames(molecule, "valid", valid_frames)
    if train and valid:
        config = TrainConfig(rank=16, epochs=3, dtype="float64", seed=0)
        fit = fit_adapter(load_base(speed.MODEL), train, valid, config=config, name="same")
        for key in ("loss", "criterion", "best"):
            out[f"training/{key}"] = np.array([float(h[key]) for h in fit.history])
    np.savez(path, **out)
    return {"saved": str(path), "quantities": len(out)}


def compare(a: Path, b: Path) -> dict:
    first, second = np.load(a), np.load(b)
    if set(first.files) != set(second.files):
        raise SystemExit(
            f"the files hold different quantities: {set(first.files) ^ set(second.files)}"
        )
    rows = {}
    for key in sorted(first.files):
        diff = float(np.abs(first[key] - second[key]).max())
        scale = float(np.abs(first[key]).max())
        rows[key] = {"max_abs": diff, "max_rel": diff / scale if scale > 0 else diff}
        print(f"{key:40s} abs {diff:.2e}  rel {rows[key]['max_rel']:.2e}")
    return {"a": str(a), "b": str(b), "differences": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path)
    group.add_argument("--compare", type=Path, nargs=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON of the comparison")
    parser.add_argument("--molecule", default="aspirin", help="rMD17 molecule to train on")
    parser.add_argument("--train-frames", type=int, default=30)
    parser.add_argument("--valid-frames", type=int, default=10)
    args = parser.parse_args(argv)
    if args.save is not None:
        if not _speed().MODEL.exists():
            print(f"skipping: {_speed().MODEL} is absent (see ../shared/assets)", file=sys.stderr)
            return 0
        print(json.dumps(save(args.save, args.molecule, args.train_frames, args.valid_frames)))
        return 0
    result = compare(*args.compare)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
