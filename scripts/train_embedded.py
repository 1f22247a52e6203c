"""Train the embedded base model and its two environment adapters; measure them.

Stages (``--stage``; ``all`` runs them in order):

* ``base``: a small ScaleShiftMACE (hidden irreps ``32x0e+32x1o``, 2 interactions, r_max 5 Å,
  correlation 3, elements H C N O; E0s from a least-squares fit of the base training energies;
  ``avg_num_neighbors``, shift and scale from the base training set) trained from scratch on the
  GFN2-xTB base set only, with our trainer in ``full`` mode. Written with ``torch.save`` to
  ``build/embedded/base.model`` (a pickle, so not shipped: convert it with ``mmea-calc
  convert-base build/embedded/base.model mmea_calc/embedded/base --overwrite``);
* ``adapters``: rank-16 MMEA adapters trained with ``mmea-calc finetune`` (subprocesses in
  parallel, sharing ``--threads``) on liquid water and on hot aspirin (plus the distorted aspirin
  frames with σ <= ``--max-distortion``, ``aspirin_distorted_*.xyz``, when ``--data`` has
  them), written to
  ``mmea_calc/embedded/adapters/{water,aspirin}``. The base is ``--base``: by default the
  package's shipped base (``mmea_calc/embedded/base``), so a fresh checkout can retrain the
  adapters without the ``base`` stage;
* ``eval``: ``mmea-calc eval --json -`` of the base and of each adapter on each environment's
  held-out test split (and on the distorted aspirin test split when present), and an
  auto-selection check with ``MMEACalculator(select="auto")`` on those held-out frames; written
  to ``benchmarks/results/embedded.json``.

Data come from ``scripts/make_xtb_data.py`` (``data/``). Usage::

    python scripts/train_embedded.py --stage all
    python scripts/train_embedded.py --stage base --epochs 2 --build /tmp/emb --quick  # smoke test
    python scripts/train_embedded.py --stage adapters --envs water --adapter-epochs 40 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # default of --data
BASE = ROOT / "mmea_calc" / "embedded" / "base"  # default of --base (the shipped, safe format)
ADAPTERS = ROOT / "mmea_calc" / "embedded" / "adapters"
RESULTS = ROOT / "benchmarks" / "results" / "embedded.json"
ELEMENTS = (1, 6, 7, 8)
ENVIRONMENTS = ("water", "aspirin")
#: the commands that made the committed data, base model, adapters and results (2 CPU cores)
REPRODUCE = [
    "OMP_NUM_THREADS=1 python scripts/make_xtb_data.py --sets base --out data",
    "OMP_NUM_THREADS=1 python scripts/make_xtb_data.py --sets aspirin --out data",
    "OMP_NUM_THREADS=1 python scripts/make_xtb_data.py --sets water --water-frames 48 "
    "--n-test 20 --n-valid 6 --out data",
    "OMP_NUM_THREADS=1 python scripts/make_xtb_data.py --sets aspirin_distorted --out data",
    "OMP_NUM_THREADS=1 python scripts/make_xtb_data.py --sets solvated --out data",
    "python scripts/train_embedded.py --stage base --epochs 60 --threads 2",
    "mmea-calc convert-base build/embedded/base.model mmea_calc/embedded/base --overwrite",
    "python scripts/train_embedded.py --stage adapters --envs aspirin --adapter-epochs 60 "
    "--threads 1  # the shipped aspirin adapter: trained before the distorted frames existed "
    "(retraining with them, sigma <= 0.1 or 0.2 A, made its MD test error worse: BENCHMARKS.md)",
    "python scripts/train_embedded.py --stage adapters --envs water --adapter-epochs 90 "
    "--threads 1 --adapters build/embedded/adapters  # then copied into the package",
    "mmea-calc calibrate mmea_calc/embedded/adapters/aspirin --base mmea_calc/embedded/base "
    "--data data/aspirin_train.xyz",
    "mmea-calc calibrate mmea_calc/embedded/adapters/water --base mmea_calc/embedded/base "
    "--data data/water_train.xyz",
    "python scripts/train_embedded.py --stage eval",
]


# ---------------------------------------------------------------------------- statistics
def fit_e0s(atoms_list: list) -> dict[int, float]:
    """Least-squares per-element energies (eV) of the reference energies."""
    counts = np.array([[np.sum(a.numbers == z) for z in ELEMENTS] for a in atoms_list], float)
    energies = np.array([a.info["REF_energy"] for a in atoms_list])
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {z: float(v) for z, v in zip(ELEMENTS, e0, strict=True)}


def data_statistics(atoms_list: list, e0s: dict[int, float], r_max: float) -> dict[str, float]:
    """Average neighbour count within ``r_max``, mean interaction energy per atom, RMS force."""
    from ase.neighborlist import neighbor_list

    neighbours = sum(len(neighbor_list("i", a, r_max)) for a in atoms_list)
    n_atoms = sum(len(a) for a in atoms_list)
    inter = [
        (a.info["REF_energy"] - sum(e0s[int(z)] for z in a.numbers)) / len(a) for a in atoms_list
    ]
    forces = np.concatenate([a.arrays["REF_forces"].reshape(-1) for a in atoms_list])
    return {
        "avg_num_neighbors": neighbours / n_atoms,
        "shift": float(np.mean(inter)),
        "scale": float(np.sqrt(np.mean(forces**2))),
    }


# ---------------------------------------------------------------------------- base model
def build_base(stats: dict[str, float], e0s: dict[int, float], args: argparse.Namespace):
    """The untrained ScaleShiftMACE (float64), seeded."""
    import torch

    from mmea_calc._deps import mace, o3

    ScaleShiftMACE = mace.modules.ScaleShiftMACE
    interaction_classes = mace.modules.interaction_classes
    torch_tools = mace.tools.torch_tools

    with torch.random.fork_rng(), torch_tools.default_dtype(torch.float64):
        torch.manual_seed(args.seed)
        return ScaleShiftMACE(
            r_max=args.r_max,
            num_bessel=8,
            num_polynomial_cutoff=5,
            max_ell=args.max_ell,
            interaction_cls=interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2,
            num_elements=len(ELEMENTS),
            hidden_irreps=o3.Irreps(args.hidden_irreps),
            MLP_irreps=o3.Irreps("16x0e"),
            gate=torch.nn.functional.silu,
            atomic_energies=np.array([e0s[z] for z in ELEMENTS]),
            avg_num_neighbors=stats["avg_num_neighbors"],
            atomic_numbers=list(ELEMENTS),
            correlation=3,
            radial_MLP=[32, 32, 32],
            atomic_inter_scale=stats["scale"],
            atomic_inter_shift=stats["shift"],
        )


def stage_base(args: argparse.Namespace) -> None:
    import torch

    from mmea_calc import TrainConfig, fit_adapter

    torch.set_num_threads(args.threads)
    train = ase.io.read(args.data / "base_train.xyz", ":")
    valid = ase.io.read(args.data / "base_valid.xyz", ":")
    if args.quick:
        train, valid = train[:40], valid[:10]
    e0s = fit_e0s(train)
    stats = data_statistics(train, e0s, args.r_max)
    print(f"E0s {e0s}\nstatistics {stats}")
    model = build_base(stats, e0s, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ScaleShiftMACE {args.hidden_irreps}: {n_params} parameters")
    config = TrainConfig(
        method="full",
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        energy_weight=args.energy_weight,
        forces_weight=args.forces_weight,
        scheduler_patience=5,
        patience=None,
        ema_decay=0.99,
        fit_e0s=False,  # the E0s above come from the same data: nothing left to refit
        seed=args.seed,
        dtype="float64",
        eval_batch_size=32,
    )
    start = time.perf_counter()
    result = fit_adapter(
        model,
        train,
        valid,
        config,
        name="embedded_base",
        overwrite=True,
        out_dir=args.build / "base_run",
        callback=_print_epoch,
    )
    seconds = time.perf_counter() - start
    out = args.build / "base.model"
    torch.save(result.model.to(torch.float64), out)
    summary = {
        "parameters": n_params,
        "hidden_irreps": args.hidden_irreps,
        "max_ell": args.max_ell,
        "r_max": args.r_max,
        "e0s": {str(z): v for z, v in e0s.items()},
        "statistics": stats,
        "train_frames": len(train),
        "valid_frames": len(valid),
        "config": config.to_dict(),
        "seconds": round(seconds, 1),
        "epochs_completed": result.epochs_completed,
        "best_epoch": result.best_epoch,
        "metrics": result.metrics,
    }
    (args.build / "base_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} after {seconds:.0f} s: {json.dumps(result.metrics)}")


def _print_epoch(record: dict, module) -> None:
    valid = record.get("valid", {})
    print(
        f"epoch {record.get('epoch')}: loss {record.get('loss', float('nan')):.4g} "
        f"E {valid.get('energy_rmse_meV_per_atom', float('nan')):.2f} meV/atom "
        f"F {valid.get('forces_rmse_meV_per_A', float('nan')):.1f} meV/Å "
        f"({record.get('seconds', 0):.1f} s)",
        flush=True,
    )


# ---------------------------------------------------------------------------- adapters
def training_files(env: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """The train and valid files of ``env``: for aspirin, joined with the distorted frames
    (written to ``--build``) when ``--data`` has them."""
    files = []
    for part in ("train", "valid"):
        path = args.data / f"{env}_{part}.xyz"
        extra = args.data / f"{env}_distorted_{part}.xyz"
        if extra.is_file():
            joined = args.build / f"{env}_with_distorted_{part}.xyz"
            distorted = [
                a
                for a in ase.io.read(extra, ":")
                if a.info.get("sigma_A", 0.0) <= args.max_distortion + 1e-9
            ]
            frames = ase.io.read(path, ":") + distorted
            ase.io.write(joined, frames, format="extxyz")
            print(
                f"{joined}: {len(frames)} frames ({path.name} + {len(distorted)} of "
                f"{extra.name} with σ <= {args.max_distortion} Å)"
            )
            path = joined
        files.append(path)
    return files[0], files[1]


def finetune_command(env: str, args: argparse.Namespace, threads: int) -> list[str]:
    train, valid = training_files(env, args)
    return [
        "mmea-calc", "--threads", str(threads), "finetune",
        "--base", str(args.base),
        "--train", str(train),
        "--valid", str(valid),
        "--out", str(args.adapters / env),
        "--rank", str(args.rank),
        "--epochs", str(args.adapter_epochs),
        "--lr", "5e-3",
        "--energy-weight", str(args.adapter_energy_weight),
        "--forces-weight", "1000",
        "--stress-weight", "1000",
        "--patience", "1000",
        "--seed", str(args.seed),
        "--overwrite",
    ]  # fmt: skip


def stage_adapters(args: argparse.Namespace) -> None:
    threads = max(1, args.threads // len(args.envs))  # the runs share the cores
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = {}
    for name in args.envs:
        command = finetune_command(name, args, threads)
        print(" ".join(command))
        log = open(args.build / f"finetune_{name}.log", "w")  # closed below
        procs[name] = (
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
            log,
        )
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(name)
        log.close()
    if failed:
        sys.exit(f"finetune failed for {failed}: see {args.build}/finetune_*.log")
    for name in args.envs:  # the resume checkpoint (optimizer state) is not shipped
        (args.adapters / name / "checkpoint.safetensors").unlink(missing_ok=True)


# ---------------------------------------------------------------------------- evaluation
def eval_command(env: str, adapter: str | None, args: argparse.Namespace) -> list[str]:
    command = ["mmea-calc", "eval", "--base", str(args.base)]
    if adapter:
        command += ["--adapter", str(args.adapters / adapter)]
    return [*command, "--data", str(args.data / f"{env}_test.xyz"), "--json", "-"]


def check_selection(args: argparse.Namespace) -> dict:
    """Which adapter ``select="auto"`` serves each held-out frame of each environment."""
    from mmea_calc import MMEACalculator

    calc = MMEACalculator(
        base=str(args.base),
        adapters=[str(args.adapters / env) for env in ENVIRONMENTS],
        select="auto",
    )
    out = {}
    for env in ENVIRONMENTS:
        chosen, distances = [], []
        for atoms in ase.io.read(args.data / f"{env}_test.xyz", ":"):
            atoms.calc = calc
            atoms.get_potential_energy()
            chosen.append(calc.results["adapter"])
            distances.append(calc.results.get("adapter_distance"))
            calc.reselect()  # judge every frame on its own, not by the sticky first choice
        out[env] = {
            "frames": len(chosen),
            "correct": sum(c == env for c in chosen),
            "chosen": {str(c): chosen.count(c) for c in sorted(set(chosen), key=str)},
            "distance_median": float(
                np.median([d for d in distances if d is not None] or [np.nan])
            ),
        }
    return out


def stage_eval(args: argparse.Namespace) -> None:
    results: dict = {
        "command": "python scripts/train_embedded.py " + " ".join(sys.argv[1:]),
        "reproduce": REPRODUCE,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "errors": {},
    }
    for env in ENVIRONMENTS:
        results["errors"][env] = {}
        for adapter in (None, env):
            command = eval_command(env, adapter, args)
            print(" ".join(command))
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results["errors"][env][adapter or "base"] = json.loads(done.stdout)
    if (args.data / "aspirin_distorted_test.xyz").is_file():
        results["errors"]["aspirin_distorted"] = {}
        for adapter in (None, "aspirin"):
            command = eval_command("aspirin_distorted", adapter, args)
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results["errors"]["aspirin_distorted"][adapter or "base"] = json.loads(done.stdout)
    command = eval_command("base", None, args)
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    results["errors"]["base_set"] = {"base": json.loads(done.stdout)}
    results["selection"] = check_selection(args)
    path = args.build / "base_summary.json"
    if path.is_file():
        results["base_training"] = json.loads(path.read_text())
    elif args.results.is_file():  # the base was not retrained here: keep its record
        results["base_training"] = json.loads(args.results.read_text()).get("base_training")
    for env in ENVIRONMENTS:
        training = args.adapters / env / "training.json"
        if training.is_file():
            results.setdefault("adapter_training", {})[env] = json.loads(training.read_text())
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"errors": results["errors"], "selection": results["selection"]}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="all", choices=["base", "adapters", "eval", "all"])
    parser.add_argument("--data", type=Path, default=DATA, help="make_xtb_data.py's output")
    parser.add_argument("--build", type=Path, default=ROOT / "build" / "embedded")
    parser.add_argument(
        "--base", type=Path, default=BASE, help="base of the adapters (stages adapters, eval)"
    )
    parser.add_argument("--adapters", type=Path, default=ADAPTERS)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--hidden-irreps", default="32x0e+32x1o")
    parser.add_argument("--max-ell", type=int, default=2)
    parser.add_argument("--r-max", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=60, help="base training epochs")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--energy-weight", type=float, default=1000.0)
    parser.add_argument("--forces-weight", type=float, default=100.0)
    parser.add_argument(
        "--envs",
        nargs="+",
        default=list(ENVIRONMENTS),
        choices=ENVIRONMENTS,
        help="adapters to train (stage adapters)",
    )
    parser.add_argument(
        "--max-distortion",
        type=float,
        default=0.1,
        help="largest displacement width (Å) of the distorted aspirin frames trained on",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapter-epochs", type=int, default=40)
    parser.add_argument("--adapter-energy-weight", type=float, default=10000.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few frames (a smoke test)")
    args = parser.parse_args()
    args.build.mkdir(parents=True, exist_ok=True)
    stages = ["base", "adapters", "eval"] if args.stage == "all" else [args.stage]
    for stage in stages:
        {"base": stage_base, "adapters": stage_adapters, "eval": stage_eval}[stage](args)


if __name__ == "__main__":
    main()
