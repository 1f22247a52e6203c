"""The robust-gate range rule's settings against accuracy and blow-ups, on cached fits.

Uses the MMEA fits that ``benchmarks/robustness.py`` keeps in ``--work`` (it trains them; this
script never trains), re-calibrates them on their training sets with the current code, and
re-evaluates the same weights under several settings of the rule (``margin:fade:logits``):

* ``margin``: width of the smooth saturation beyond the recorded range, as a fraction of it;
* ``fade``: range-widths outside the range at which the adapter's update has faded to 1/e
  (``inf``: no fade);
* ``logits``: ``1`` saturates the gate logits to their training range too, ``0`` keeps only
  the bottleneck's range (the rule of the first robust-gates release, with fade 1).

Per setting: test force MAE on ``--test-frames`` frames of every dataset (relative to the same
weights without ranges), and blow-ups (max |F| > 10x the bare base's, or non-finite) on the
rattle sweep of ``benchmarks/robustness.py`` for the datasets in ``--rattle``.

Usage::

    python benchmarks/range_rule.py --settings 0.1:1:0,0.1:2:1,0.1:inf:1 \\
        --out benchmarks/results/range_rule.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from robustness import BLOWUP, MODEL, SIGMAS, _dataset  # noqa: E402

DATASETS = ("aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde", "naphthalene",
            "paracetamol", "toluene", "uracil", "acac")  # fmt: skip


def _setting(text: str) -> tuple[float, float, bool]:
    margin, fade, logits = text.split(":")
    return float(margin), float(fade), bool(int(logits))


def _apply(model, setting: tuple[float, float, bool], ranges: dict) -> None:
    margin, fade, logits = setting
    if not logits:
        ranges = {t: {"low": r["low"], "high": r["high"]} for t, r in ranges.items()}
    model.set_gate_ranges("mmea", ranges, margin=margin, fade_scale=fade)


def _forces(calc, frames: list) -> list:
    out = []
    for result in calc.calculate_batch(frames, ["energy", "forces"], max_atoms=2000):
        forces = result["forces"]
        out.append(forces if np.isfinite(forces).all() else None)
    return out


def _mae(forces: list, frames: list) -> float:
    errors = [
        np.abs(f - a.arrays["REF_forces"]).mean() if f is not None else np.nan
        for f, a in zip(forces, frames, strict=True)
    ]
    return float(1000 * np.mean(errors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="0.1:1:0,0.1:2:1", help="margin:fade:logits,...")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--rattle", default="aspirin,acac")
    parser.add_argument("--structures", type=int, default=30, help="rattled frames per σ")
    parser.add_argument("--test-frames", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "robustness"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/range_rule.json"))
    args = parser.parse_args(argv)
    import ase.io
    import torch

    torch.set_num_threads(args.threads)
    settings = [_setting(s) for s in args.settings.split(",")]
    work = Path(args.work)
    results: dict = {
        "command": "python benchmarks/range_rule.py " + shlex.join(argv or sys.argv[1:]),
        "settings": [list(s) for s in settings],
        "datasets": {},
    }
    with contextlib.redirect_stdout(sys.stderr):
        from mmea_calc import AdaptedModel, MMEACalculator
        from mmea_calc.train import calibrate_adapter

        for dataset in [d for d in args.datasets.split(",") if d]:
            tic = time.perf_counter()
            model = AdaptedModel(MODEL, dtype="float64")
            model.load_adapter(work / dataset / "mmea", name="mmea")
            ranges = calibrate_adapter(model, "mmea", _dataset(dataset)["train"])
            tests = {}
            for name, path in _dataset(dataset)["tests"].items():
                frames = ase.io.read(path, index=f":{args.test_frames}")
                for atoms in frames:
                    if "REF_energy" not in atoms.info:
                        atoms.arrays["REF_forces"] = atoms.get_forces()
                    atoms.calc = None
                tests[name] = frames
            base = MMEACalculator(model, select=None)
            calc = MMEACalculator(model, select="mmea")
            rattled = []
            if dataset in args.rattle.split(","):
                test = next(iter(tests.values()))
                for sigma in SIGMAS:
                    for i in range(args.structures):
                        atoms = test[i % len(test)].copy()
                        atoms.rattle(sigma, seed=1000 + i)
                        rattled.append((sigma, atoms))
                base_max = [np.abs(f).max() for f in _forces(base, [a for _, a in rattled])]
            out: dict = {"no_ranges": {}}
            model.set_gate_ranges("mmea", None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name, frames in tests.items():
                    out["no_ranges"][name] = _mae(_forces(calc, frames), frames)
            for setting in settings:
                _apply(model, setting, ranges)
                key = ":".join(f"{float(v):g}" for v in setting)
                row: dict = {"test": {}}
                for name, frames in tests.items():
                    mae = _mae(_forces(calc, frames), frames)
                    row["test"][name] = {
                        "forces_mae_meV_per_A": mae,
                        "relative": mae / out["no_ranges"][name] - 1.0,
                    }
                if rattled:
                    forces = _forces(calc, [a for _, a in rattled])
                    ratio = [
                        math.inf if f is None else np.abs(f).max() / b
                        for f, b in zip(forces, base_max, strict=True)
                    ]
                    row["blowups"] = {
                        f"{s:g}": int(sum(r > BLOWUP for (sig, _), r in zip(rattled, ratio,
                                                                          strict=True)
                                          if sig == s))
                        for s in SIGMAS
                    }  # fmt: skip
                    row["max_ratio"] = float(max(ratio))
                out[key] = row
                print(dataset, key, json.dumps(row), file=sys.stderr, flush=True)
            out["seconds"] = time.perf_counter() - tic
            results["datasets"][dataset] = out
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
