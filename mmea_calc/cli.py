"""``mmea-calc``: fine-tune, evaluate, inspect adapters, convert bases, run the demo.

A thin layer over :func:`mmea_calc.train.fit_adapter`, :func:`mmea_calc.train.predict` and the
adapter files. Bad input gives one line on stderr (``mmea-calc: error: ...``), exit code 2 and
writes nothing. With ``--json`` on ``info`` (and ``eval --json -``) stdout holds exactly one JSON
object: library and dependency chatter goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from mmea_calc.errors import ConfigError, MmeaCalcError  # torch-free: keeps --help fast

__all__ = ["build_parser", "main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
_METRIC_COLUMNS = [
    ("energy", "E MAE", "E RMSE", "meV/atom"),
    ("forces", "F MAE", "F RMSE", "meV/Å"),
    ("stress", "S MAE", "S RMSE", "meV/Å³"),
]
_METRIC_KEYS = {
    "energy": ("energy_mae_meV_per_atom", "energy_rmse_meV_per_atom"),
    "forces": ("forces_mae_meV_per_A", "forces_rmse_meV_per_A"),
    "stress": ("stress_mae_meV_per_A3", "stress_rmse_meV_per_A3"),
}


# ---------------------------------------------------------------------------- parser
def _add_keys(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data keys (fall back to atoms.calc for REF_*/plain names)")
    group.add_argument("--energy-key", default="REF_energy")
    group.add_argument("--forces-key", default="REF_forces")
    group.add_argument("--stress-key", default="REF_stress")


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="train an adapter (or a LoRA / full fine-tune)")
    p.add_argument("--base", required=True, help="base MACE model (.model file)")
    p.add_argument("--train", required=True, help="training data (extxyz or any ASE format)")
    p.add_argument("--valid", help="validation data (default: a seeded split of --train)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", help="adapter name (default: the output folder's name)")
    p.add_argument("--method", default="mmea", choices=["mmea", "lora", "full"])
    p.add_argument("--rank", type=int, default=16, help="MMEA or LoRA rank")
    p.add_argument(
        "--preset",
        default="gates",
        choices=["gates", "paper"],
        help="MMEA: 'gates' (the gates alone) or 'paper' (also the LoRA/contraction/Bessel parts "
        "the MMEA authors train)",
    )
    p.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="LoRA scaling numerator (scaling alpha/rank) for --method lora and --preset paper "
        "(default: mace-torch's 1 for lora, the rank for paper)",
    )
    p.add_argument(
        "--logit-bound",
        type=_bound,
        default=10.0,
        help="MMEA: soft bound c on gate logits, c*tanh(g/c) ('none': unbounded; default 10)",
    )
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument(
        "--batch-size",
        type=int,
        default=5,
        help="structures per step and per rank: under torchrun with N ranks a step sees N x "
        "this (as in mace)",
    )
    p.add_argument("--energy-weight", type=float, default=1.0)
    p.add_argument("--forces-weight", type=float, default=1000.0)
    p.add_argument("--stress-weight", type=float, default=1.0)
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--patience", type=int, default=100, help="early-stopping patience (epochs)")
    p.add_argument("--keep-base-e0s", action="store_true", help="do not fit an E0 correction")
    _add_keys(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head", help="head of a multi-head base (default: its only or Default head)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    p.add_argument("--overwrite", action="store_true", help="replace results in --out")
    p.set_defaults(func=_cmd_finetune)


def _bound(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="record an adapter's gate ranges and routing statistics on its training data",
    )
    p.add_argument("adapter", help="adapter directory (rewritten in place, atomically)")
    p.add_argument("--base", required=True, help="the base model the adapter was trained on")
    p.add_argument("--data", required=True, help="the adapter's training structures")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.set_defaults(func=_cmd_calibrate)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="errors of a base model (with an adapter) on labelled data")
    p.add_argument("--base", required=True, help="base MACE model (.model file)")
    p.add_argument("--adapter", help="adapter directory (default: the bare base)")
    p.add_argument("--data", required=True, help="labelled data (extxyz or any ASE format)")
    _add_keys(p)
    p.add_argument("--json", metavar="FILE", help="write the metrics as JSON ('-' for stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="write parity plots")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--head", help="head of a multi-head base (default: the adapter's, else the Default head)"
    )
    p.set_defaults(func=_cmd_eval)


def _add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="describe an adapter, a finetune output or a base model")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_cmd_info)


def _add_convert_base(sub: Any) -> None:
    p = sub.add_parser(
        "convert-base", help="turn a trusted mace .model file into a safe base directory"
    )
    p.add_argument("model", help="mace .model file (a pickle: convert only files you trust)")
    p.add_argument("outdir", help="output directory (config.json + model.safetensors)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="convert (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing base directory")
    p.set_defaults(func=_cmd_convert_base)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="MD, relaxation and errors with the embedded base and adapters")
    p.add_argument("--quick", action="store_true", help="fewer MD steps and test frames (CI)")
    p.add_argument(
        "--assets", help="folder with base/, adapters/, data/ (default: the embedded assets)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=_cmd_demo)


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write a LAMMPS model file (pair_style mace or mliap) with one adapter"
    )
    p.add_argument("--base", required=True, help="base MACE model (.model file or base dir)")
    p.add_argument(
        "--adapter", help="adapter directory (baked into the file); without: the bare base"
    )
    p.add_argument("--out", required=True, help="output file (described in OUT.json)")
    p.add_argument(
        "--elements",
        required=True,
        nargs="+",
        metavar="EL",
        help="the data file's atom types 1..N in order, e.g. --elements H O (pair_coeff maps "
        "type i to the i-th: LAMMPS does not check the count)",
    )
    p.add_argument(
        "--format",
        default="lammps",
        choices=["lammps", "mliap"],
        help="lammps: TorchScript for pair_style mace; mliap: pair_style mliap unified",
    )
    p.add_argument("--input", metavar="FILE", help="also write the LAMMPS input to FILE")
    p.add_argument(
        "--data-file", default="data.lammps", help="the data file the input reads (read_data)"
    )
    p.add_argument(
        "--pair-style",
        default=None,
        choices=["mace no_domain_decomposition", "mace"],
        help="lammps format: 'mace no_domain_decomposition' (default: one MPI rank, fast) or "
        "'mace' (several MPI ranks: domain decomposition)",
    )
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument(
        "--head", help="head of a multi-head base (default and only choice: the adapter's own)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    """The ``mmea-calc`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mmea-calc", description="MMEA adapters for frozen MACE models"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_finetune(sub)
    _add_eval(sub)
    _add_info(sub)
    _add_convert_base(sub)
    _add_demo(sub)
    _add_export(sub)
    _add_calibrate(sub)
    return parser


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mmea-calc``; returns the exit code.

    Commands run with ``sys.stdout`` pointed away (mace prints while loading models; with
    ``--verbose`` that goes to stderr); they write their output to the real stdout given to them.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    stdout = sys.stdout
    # library chatter on stdout is kept off our stdout; shown on stderr with --verbose
    chatter = sys.stderr if args.verbose else io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            return args.func(args, stdout)
        except MmeaCalcError as exc:  # anything else is a bug: let its traceback show
            if args.verbose:
                traceback.print_exc(file=sys.stderr)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            print(f"mmea-calc: error: {message}", file=sys.stderr)
            return EXIT_ERROR


# ---------------------------------------------------------------------------- finetune
def _progress(total: int) -> Any:
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def callback(record: dict[str, Any], module: Any) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(
                total=total, initial=record["epoch"] - 1, unit="epoch", file=sys.stderr
            )
        bar, valid = state["bar"], record["valid"]
        bar.set_postfix(
            loss=f"{record['loss']:.3g}",
            E=f"{valid['energy_mae_meV_per_atom']:.2f}",
            F=f"{valid['forces_mae_meV_per_A']:.1f}",
            best=record["best"],
        )
        bar.update(record["epoch"] - bar.n)

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    callback.close = close  # type: ignore[attr-defined]
    return callback


def _cmd_finetune(args: argparse.Namespace, stdout: TextIO) -> int:
    from mmea_calc.data import DataKeys
    from mmea_calc.files import CHECKPOINT_NAME
    from mmea_calc.train import TrainConfig, fit_adapter

    config = TrainConfig(
        method=args.method,
        rank=args.rank,
        preset=args.preset,
        lora_alpha=args.lora_alpha,
        logit_bound=args.logit_bound,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        energy_weight=args.energy_weight,
        forces_weight=args.forces_weight,
        stress_weight=args.stress_weight,
        valid_fraction=args.valid_fraction,
        patience=args.patience,
        fit_e0s=not args.keep_base_e0s,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        head=args.head,
    )
    out = Path(args.out)
    name = args.name or out.resolve().name.replace(".", "_")
    keys = DataKeys(args.energy_key, args.forces_key, args.stress_key)
    progress = _progress(args.epochs)
    try:
        result = fit_adapter(
            args.base, args.train, args.valid, config, name, keys=keys, out_dir=out,
            resume=args.resume, overwrite=args.overwrite, callback=progress,
        )  # fmt: skip
    except KeyboardInterrupt:
        progress.close()
        if (out / CHECKPOINT_NAME).is_file():
            where = f"the best result so far is in {str(out)!r} (continue with --resume)"
        else:
            where = "nothing was written (no epoch had finished)"
        if os.environ.get("RANK", "0") == "0":
            print(f"mmea-calc: interrupted; {where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.close()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        print(_summary_table(result), file=stdout)
    return 0


def _metrics_table(rows: dict[str, dict[str, float]]) -> str:
    present = [c for c in _METRIC_COLUMNS if any(_METRIC_KEYS[c[0]][0] in r for r in rows.values())]
    header = f"{'':8s}" + "".join(f"{c[1]:>10s}{c[2]:>10s}" for c in present)
    lines = [header]
    for label, metrics in rows.items():
        cells = "".join(
            f"{metrics[_METRIC_KEYS[c[0]][0]]:10.3f}{metrics[_METRIC_KEYS[c[0]][1]]:10.3f}"
            for c in present
        )
        lines.append(f"{label:8s}{cells}")
    lines.append("units: " + ", ".join(f"{c[0]} {c[3]}" for c in present))
    return "\n".join(lines)


def _summary_table(result: Any) -> str:
    head = (
        f"method {result.method}  name {result.name!r}  trainable parameters "
        f"{result.trainable_parameters:,}  status {result.status}  best epoch "
        f"{result.best_epoch}/{result.epochs_completed}  {result.seconds_per_epoch:.2f} s/epoch"
    )
    return "\n".join([head, _metrics_table(result.metrics), f"output: {result.out_dir}"])


# ---------------------------------------------------------------------------- eval
def _check_writable(path: str | None, suffix: str | None = None) -> None:
    if path is None or path == "-":
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {path!r}: folder {str(parent)!r} does not exist")
    if suffix and Path(path).suffix.lower() != suffix:
        raise ConfigError(f"--plot needs a {suffix} file name, got {path!r}")


def _eval_model(args: argparse.Namespace) -> Any:
    from mmea_calc.base import load_base
    from mmea_calc.errors import AdapterFormatError
    from mmea_calc.files import MODEL_NAME
    from mmea_calc.io import is_adapter_dir
    from mmea_calc.model import AdaptedModel

    base = load_base(args.base, device=args.device, dtype=args.dtype)
    if not args.adapter:
        return base
    adapter = Path(args.adapter)
    if not is_adapter_dir(adapter) and (adapter / MODEL_NAME).is_file():
        raise AdapterFormatError(
            f"{args.adapter!r} is a lora/full fine-tune output, not an adapter; evaluate it "
            f"with --base {str(adapter / MODEL_NAME)!r}"
        )
    model = AdaptedModel(base)
    model.load_adapter(adapter)
    return model


def _cmd_eval(args: argparse.Namespace, stdout: TextIO) -> int:
    from mmea_calc.data import DataKeys, has_stress, labelled_graphs, read_structures
    from mmea_calc.data import reference_values as refs
    from mmea_calc.files import atomic_write_json
    from mmea_calc.mace_model import resolve_head
    from mmea_calc.metrics import error_metrics, predict

    _check_writable(args.json)
    _check_writable(args.plot, ".png")
    keys = DataKeys(args.energy_key, args.forces_key, args.stress_key)
    model = _eval_model(args)
    info = getattr(model, "base_info", None) or _base_info(model)
    head = args.head
    if head is None and getattr(model, "adapter_names", None):
        head = model.adapter_head(model.adapter_names[0])
    head = resolve_head(info["heads"], head)
    if getattr(model, "adapter_names", None):
        model.check_head(model.adapter_names, head)
    data = read_structures(args.data, keys, atomic_numbers=info["atomic_numbers"], head=head)
    graphs = labelled_graphs(data, info, head)
    pred = predict(model, graphs, batch_size=args.batch_size, stress=has_stress(data))
    ref = refs(data)
    metrics = error_metrics(pred, ref)
    if args.plot:
        _parity_plot(args.plot, pred, ref)
    table = _metrics_table({"data": metrics}) + f"\nstructures: {metrics['n_structures']}"
    if args.json == "-":
        print(table, file=sys.stderr)
        print(json.dumps(metrics, sort_keys=True), file=stdout)
        return 0
    if args.json:
        atomic_write_json(args.json, metrics)
    print(table, file=stdout)
    return 0


def _base_info(model: Any) -> dict[str, Any]:
    from mmea_calc.identity import base_info

    return base_info(model)


def _parity_plot(path: str, pred: dict[str, Any], ref: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from mmea_calc.files import atomic_write_bytes

    fig = Figure(figsize=(9, 4.2))
    panels = [
        (
            pred["energy"] / ref["num_atoms"],
            ref["energy"] / ref["num_atoms"],
            "energy (eV/atom)",
        ),
        (pred["forces"].reshape(-1), ref["forces"].reshape(-1), "force component (eV/Å)"),
    ]
    for index, (p, r, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, index + 1)
        ax.scatter(r, p, s=4, alpha=0.5)
        lo, hi = float(min(r.min(), p.min())), float(max(r.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------- convert-base
def _cmd_convert_base(args: argparse.Namespace, stdout: TextIO) -> int:
    from mmea_calc.base import load_base
    from mmea_calc.base_format import write_base_dir
    from mmea_calc.files import BASE_WEIGHTS_NAME
    from mmea_calc.identity import base_info

    out = Path(args.outdir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.overwrite:
        raise ConfigError(
            f"{args.outdir!r} exists and is not empty; pass --overwrite to replace it"
        )
    if not Path(args.model).is_file():
        raise ConfigError(f"{args.model!r} is not a file (expected a mace .model file)")
    model = load_base(args.model, dtype=args.dtype)
    write_base_dir(model, out, overwrite=args.overwrite)
    info = base_info(model)
    size = (out / BASE_WEIGHTS_NAME).stat().st_size
    print(
        f"wrote {out}: {info['model_class']} {str(next(model.parameters()).dtype)[6:]}, "
        f"elements {' '.join(_symbols(info['atomic_numbers']))}, hidden {info['hidden_irreps']}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {size / 1e6:.2f} MB, "
        f"fingerprint {info['fingerprint'][:12]}",
        file=stdout,
    )
    return 0


def _symbols(numbers: Sequence[int]) -> list[str]:
    import ase.data

    return [ase.data.chemical_symbols[z] for z in numbers]


# ---------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace, stdout: TextIO) -> int:
    import torch

    from mmea_calc.demo import run_demo

    if not args.threads:  # small systems: one thread is fastest, and robust on a busy machine
        torch.set_num_threads(1)
    run_demo(
        args.assets,
        quick=args.quick,
        out=stdout,
        progress=None if args.no_progress else sys.stderr,
        seed=args.seed,
    )
    return 0


# ---------------------------------------------------------------------------- info
def _cmd_info(args: argparse.Namespace, stdout: TextIO) -> int:
    from mmea_calc.describe import describe_path

    info = describe_path(args.path)
    if args.json:
        print(json.dumps(info, sort_keys=True), file=stdout)
        return 0
    print(_info_text(info), file=stdout)
    return 0


def _info_text(info: dict[str, Any]) -> str:
    lines = []
    keys = ("path", "kind", "method", "preset", "name", "rank", "lora_alpha", "logit_bound")
    keys = (*keys, "calibrated")
    keys = (*keys, "routing_statistics")
    for key in (*keys, "trainable_parameters", "fingerprint", "head"):
        if info.get(key) is not None:
            lines.append(f"{key:22s}{info[key]}")
    if info.get("heads"):
        lines.append(f"{'heads (of the base)':22s}{' '.join(info['heads'])}")
    parts = info.get("trainable_parameters_per_part") or {}
    if len(parts) > 1:
        lines.append(f"{'  per part':22s}" + ", ".join(f"{k} {v}" for k, v in parts.items()))
    lines.append(f"{'elements':22s}{' '.join(info.get('elements') or [])}")
    targets = info.get("targets") or []
    if targets:
        lines.append(f"{'targets':22s}{len(targets)}: {', '.join(targets)}")
    training = info.get("training") or {}
    for key in ("status", "epochs_completed", "best_epoch", "seconds_per_epoch"):
        if training.get(key) is not None:
            lines.append(f"{key:22s}{training[key]}")
    if training.get("metrics"):
        lines.append(_metrics_table(training["metrics"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- calibrate
def _cmd_calibrate(args: argparse.Namespace, stdout: TextIO) -> int:
    from mmea_calc.data import read_atoms
    from mmea_calc.errors import UncalibratedAdapterWarning
    from mmea_calc.model import AdaptedModel
    from mmea_calc.selection import describe_environment
    from mmea_calc.train import calibrate_adapter

    model = AdaptedModel(args.base, dtype=args.dtype)
    with warnings.catch_warnings():  # recording the ranges is the fix the warning asks for
        warnings.simplefilter("ignore", UncalibratedAdapterWarning)
        name = model.load_adapter(args.adapter)
    ranges = calibrate_adapter(model, name, args.data)
    # the environment (auto selection, per-atom routing statistics) from the same data
    environment = describe_environment(model, read_atoms(args.data))
    model.save_adapter(name, args.adapter, environment=environment)
    print(f"recorded gate ranges of {len(ranges)} linears and the neighbourhood statistics of "
          f"adapter {name!r} in {args.adapter}", file=stdout)  # fmt: skip
    return 0


# ---------------------------------------------------------------------------- export
def _cmd_export(args: argparse.Namespace, stdout: TextIO) -> int:
    from mmea_calc.export import export_lammps, export_mliap, lammps_input_lines, sidecar_path
    from mmea_calc.files import atomic_write_bytes
    from mmea_calc.model import AdaptedModel

    if args.input:
        _check_writable(args.input)
    model = AdaptedModel(args.base, dtype=args.dtype)  # the adapter loads in the export dtype
    name = model.load_adapter(args.adapter) if args.adapter else None
    export = export_lammps if args.format == "lammps" else export_mliap
    info = export(
        model, name, args.out, elements=args.elements, dtype=args.dtype, head=args.head,
        overwrite=args.overwrite,
    )  # fmt: skip
    # the model path as LAMMPS resolves it: from the folder it runs in, the input file's
    model_path = os.path.relpath(args.out, Path(args.input).parent) if args.input else args.out
    lines = lammps_input_lines(
        args.format, model_path, info["elements"], data_file=args.data_file,
        pair_style=args.pair_style,
    )  # fmt: skip
    text = "\n".join(lines) + "\n"
    if args.input:
        atomic_write_bytes(args.input, text.encode())
    what = f"adapter {name!r}" if name else "the bare base (no adapter)"
    print(
        f"# wrote {args.out} ({args.format}, {info['dtype']}, {what}, base "
        f"{info['base']['fingerprint'][:12]}) and {sidecar_path(args.out)}"
        + (f"; input in {args.input}" if args.input else ""),
        file=stdout,
    )
    print(text, end="", file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
