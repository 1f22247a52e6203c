"""MMEA vs LoRA vs full fine-tuning of mace-spice-small on rMD17 aspirin, one trainer for all.

Reads ``../shared/assets`` relative to the repository root (skips with a message when absent):
``models/mace-spice-small.model`` and ``data/rmd17/aspirin/{train,valid,test}.xyz`` (100/50/1000,
keys ``REF_energy``/``REF_forces``). Every method gets the same data, loss, E0 refit, schedule,
epochs and seed. Writes one JSON file with test MAE/RMSE of energy (meV/atom) and forces
(meV/Å), trainable parameter counts and seconds per epoch; results are written after each method
so a partial run still leaves numbers.

Usage::

    python benchmarks/aspirin_methods.py --epochs 30 --threads 2 \\
        --out benchmarks/results/aspirin_methods.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "models" / "mace-spice-small.model"
DATA = SHARED / "data" / "rmd17" / "aspirin"
METHODS = {
    "mmea-r16": ("mmea", 16),
    "lora-r4": ("lora", 4),
    "lora-r16": ("lora", 16),
    "full": ("full", 16),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-test", type=int, default=None, help="first N test structures")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/aspirin_methods.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    missing = [p for p in (MODEL, DATA / "train.xyz") if not p.exists()]
    if missing:
        print(f"skipping: shared assets absent ({missing[0]})", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # mace prints on stdout when building
        from mmea_calc import load_base
        from mmea_calc.data import labelled_graphs, read_structures, reference_values
        from mmea_calc.train import TrainConfig, error_metrics, fit_adapter, predict

    base = load_base(MODEL, dtype="float64")
    info = {"atomic_numbers": [int(z) for z in base.atomic_numbers], "r_max": float(base.r_max)}
    info["heads"] = list(getattr(base, "heads", ["Default"]))
    train = read_structures(DATA / "train.xyz", atomic_numbers=info["atomic_numbers"])
    valid = read_structures(DATA / "valid.xyz", atomic_numbers=info["atomic_numbers"])
    test = read_structures(DATA / "test.xyz", atomic_numbers=info["atomic_numbers"])
    test = test[: args.n_test] if args.n_test else test
    test_graphs, test_ref = labelled_graphs(test, info), reference_values(test)

    def test_metrics(module: torch.nn.Module) -> dict:
        return error_metrics(predict(module, test_graphs, batch_size=32), test_ref)

    results = {
        "setup": {
            "model": MODEL.name,
            "data": f"rmd17/aspirin train 100 / valid 50 / test {len(test)}",
            "epochs": args.epochs,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "config": TrainConfig(epochs=args.epochs).to_dict(),
        },
        "methods": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results["methods"]["base"] = {"trainable_parameters": 0, "test": test_metrics(base)}
    print("base", results["methods"]["base"], file=sys.stderr)
    for label in args.methods.split(","):
        method, rank = METHODS[label]
        config = TrainConfig(method=method, rank=rank, epochs=args.epochs, patience=None)
        tic = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            result = fit_adapter(MODEL, train, valid, config, name=label.replace(".", "_"))
        fit_seconds = time.perf_counter() - tic
        results["methods"][label] = {
            "method": method,
            "rank": rank if method != "full" else None,
            "trainable_parameters": result.trainable_parameters,
            "seconds_per_epoch": result.seconds_per_epoch,
            "fit_seconds": fit_seconds,
            "best_epoch": result.best_epoch,
            "valid": result.metrics["valid"],
            "test": test_metrics(result.model),
            "e0_correction": {str(z): v for z, v in (result.e0s or {}).items()},
        }
        print(label, json.dumps(results["methods"][label]["test"]), file=sys.stderr)
        results["total_seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
