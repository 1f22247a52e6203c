"""Accuracy per trainable parameter: MMEA vs mace-torch's LoRA vs full fine-tuning.

Base model ``../shared/assets/models/mace-spice-small.model`` (skips with a message when
``../shared`` is absent). Datasets:

* revised MD17 (``data/rmd17/<molecule>/{train,valid,test}.xyz``, 100/50/1000);
* acetylacetone (``data/acac``): train on ``train_300K`` (valid: a seeded 10 % split), test on
  ``test_MD_300K`` and ``test_MD_600K`` (the 600 K set measures extrapolation).

Two protocols (``--protocol``): ``100/50`` trains on the whole train file and validates on
``valid.xyz``; ``50/50`` is what the MMEA authors' runs do (``valid_fraction=0.5`` on the
100-frame train file): a seeded half of the train file trains, the other half validates (acac:
half of ``train_300K`` each).

Methods: ``base``; ``mmea-rN`` (gates, rank N); ``mmea-paper-rN`` (preset ``paper``: gates plus
the authors' LoRA/contraction/Bessel parts, LoRA rank N, alpha N); ``lora-rN`` (mace-torch's
LoRA, its default alpha 1) and ``lora-rN-aM`` (alpha M); ``full``.

Every method gets the same data, loss, per-element E0 refit, schedule, epochs and seed. Each
(dataset, method) job runs in a fresh process, so its peak RSS is its own. Results are written to
the JSON after every job and finished jobs are skipped on a re-run (``--fresh`` to redo), so a long
benchmark can be continued across sessions. ``--plot`` draws force MAE vs trainable parameters.

Usage::

    python benchmarks/accuracy.py --epochs 60 --molecules aspirin,ethanol,malonaldehyde,\\
        paracetamol,toluene --acac --plot benchmarks/results/accuracy.png
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "models" / "mace-spice-small.model"
RMD17 = SHARED / "data" / "rmd17"
ACAC = SHARED / "data" / "acac"
METHODS = {  # label: (method, rank)
    "mmea-r8": ("mmea", 8),
    "mmea-r16": ("mmea", 16),
    "lora-r4": ("lora", 4),
    "lora-r16": ("lora", 16),
    "full": ("full", 16),
}
ALL_MOLECULES = (
    "aspirin,azobenzene,benzene,ethanol,malonaldehyde,naphthalene,paracetamol,salicylic,"
    "toluene,uracil"
)


def _parse_label(label: str) -> tuple[str, int, float | None, str]:
    """``mmea-r8`` -> ("mmea", 8, None, "gates"); ``lora-r16-a16`` -> ("lora", 16, 16.0,
    "gates"); ``mmea-paper-r16`` -> ("mmea", 16, None, "paper").

    ``-aM`` sets LoRA's alpha (scaling ``alpha / rank``); without it mace-torch's default
    alpha = 1 applies to ``lora`` and alpha = rank to ``mmea-paper``. ``full`` trains every
    tensor (the rank is unused).
    """
    if label in METHODS:
        return (*METHODS[label], None, "gates")
    method, _, rest = label.partition("-r")
    preset = "gates"
    if method == "mmea-paper":
        method, preset = "mmea", "paper"
    rank, has_alpha, alpha = rest.partition("-a")
    ok = method in ("mmea", "lora") and rank.isdigit() and int(rank) > 0
    if ok and has_alpha:
        ok = (method == "lora" or preset == "paper") and alpha.isdigit() and int(alpha) > 0
    if ok:
        return method, int(rank), float(alpha) if alpha else None, preset
    raise SystemExit(
        f"unknown method {label!r}: use base, full, mmea-rN, mmea-paper-rN, lora-rN or "
        f"lora-rN-aM (LoRA alpha M), e.g. {', '.join(METHODS)}, mmea-paper-r16, lora-r16-a16"
    )


def _datasets(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    sets: dict[str, dict[str, object]] = {}
    halves = args.protocol == "50/50"
    for mol in filter(None, args.molecules.split(",")):
        folder = RMD17 / mol
        sets[f"rmd17-{mol}"] = {
            "train": folder / "train.xyz",
            "valid": None if halves else folder / "valid.xyz",
            "valid_fraction": 0.5,  # used only without a valid file
            "tests": {"test": folder / "test.xyz"},
        }
    if args.acac:
        sets["acac"] = {
            "train": ACAC / "train_300K.xyz",
            "valid": None,
            "valid_fraction": 0.5 if halves else 0.1,
            "tests": {
                "test_300K": ACAC / "test_MD_300K.xyz",
                "test_600K": ACAC / "test_MD_600K.xyz",
            },
        }
    return sets


def _job(
    dataset: dict, label: str, epochs: int, threads: int, n_test: int | None, lr: float = 5e-3
) -> dict:
    """One fit + test evaluation, in its own process (peak RSS measured at the end)."""
    import resource

    import torch

    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(sys.stderr):
        from mmea_calc import load_base
        from mmea_calc.base import base_info
        from mmea_calc.data import labelled_graphs, read_structures, reference_values
        from mmea_calc.train import TrainConfig, error_metrics, fit_adapter, predict

        base = load_base(MODEL, dtype="float64")
        info = base_info(base)
        zs = info["atomic_numbers"]
        train = read_structures(dataset["train"], atomic_numbers=zs)
        valid = read_structures(dataset["valid"], atomic_numbers=zs) if dataset["valid"] else None
        result: dict = {}
        module = base
        if label != "base":
            method, rank, alpha, preset = _parse_label(label)
            extra = {} if alpha is None else {"lora_alpha": alpha}
            config = TrainConfig(
                method=method,
                rank=rank,
                preset=preset,
                epochs=epochs,
                lr=lr,
                patience=None,
                valid_fraction=dataset["valid_fraction"],
                **extra,
            )
            result.update(extra, preset=preset)
            tic = time.perf_counter()
            fit = fit_adapter(base, train, valid, config, name=label.replace("-", "_"))
            module = fit.model
            result.update(
                trainable_parameters=fit.trainable_parameters,
                n_train=fit.metrics["train"]["n_structures"],
                n_valid=fit.metrics["valid"]["n_structures"],
                seconds_per_epoch=fit.seconds_per_epoch,
                fit_seconds=time.perf_counter() - tic,
                best_epoch=fit.best_epoch,
                valid=fit.metrics["valid"],
            )
        else:
            result["trainable_parameters"] = 0
        result["tests"] = {}
        for name, path in dataset["tests"].items():
            test = read_structures(path, atomic_numbers=zs)[:n_test]
            pred = predict(module, labelled_graphs(test, info), batch_size=32)
            result["tests"][name] = error_metrics(pred, reference_values(test))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _write_json(path: Path, results: dict) -> None:
    """Atomic: a crash mid-write never costs the finished jobs."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _plot(results: dict, path: Path) -> None:
    """Force MAE vs trainable parameters: one panel per (dataset, test set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (name, test)
        for name, jobs in results["datasets"].items()
        if jobs
        for test in next(iter(jobs.values()))["tests"]
    ]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    styles = {
        "mmea": ("o", "C0"),
        "mmea-paper": ("P", "C4"),
        "lora": ("s", "C1"),
        "lora-alpha": ("^", "C3"),
        "full": ("D", "C2"),
    }
    for ax, (name, test) in zip(axes.flat, panels, strict=False):
        jobs = results["datasets"][name]
        for label, res in jobs.items():
            mae = res["tests"][test]["forces_mae_meV_per_A"]
            if label == "base":
                ax.set_title(f"{name} {test}\n(base, no fine-tuning: {mae:.0f} meV/Å)", fontsize=8)
                continue
            kind = "mmea-paper" if label.startswith("mmea-paper") else label.split("-")[0]
            marker, color = styles["lora-alpha" if kind == "lora" and "-a" in label else kind]
            ax.scatter(res["trainable_parameters"], mae, marker=marker, color=color)
            ax.annotate(label, (res["trainable_parameters"], mae), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters", fontsize=8)
        ax.set_ylabel("test force MAE (meV/Å)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-3, help="learning rate (every method)")
    parser.add_argument(
        "--molecules",
        default="aspirin,ethanol,malonaldehyde,paracetamol,toluene",
        help=f"comma-separated rMD17 molecules (all: {ALL_MOLECULES})",
    )
    parser.add_argument("--acac", action="store_true", help="also acetylacetone (300 K -> 600 K)")
    parser.add_argument(
        "--methods",
        default="base," + ",".join(METHODS),
        help="comma-separated: base, full, mmea-rN, lora-rN, lora-rN-aM (LoRA alpha M; default 1)",
    )
    parser.add_argument(
        "--protocol",
        default="100/50",
        choices=["100/50", "50/50"],
        help="100/50: train.xyz trains, valid.xyz validates; 50/50 (the MMEA authors'): halves "
        "of train.xyz",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per job")
    parser.add_argument(
        "--jobs", type=int, default=1, help="jobs run side by side (each in its own process)"
    )
    parser.add_argument("--n-test", type=int, default=None, help="first N test structures")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/accuracy.json"))
    parser.add_argument("--plot", default=None, help="PNG of force MAE vs trainable parameters")
    parser.add_argument("--fresh", action="store_true", help="ignore finished jobs in --out")
    args = parser.parse_args(argv)
    for label in args.methods.split(","):
        if label != "base":
            _parse_label(label)  # fail before hours of work, not in the middle
    if not MODEL.is_file():
        print(f"skipping: shared assets absent ({MODEL})", file=sys.stderr)
        return 0
    out = Path(args.out)
    results = {"datasets": {}}
    if out.is_file() and not args.fresh:
        results = json.loads(out.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    datasets = _datasets(args)
    pending = []
    for set_name in datasets:
        done = results["datasets"].setdefault(set_name, {})
        pending += [(set_name, label) for label in args.methods.split(",") if label not in done]
    # Longest first (acac has 5x rMD17's training atoms), so parallel jobs end together.
    pending.sort(key=lambda job: job[0] != "acac")
    stored = results.get("setup", {}).get("epochs")
    if pending and stored is not None and stored != args.epochs:
        raise SystemExit(
            f"{out} holds {stored}-epoch results; finishing it with --epochs {args.epochs} would "
            f"mix schedules: use --epochs {stored}, another --out, or --fresh"
        )
    stored = results.get("setup", {}).get("lr", 5e-3)  # older files: the default 5e-3
    if pending and "setup" in results and stored != args.lr:
        raise SystemExit(f"{out} holds results at lr {stored}, not {args.lr}: use another --out")
    stored = results.get("setup", {}).get("protocol", "100/50")  # older files: 100/50
    if pending and "setup" in results and stored != args.protocol:
        raise SystemExit(
            f"{out} holds protocol {stored} results, not {args.protocol}: use another --out"
        )
    command = "python benchmarks/accuracy.py " + shlex.join(argv or sys.argv[1:])
    if pending or "setup" not in results:  # a re-run that only re-plots keeps the record
        previous = results.get("setup", {})
        # Every command that added jobs to this file, oldest first.
        history = previous.get("commands", [previous["command"]] if "command" in previous else [])
        results["setup"] = {
            "model": MODEL.name,
            "epochs": args.epochs,
            "lr": args.lr,
            "protocol": args.protocol,
            "threads": args.threads,
            "jobs": args.jobs,
            "machine": platform.machine(),
            "python": platform.python_version(),
            "commands": [*history, command],
        }
    lock = threading.Lock()

    def run(job: tuple[str, str]) -> None:
        set_name, label = job
        # A fresh process per job: its peak RSS is its own, and no state leaks between methods.
        with concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool:
            future = pool.submit(
                _job, datasets[set_name], label, args.epochs, args.threads, args.n_test, args.lr
            )
            result = future.result()
        result["concurrent_jobs"] = args.jobs
        tests = {k: round(v["forces_mae_meV_per_A"], 2) for k, v in result["tests"].items()}
        with lock:
            results["datasets"][set_name][label] = result
            print(f"{set_name} {label}: force MAE {tests}", file=sys.stderr, flush=True)
            _write_json(out, results)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as threads:
        for future in [threads.submit(run, job) for job in pending]:
            future.result()
    if args.plot:
        _plot(results, Path(args.plot))
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
