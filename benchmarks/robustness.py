"""Robustness off the training data: rattled structures and hot MD, MMEA vs LoRA vs full.

Base model ``../shared/assets/models/mace-spice-small.model`` (skips with a message when
``../shared`` is absent). For each dataset (rMD17 molecules, acetylacetone) the methods are
trained once with one trainer (same data, loss, E0 refit, schedule, epochs, seed, as
``benchmarks/accuracy.py``) and kept in ``--work`` (re-runs reuse them). Then, in one process
per dataset:

* test force/energy MAE of every model;
* a rattle sweep: ``--structures`` test frames displaced by Gaussian noise of σ = 0.1–0.4 Å; a
  *blow-up* is a non-finite result or a max |F| more than 10x the bare base's on the same
  structure;
* Langevin MD (0.5 fs, friction 0.01/fs) from the first test frame at 500 K and 1500 K.

Models: ``base``; ``mmea`` (rank 16, re-calibrated on its training set with this version's
rule: bottleneck and logit ranges, saturation and fade outside them); ``mmea-old`` (the same
weights without the ranges: the gates as they were before, logit bound 10); ``paper`` (the
``paper`` preset, rank 16, alpha 16: the gates plus LoRA and full updates of base tensors, which
the range rule does not cover; only with ``--methods ...,paper``); ``lora`` (mace-torch's LoRA
r16, alpha 1, as in the accuracy benchmark); ``full``.

Usage::

    python benchmarks/robustness.py --datasets aspirin,acac --epochs 30 --jobs 2 \\
        --out benchmarks/results/robustness.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "models" / "mace-spice-small.model"
# label -> (method, rank, preset)
TRAINED = {
    "mmea": ("mmea", 16, "gates"),
    "paper": ("mmea", 16, "paper"),
    "lora": ("lora", 16, "gates"),
    "full": ("full", 16, "gates"),
}
MODELS = ("base", "mmea", "mmea-old", "paper", "lora", "full")
SIGMAS = (0.1, 0.15, 0.2, 0.3, 0.4)
BLOWUP = 10.0


def _dataset(name: str) -> dict:
    if name == "acac":
        folder = SHARED / "data" / "acac"
        return {"train": folder / "train_300K.xyz", "valid": None,
                "tests": {"test_300K": folder / "test_MD_300K.xyz",
                          "test_600K": folder / "test_MD_600K.xyz"}}  # fmt: skip
    folder = SHARED / "data" / "rmd17" / name
    return {"train": folder / "train.xyz", "valid": folder / "valid.xyz",
            "tests": {"test": folder / "test.xyz"}}  # fmt: skip


def _train(dataset: str, label: str, epochs: int, threads: int, work: Path) -> dict:
    """One fit, written to ``work/dataset/label`` (skipped when already there)."""
    import torch

    torch.set_num_threads(threads)
    out = work / dataset / label
    if (out / "training.json").is_file():
        return json.loads((out / "training.json").read_text())
    with contextlib.redirect_stdout(sys.stderr):
        from mmea_calc import TrainConfig, fit_adapter, load_base

        method, rank, preset = TRAINED[label]
        data = _dataset(dataset)
        base = load_base(MODEL, dtype="float64")
        config = TrainConfig(method=method, rank=rank, preset=preset, epochs=epochs, patience=None)
        fit_adapter(base, data["train"], data["valid"], config, name=label, out_dir=out,
                    overwrite=True)  # fmt: skip
    return json.loads((out / "training.json").read_text())


def _calculators(work: Path, dataset: str, methods: tuple[str, ...] = tuple(TRAINED)) -> dict:
    import warnings

    from mmea_calc import AdaptedModel, MMEACalculator
    from mmea_calc.train import calibrate_adapter

    model = AdaptedModel(MODEL, dtype="float64")
    model.load_adapter(work / dataset / "mmea", name="mmea")
    # record the ranges with this version's rule (fits cached by an older version hold fewer)
    calibrate_adapter(model, "mmea", _dataset(dataset)["train"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "old" has no ranges on purpose
        model.load_adapter(work / dataset / "mmea", name="old")
    model.set_gate_ranges("old", None)
    calcs = {
        "base": MMEACalculator(model, select=None),
        "mmea": MMEACalculator(model, select="mmea"),
        "mmea-old": MMEACalculator(model, select="old"),
    }
    if "paper" in methods:  # calibrated by its fit (this version's rule)
        model.load_adapter(work / dataset / "paper", name="paper")
        calcs["paper"] = MMEACalculator(model, select="paper")
    for label in (m for m in ("lora", "full") if m in methods):
        calcs[label] = MMEACalculator(str(work / dataset / label / "model.model"), select=None,
                                      default_dtype="float64")  # fmt: skip
    return calcs


def _evaluate(calc, atoms) -> tuple[np.ndarray | None, float, float | None]:
    """Forces (``None`` when non-finite), energy and extrapolation grade of one structure."""
    from mmea_calc.errors import NonFiniteResultError

    try:
        calc.calculate(atoms, ["energy", "forces"])
    except NonFiniteResultError:
        return None, float("nan"), None
    res = calc.results
    return res["forces"], res["energy"], res.get("adapter_extrapolation")


def _test_errors(calcs: dict, test: list) -> dict:
    out = {}
    for label, calc in calcs.items():
        de, df = [], []
        for atoms in test:
            forces, energy, _ = _evaluate(calc, atoms)
            if forces is None:
                de.append(np.nan)
                df.append(np.full(len(atoms) * 3, np.nan))
                continue
            de.append((energy - atoms.info["REF_energy"]) / len(atoms))
            df.append((forces - atoms.arrays["REF_forces"]).reshape(-1))
        out[label] = {
            "energy_mae_meV_per_atom": float(1000 * np.nanmean(np.abs(de))),
            "forces_mae_meV_per_A": float(1000 * np.nanmean(np.abs(np.concatenate(df)))),
        }
    return out


def _rattles(calcs: dict, test: list, n: int) -> dict:
    out: dict = {label: {} for label in calcs if label != "base"}
    for sigma in SIGMAS:
        ratios: dict = {label: [] for label in out}
        grades: dict = {label: [] for label in out}
        for i in range(n):
            atoms = test[i % len(test)].copy()
            atoms.rattle(sigma, seed=1000 + i)
            base_forces, _, _ = _evaluate(calcs["base"], atoms)
            base_max = np.abs(base_forces).max()
            for label in out:
                forces, _, grade = _evaluate(calcs[label], atoms)
                ratios[label].append(np.inf if forces is None else np.abs(forces).max() / base_max)
                if grade is not None:
                    grades[label].append(grade)
        for label, values in ratios.items():
            values = np.asarray(values)
            finite = values[np.isfinite(values)]
            out[label][str(sigma)] = {
                "blowups": int((~np.isfinite(values) | (values > BLOWUP)).sum()),
                "structures": n,
                "max_ratio": float(finite.max()) if finite.size else None,
                "non_finite": int((~np.isfinite(values)).sum()),
            }
            if grades[label]:  # adapters with gate ranges
                out[label][str(sigma)]["extrapolation_median"] = float(np.median(grades[label]))
    return out


def _md(calcs: dict, start, temperatures: tuple[float, ...], steps: int) -> dict:
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    from mmea_calc.errors import NonFiniteResultError

    out: dict = {}
    for label, calc in calcs.items():
        for temperature in temperatures:
            atoms = start.copy()
            atoms.calc = calc
            thermalize_momenta(atoms, temperature_K=temperature, rng=np.random.default_rng(0))
            dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, fixcm=False,
                           friction=0.01 / units.fs, rng=np.random.default_rng(1))  # fmt: skip
            record = {"max_force": 0.0, "max_temperature": 0.0, "max_extrapolation": 0.0}

            def observe(atoms=atoms, record=record, calc=calc) -> None:
                record["max_force"] = max(
                    record["max_force"], float(np.abs(atoms.get_forces()).max())
                )
                record["max_temperature"] = max(record["max_temperature"], atoms.get_temperature())
                grade = calc.results.get("adapter_extrapolation")
                if grade is not None:
                    record["max_extrapolation"] = max(record["max_extrapolation"], grade)

            dyn.attach(observe, interval=10)
            try:
                dyn.run(steps)
                record["finite"] = True
            except NonFiniteResultError:
                record["finite"] = False
            record["steps"] = dyn.nsteps
            out.setdefault(label, {})[f"{temperature:g}K"] = record
    return out


def _assess(dataset: str, work: Path, threads: int, n_rattle: int, n_test: int,
            md_steps: int, methods: tuple[str, ...] = tuple(TRAINED)) -> dict:  # fmt: skip
    import ase.io
    import torch

    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(sys.stderr):
        calcs = _calculators(work, dataset, methods)
        tests = {}
        for name, path in _dataset(dataset)["tests"].items():
            frames = ase.io.read(path, index=f":{max(n_test, n_rattle)}")
            for atoms in frames:  # acac keeps plain keys on atoms.calc; rMD17 uses REF_*
                if "REF_energy" not in atoms.info:
                    atoms.info["REF_energy"] = atoms.get_potential_energy()
                    atoms.arrays["REF_forces"] = atoms.get_forces()
                atoms.calc = None
            tests[name] = frames
        test = next(iter(tests.values()))  # rattles and MD start from the first test set
        tic = time.perf_counter()
        result = {
            "test": {name: _test_errors(calcs, frames[:n_test]) for name, frames in tests.items()},
        }
        if n_rattle:
            result["rattle"] = _rattles(calcs, test, n_rattle)
        if md_steps:
            result["md"] = _md(calcs, test[0], (500.0, 1500.0), md_steps)
        result["seconds"] = time.perf_counter() - tic
    return result


def _assess_embedded(n_rattle: int) -> dict:
    """The shipped adapters on their own test frames, with and without their gate ranges."""
    import warnings

    import ase.io

    from mmea_calc import AdaptedModel, MMEACalculator
    from mmea_calc.base_format import EMBEDDED_DIR, embedded_adapter_dirs

    out = {}
    for directory in embedded_adapter_dirs():
        name = directory.name
        model = AdaptedModel("embedded", dtype="float64")
        model.load_adapter(directory, name="mmea")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_adapter(directory, name="old")
        model.set_gate_ranges("old", None)
        calcs = {
            "base": MMEACalculator(model, select=None),
            "mmea": MMEACalculator(model, select="mmea"),
            "mmea-old": MMEACalculator(model, select="old"),
        }
        test = ase.io.read(EMBEDDED_DIR / "data" / f"{name}_test.xyz", index=":")
        out[name] = {"test": _test_errors(calcs, test), "rattle": _rattles(calcs, test, n_rattle)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="aspirin,acac")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--structures", type=int, default=30, help="rattled frames per σ")
    parser.add_argument("--test-frames", type=int, default=200)
    parser.add_argument(
        "--methods", default="mmea,lora,full",
        help=f"trained methods, of {', '.join(TRAINED)} (mmea is always needed)",
    )  # fmt: skip
    parser.add_argument("--md-steps", type=int, default=2000, help="0.5 fs each (1 ps)")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "robustness"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/robustness.json"))
    parser.add_argument(
        "--embedded", action="store_true",
        help="only the shipped adapters on their test frames (no ../shared needed)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.embedded:
        import torch

        torch.set_num_threads(args.threads)
        with contextlib.redirect_stdout(sys.stderr):
            adapters = _assess_embedded(args.structures)
        command = "python benchmarks/robustness.py " + shlex.join(argv or sys.argv[1:])
        results = {"command": command, "blowup_factor": BLOWUP, "adapters": adapters}
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return 0
    if not MODEL.is_file():
        print(f"skipping: shared asset {MODEL} is absent", file=sys.stderr)
        return 0
    work = Path(args.work)
    datasets = [d for d in args.datasets.split(",") if d]
    methods = tuple(m for m in args.methods.split(",") if m)
    if "mmea" not in methods or set(methods) - set(TRAINED):
        parser.error(f"--methods must include mmea and name only {list(TRAINED)}")
    results: dict = {"setup": {
        "command": "python benchmarks/robustness.py " + shlex.join(argv or sys.argv[1:]),
        "epochs": args.epochs, "sigmas": list(SIGMAS), "blowup_factor": BLOWUP,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "python": platform.python_version()},
    }, "training": {}, "datasets": {}}  # fmt: skip
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        fits = {(d, m): pool.submit(_train, d, m, args.epochs, args.threads, work)
                for d in datasets for m in methods}  # fmt: skip
        for (dataset, label), future in fits.items():
            summary = future.result()
            results["training"].setdefault(dataset, {})[label] = {
                k: summary[k] for k in ("trainable_parameters", "seconds_per_epoch", "best_epoch")
            }
            print(f"trained {dataset} {label}", file=sys.stderr)
        settings = (args.threads, args.structures, args.test_frames, args.md_steps, methods)
        evals = {d: pool.submit(_assess, d, work, *settings) for d in datasets}
        for dataset, future in evals.items():
            results["datasets"][dataset] = future.result()
            print(f"assessed {dataset}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
