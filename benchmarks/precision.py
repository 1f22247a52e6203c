"""float32 vs float64: one MMEA adapter trained and served in single vs double precision.

Base model ``../shared/assets/models/mace-spice-small.model`` (skips with a message when
``../shared`` is absent). Per rMD17 molecule (``data/rmd17/<molecule>/{train,valid,test}.xyz``):

* two fits of the same adapter (method ``mmea``, ``--rank``, ``--preset``, seed 0, lr, loss and
  schedule of ``benchmarks/accuracy.py``, protocol 100/50: ``train.xyz`` trains, ``valid.xyz``
  validates), one with ``TrainConfig(dtype="float64")`` and one with ``dtype="float32"``, the base
  loaded from the file in that dtype; each fit in a fresh process. Recorded: training seconds per
  epoch (validation included), best epoch, per-epoch loss and validation force MAE, and the test
  errors (``predict``) on the first ``--n-test`` frames of ``test.xyz``;
* then, in one process: ``MMEACalculator(model, select=name)`` of the two trained adapters (read
  back from their output folders), energy + forces per structure on the first
  ``--timing-frames`` test frames, ``--passes`` times over them. Each frame is computed by both
  calculators one after the other (who goes first alternates), so machine noise hits both alike;
  reported are the medians (ms per structure), the ratio of medians and the median of the
  per-pair ratios (float32 / float64). The same process also serves the float64-trained adapter
  in float32 (the base and adapter converted) on the test frames: the error of serving alone.

Results go to the JSON after every step and finished steps are skipped on a re-run (``--fresh``
to redo); ``setup.commands`` lists every command that added results.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/precision.py --molecules ethanol,aspirin --epochs 30 \\
        --n-test 200 --threads 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "models" / "mace-spice-small.model"
RMD17 = SHARED / "data" / "rmd17"
DTYPES = ("float64", "float32")
NAME = "mmea"  # the adapter's name in both fits
CHECK_FRAMES = 5  # test energies stored by a fit, reproduced by the timing step's calculator


def _fit(molecule: str, dtype: str, args: dict, out_dir: Path) -> dict:  # in its own process
    """Train one adapter in ``dtype``, write it to ``out_dir``, test it."""
    import torch

    torch.set_num_threads(args["threads"])
    with contextlib.redirect_stdout(sys.stderr):
        from mmea_calc import load_base
        from mmea_calc.base import base_info
        from mmea_calc.data import labelled_graphs, read_structures, reference_values
        from mmea_calc.train import TrainConfig, error_metrics, fit_adapter, predict

        base = load_base(MODEL, dtype=dtype)
        info = base_info(base)
        zs = info["atomic_numbers"]
        folder = RMD17 / molecule
        train = read_structures(folder / "train.xyz", atomic_numbers=zs)
        valid = read_structures(folder / "valid.xyz", atomic_numbers=zs)
        test = read_structures(folder / "test.xyz", atomic_numbers=zs)[: args["n_test"]]
        config = TrainConfig(
            method="mmea",
            rank=args["rank"],
            preset=args["preset"],
            epochs=args["epochs"],
            lr=args["lr"],
            patience=None,
            dtype=dtype,
        )
        tic = time.perf_counter()
        fit = fit_adapter(
            base, train, valid, config, name=NAME, out_dir=out_dir, overwrite=out_dir.exists()
        )
        fit_seconds = time.perf_counter() - tic
        param_dtype = str(next(fit.model.parameters()).dtype).removeprefix("torch.")
        pred = predict(fit.model, labelled_graphs(test, info), batch_size=32)
        history = [
            {
                "epoch": h["epoch"],
                "loss": h["loss"],
                "criterion": h["criterion"],
                "valid_forces_mae_meV_per_A": h["valid"]["forces_mae_meV_per_A"],
            }
            for h in fit.history
        ]
        return {
            "dtype": dtype,
            "parameter_dtype": param_dtype,
            "trainable_parameters": fit.trainable_parameters,
            "seconds_per_epoch": fit.seconds_per_epoch,
            "fit_seconds": fit_seconds,
            "epochs_completed": fit.epochs_completed,
            "best_epoch": fit.best_epoch,
            "status": fit.status,
            "valid": fit.metrics["valid"],
            "history": history,
            "test": error_metrics(pred, reference_values(test)),
            "check_energies_eV": [float(e) for e in pred["energy"][:CHECK_FRAMES]],
        }


def _serve(molecule: str, fits: dict, args: dict, work: Path) -> dict:  # in its own process
    """Interleaved calculator timing of the two trained adapters; float32 serving alone."""
    import torch

    torch.set_num_threads(args["threads"])
    with contextlib.redirect_stdout(sys.stderr):
        from mmea_calc import AdaptedModel, MMEACalculator, load_base
        from mmea_calc.base import base_info
        from mmea_calc.data import labelled_graphs, read_structures, reference_values
        from mmea_calc.train import error_metrics, predict

        calcs, models = {}, {}
        for dtype in DTYPES:
            model = AdaptedModel(load_base(MODEL, dtype=dtype))
            name = model.load_adapter(work / dtype)
            models[dtype] = model
            calcs[dtype] = MMEACalculator(model, select=name)
        info = base_info(models["float64"].base_model)
        test = read_structures(RMD17 / molecule / "test.xyz", atomic_numbers=info["atomic_numbers"])
        test = test[: args["n_test"]]
        frames = test[: args["timing_frames"]]
        # The calculators reproduce the fits' own test energies (the files are what was trained).
        reproduced = {}
        for dtype, calc in calcs.items():
            energies = []
            for atoms in test[:CHECK_FRAMES]:
                probe = atoms.copy()
                probe.calc = calc
                energies.append(probe.get_potential_energy())
            diff = np.abs(np.asarray(energies) - fits[dtype]["check_energies_eV"]).max()
            reproduced[dtype] = float(diff)
        probes = {}
        for dtype, calc in calcs.items():
            probes[dtype] = probe = frames[0].copy()
            probe.calc = calc
        times: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
        step = 0
        for sweep in range(args["passes"] + 1):  # the first pass warms up
            for atoms in frames:
                order = DTYPES if step % 2 == 0 else DTYPES[::-1]
                step += 1
                for dtype in order:
                    probe = probes[dtype]
                    probe.numbers = atoms.numbers  # the same in rMD17; not in the tests' toy
                    probe.positions = atoms.positions
                    start = time.perf_counter()
                    probe.get_potential_energy()
                    probe.get_forces()
                    if sweep > 0:
                        times[dtype].append(time.perf_counter() - start)
        ratios = np.asarray(times["float32"]) / np.asarray(times["float64"])
        speed = {f"{d}_ms_per_structure": 1000 * statistics.median(times[d]) for d in DTYPES}
        speed.update(
            structures=len(frames),
            atoms=len(frames[0]),
            threads=args["threads"],
            steps_per_dtype=len(ratios),
            ratio_of_medians=speed["float32_ms_per_structure"] / speed["float64_ms_per_structure"],
            median_pair_ratio=float(np.median(ratios)),
            pair_ratio_quartiles=[float(q) for q in np.percentile(ratios, [25, 75])],
        )
        # Serving alone: the float64-trained adapter converted to float32, on the same frames.
        graphs = labelled_graphs(test, info)
        pred64 = predict(models["float64"], graphs, batch_size=32)
        models["float64"].to(dtype=torch.float32)
        pred32 = predict(models["float64"], graphs, batch_size=32)
        served = {
            "test": error_metrics(pred32, reference_values(test)),
            "max_abs_energy_diff_meV_per_atom": float(
                np.max(np.abs(pred32["energy"] - pred64["energy"]) / len(test[0]) * 1000)
            ),
            "max_abs_force_diff_meV_per_A": float(
                np.max(np.abs(pred32["forces"] - pred64["forces"]) * 1000)
            ),
        }
    return {
        "calculator_speed": speed,
        "reproduced_max_abs_energy_diff_eV": reproduced,
        "float64_trained_served_float32": served,
    }


def _write_json(path: Path, results: dict) -> None:
    """Atomic: a crash mid-write never costs the finished steps."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _in_process(fn, *args):
    """Run ``fn(*args)`` in a fresh process (no state or thread pool leaks between steps)."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", default="ethanol,aspirin", help="comma-separated rMD17")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--preset", default="gates", choices=["gates", "paper"])
    parser.add_argument("--n-test", type=int, default=200, help="first N test structures")
    parser.add_argument("--timing-frames", type=int, default=50, help="test frames timed")
    parser.add_argument("--passes", type=int, default=4, help="timed passes over them (+1 warm)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/precision.json"))
    parser.add_argument(
        "--work", default=str(ROOT / "benchmarks/work/precision"), help="trained adapters"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore finished steps in --out")
    args = parser.parse_args(argv)
    if not MODEL.is_file():
        print(f"skipping: shared assets absent ({MODEL})", file=sys.stderr)
        return 0
    out, work = Path(args.out), Path(args.work)
    results: dict = {"molecules": {}}
    if out.is_file() and not args.fresh:
        results = json.loads(out.read_text())
    schedule = {
        "epochs": args.epochs,
        "lr": args.lr,
        "rank": args.rank,
        "preset": args.preset,
        "n_test": args.n_test,
    }
    stored = {k: results.get("setup", {}).get(k, v) for k, v in schedule.items()}
    if stored != schedule:
        changed = {k: (stored[k], v) for k, v in schedule.items() if stored[k] != v}
        raise SystemExit(
            f"{out} holds results with other settings (stored, asked): {changed}; use the same, "
            "another --out, or --fresh"
        )
    molecules = list(filter(None, args.molecules.split(",")))
    pending = [
        (mol, step)
        for mol in molecules
        for step in (*DTYPES, "serve")
        if step not in results["molecules"].get(mol, {})
    ]
    command = "python benchmarks/precision.py " + shlex.join(argv or sys.argv[1:])
    if pending or "setup" not in results:
        history = results.get("setup", {}).get("commands", [])
        import torch

        results["setup"] = {
            **schedule,
            "method": "mmea",
            "seed": 0,
            "protocol": "100/50",
            "model": MODEL.name,
            "timing_frames": args.timing_frames,
            "passes": args.passes,
            "threads": args.threads,
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "commands": [*history, command],
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("epochs", "lr", "rank", "preset", "n_test")}
    config.update(threads=args.threads, timing_frames=args.timing_frames, passes=args.passes)
    for mol, step in pending:
        done = results["molecules"].setdefault(mol, {})
        if step == "serve":
            done[step] = _in_process(_serve, mol, done, config, work / mol)
            speed = done[step]["calculator_speed"]
            summary = f"float32/float64 per structure {speed['median_pair_ratio']:.3f}"
        else:
            done[step] = _in_process(_fit, mol, step, config, work / mol / step)
            test = done[step]["test"]
            summary = (
                f"E {test['energy_mae_meV_per_atom']:.2f} meV/atom, "
                f"F {test['forces_mae_meV_per_A']:.2f} meV/Å, "
                f"{done[step]['seconds_per_epoch']:.2f} s/epoch"
            )
        print(f"{mol} {step}: {summary}", file=sys.stderr, flush=True)
        _write_json(out, results)
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
