"""Training: :func:`fit_adapter` for MMEA adapters and, under the same trainer, the comparison
methods (mace-torch's equivariant LoRA and full fine-tuning).

One trainer serves every method: weighted MSE of energy per atom, forces and stress; Adam
(amsgrad), ReduceLROnPlateau, an exponential moving average (EMA) of the trained tensors and
gradient clipping; the best epoch on validation is kept, judged by a criterion that includes the
energy error (``criterion_energy_weight * E_rmse[meV/atom] + F_rmse[meV/Å] (+ S_rmse[meV/Å³])``)
so that the energy cannot drift unseen under the default forces weight of 1000. Only trained
tensors get gradients and optimizer state. A per-element energy correction is fitted to the
residual of the base model on the training set before training (:func:`~mmea_calc.data.
fit_e0_correction`) and stored with the result.

With an output directory, a checkpoint is written atomically after every epoch, ``resume=True``
continues from it exactly (same result as an uninterrupted run), and Ctrl-C (``KeyboardInterrupt``)
writes the best result so far before re-raising.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase
import ase.io
import numpy as np
import torch

from mmea_calc import _trainer, distributed
from mmea_calc._deps import lora, torch_tools
from mmea_calc._version import __version__
from mmea_calc.base import base_info, load_base, resolve_dtype
from mmea_calc.config import PRESETS
from mmea_calc.data import (
    DataKeys,
    atoms_to_graph,
    collate,
    data_hash,
    fit_e0_correction,
    has_stress,
    label_structures,
    labelled_graphs,
    read_atoms,
    read_structures,
    reference_values,
    split_structures,
)
from mmea_calc.errors import ConfigError, DataError, OutputExistsError
from mmea_calc.files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    CHECKPOINT_NAME,
    MODEL_NAME,
    TRAINING_NAME,
    atomic_write_bytes,
    atomic_write_json,
)
from mmea_calc.identity import fingerprints
from mmea_calc.mace_model import atomic_energies, fold_e0_corrections, resolve_head
from mmea_calc.metrics import error_metrics, predict
from mmea_calc.model import AdaptedModel, MMEAConfig
from mmea_calc.selection import describe_environment

__all__ = [
    "METHODS",
    "FitResult",
    "OutputExistsError",
    "TrainConfig",
    "calibrate_adapter",
    "error_metrics",
    "fit_adapter",
    "predict",
]

logger = logging.getLogger(__name__)

METHODS = ("mmea", "lora", "full")
OUTPUT_FILES = (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    TRAINING_NAME,
    MODEL_NAME,
    CHECKPOINT_NAME,
)


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tuning run.

    Defaults as in mace-torch's ``mace_run_train`` (mace-torch 0.3.16): energy and stress
    weights 1, Adam with amsgrad, ``lr_factor`` 0.8, ``scheduler_patience`` 50, EMA decay 0.99,
    gradient clipping at 10, validation fraction 0.1. Ours where mace's differ, for small
    fine-tuning sets (tens to hundreds of structures) rather than training from scratch:
    ``lr`` 5e-3 (mace 1e-2), ``batch_size`` 5 (10), ``forces_weight`` 1000 (100; fine-tuning
    is judged on forces, and the energy is guarded by the validation criterion below and the
    per-epoch E0 refit), ``weight_decay`` 0 (5e-7: adapters start at identity and are not
    decayed towards zero weights), ``epochs`` 200 and ``patience`` 100 (2048 and 2048).

    Attributes:
        method: ``"mmea"`` (an adapter), ``"lora"`` (mace-torch's equivariant LoRA) or
            ``"full"`` (every weight of the model).
        rank: MMEA bottleneck rank, or LoRA rank.
        phi, targets, logit_bound: MMEA gate map, target patterns and soft bound on gate logits
            (see :class:`~mmea_calc.MMEAConfig`).
        preset: MMEA only: ``"gates"`` (the gates alone) or ``"paper"`` (also what the MMEA
            authors train: :mod:`mmea_calc.paper`).
        lora_alpha: LoRA scaling numerator (``scaling = alpha / rank``) of method ``lora`` and
            of the ``paper`` preset's LoRA parts. ``None`` (default): mace-torch's default 1
            for ``lora`` (a rank-``r`` update then moves by ``1/r``: pass ``lora_alpha=rank``
            for a fair comparison), ``rank`` for ``paper`` (the authors' 16 at rank 16).
        epochs, lr, batch_size: the schedule (Adam with amsgrad by default).
        energy_weight, forces_weight, stress_weight: loss weights of the MSE of energy per atom
            (eV/atom), forces (eV/Å) and stress (eV/Å³).
        lr_factor, scheduler_patience: ReduceLROnPlateau on the validation criterion.
        ema_decay: EMA decay of the trained tensors (``None`` disables the EMA).
        clip_grad: max gradient norm (``None`` disables clipping).
        patience: stop after this many epochs without a better validation criterion.
        criterion_energy_weight: weight of the energy RMSE in the validation criterion.
        valid_fraction: validation share when no validation set is given (seeded split).
        fit_e0s: fit a per-element energy correction to the base model's residual.
        e0_ridge: ridge strength of that fit (see :func:`~mmea_calc.data.fit_e0_correction`).
        seed: seeds the adapter's initialisation and the batch order.
        head: the head of a multi-head base to train on (as mace's ``--head``); ``None``: a
            single-head base's head or a ``Default`` head (else a ``ConfigError`` lists the
            heads). The adapter records it; its E0 corrections are that head's.
        device, dtype: where training runs. ``None`` (default): a given model stays where it
            is and keeps its dtype; a model file is loaded onto the CPU in float64. A value
            moves or converts the model (a given module in place: asked for, not silent).

    Example:
        >>> config = TrainConfig(method="lora", rank=4, epochs=60)
        >>> config.forces_weight, config.amsgrad
        (1000.0, True)
    """

    method: str = "mmea"
    rank: int = 16
    phi: str = "exp"
    targets: list[str] | None = None
    logit_bound: float | None = 10.0
    preset: str = "gates"
    lora_alpha: float | None = None
    epochs: int = 200
    lr: float = 5e-3
    batch_size: int = 5
    energy_weight: float = 1.0
    forces_weight: float = 1000.0
    stress_weight: float = 1.0
    weight_decay: float = 0.0
    amsgrad: bool = True
    lr_factor: float = 0.8
    scheduler_patience: int = 50
    ema_decay: float | None = 0.99
    clip_grad: float | None = 10.0
    patience: int | None = 100
    criterion_energy_weight: float = 1.0
    valid_fraction: float = 0.1
    fit_e0s: bool = True
    e0_ridge: float = 1e-4
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    eval_batch_size: int = 16
    head: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not supported; valid: {list(METHODS)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"preset {self.preset!r} is not known; valid: {list(PRESETS)}")
        if self.preset != "gates" and self.method != "mmea":
            raise ConfigError(f"preset {self.preset!r} is for method 'mmea', not {self.method!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0 or None, got {self.lora_alpha!r}")
        if self.lora_alpha is not None and self.method != "lora" and self.preset != "paper":
            raise ConfigError(
                f"lora_alpha applies to method 'lora' and preset 'paper', not to method "
                f"{self.method!r} with preset {self.preset!r}"
            )
        positive = ("rank", "epochs", "batch_size", "eval_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        weights = (self.energy_weight, self.forces_weight, self.stress_weight)
        if min(weights) < 0 or sum(weights) == 0:
            raise ConfigError(f"loss weights must be >= 0 and not all 0, got {weights}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ConfigError(f"patience must be a positive integer or None, got {self.patience!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        resolve_dtype(self.dtype)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError(f"device {self.device!r} is not a torch device: {exc}") from None
        if isinstance(self.targets, str):
            self.targets = [self.targets]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FitResult:
    """What :func:`fit_adapter` returns.

    Attributes:
        method, name: the method and the adapter (or run) name.
        model: the :class:`~mmea_calc.AdaptedModel` holding the trained adapter (``mmea``), or
            the fine-tuned MACE module (``lora`` with LoRA merged, ``full``).
        trainable_parameters: number of trained scalars (for LoRA: before merging).
        metrics: final ``{"train": {...}, "valid": {...}}`` errors (see :func:`error_metrics`).
        history: one record per epoch (loss, learning rate, validation errors, seconds).
        e0s: the fitted per-element energy correction (eV by atomic number), or ``None``.
        best_epoch, epochs_completed, status: ``status`` is ``"complete"``, ``"early-stopped"``
            or ``"interrupted"``.

    Example (``result`` from the :func:`fit_adapter` example)::

        result.metrics["valid"]["forces_mae_meV_per_A"], result.trainable_parameters
    """

    method: str
    name: str
    model: torch.nn.Module
    trainable_parameters: int
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]]
    e0s: dict[int, float] | None
    best_epoch: int
    epochs_completed: int
    status: str
    seconds_per_epoch: float
    out_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------- methods
class _Subject:
    """The thing being trained: a module to call, its trained tensors and how to export it."""

    method = ""

    def __init__(self, module: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> None:
        self.module = module
        self.params = params
        self.e0s: dict[int, float] | None = None

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(state[key])

    def set_e0s(self, e0s: dict[int, float] | None) -> None:
        """Set the per-element energy correction (eV) on top of the base model's E0s."""
        self.e0s = dict(e0s) if e0s else None


class _MMEASubject(_Subject):
    method = "mmea"

    def __init__(self, model: AdaptedModel, name: str) -> None:
        super().__init__(model, dict(model.named_adapter_parameters(name)))
        self.name = name

    def set_e0s(self, e0s: dict[int, float] | None) -> None:
        super().set_e0s(e0s)
        self.module.set_adapter_e0s(self.name, self.e0s)

    def export(self, out_dir: Path, environment: dict[str, Any], training: dict[str, Any]) -> None:
        self.module.save_adapter(self.name, out_dir, environment=environment, training=training)

    def result_model(self) -> torch.nn.Module:
        return self.module

    def calibrate(self, graphs: Sequence[Any], batch_size: int) -> None:
        """Record the gates' ranges on the training graphs (nothing changes on them)."""
        self.module.calibrate_adapter(self.name, _batches(self.module, graphs, batch_size))


class _WholeModelSubject(_Subject):
    """``lora`` (mace-torch's LoRA wrappers) or ``full`` (every parameter of a copy)."""

    def __init__(self, model: torch.nn.Module, method: str, head: str) -> None:
        self.method = method
        super().__init__(model, {k: p for k, p in model.named_parameters() if p.requires_grad})
        self._base_e0s = atomic_energies(model).detach().clone()
        self._head = head

    def set_e0s(self, e0s: dict[int, float] | None) -> None:
        """Fold the correction into ``atomic_energies`` (the trained head's row only)."""
        super().set_e0s(e0s)
        with torch.no_grad():
            atomic_energies(self.module).copy_(self._base_e0s)
        fold_e0_corrections(self.module, self.e0s, self._head)

    def result_model(self) -> torch.nn.Module:
        model = self.module
        if self.method == "lora":
            model = lora.merge_lora_weights(model, inplace=False)
        else:
            model = copy.deepcopy(model)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    def export(self, out_dir: Path, environment: dict[str, Any], training: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(self.result_model(), buffer)  # mace's own format: a pickled module
        atomic_write_bytes(out_dir / MODEL_NAME, buffer.getvalue())


def _make_subject(
    model: AdaptedModel | torch.nn.Module,
    config: TrainConfig,
    name: str,
    e0s: dict[int, float] | None,
    head: str,
) -> _Subject:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(config.seed)
        if config.method == "mmea":
            mmea = MMEAConfig(
                rank=config.rank,
                phi=config.phi,
                targets=config.targets,
                logit_bound=config.logit_bound,
                preset=config.preset,
                lora_alpha=config.lora_alpha,
            )
            model.add_adapter(name, mmea, head=head)
            subject: _Subject = _MMEASubject(model, name)
        else:
            base = copy.deepcopy(model)
            if config.method == "lora":
                alpha = 1.0 if config.lora_alpha is None else config.lora_alpha  # mace's default
                # mace draws LoRA's initial weights in torch's default dtype (then converts):
                # pin it, so the fit does not depend on what the caller's process set
                with torch_tools.default_dtype(torch.float32):
                    lora.inject_LoRAs(base, rank=config.rank, alpha=alpha)
            else:
                for param in base.parameters():
                    param.requires_grad_(True)
            subject = _WholeModelSubject(base, config.method, head)
    subject.set_e0s(e0s)
    return subject


# ---------------------------------------------------------------------------- inputs
def _prepare_model(
    model_or_base: Any, config: TrainConfig, name: str
) -> AdaptedModel | torch.nn.Module:
    """An AdaptedModel (``mmea``) or a frozen MACE base (``lora``/``full``), placed as asked."""
    if isinstance(model_or_base, AdaptedModel):
        if config.method == "mmea" and name in model_or_base.adapter_names:
            raise ConfigError(
                f"the model already holds an adapter named {name!r}; pick another name"
            )
        if config.method != "mmea" and model_or_base.adapter_names:
            raise ConfigError(
                f"method {config.method!r} fine-tunes the base itself: pass the bare base, "
                f"not an AdaptedModel holding adapters {model_or_base.adapter_names}"
            )
        if config.device is not None or config.dtype is not None:
            model_or_base.to(device=config.device, dtype=resolve_dtype(config.dtype))
        model: Any = model_or_base
        return model if config.method == "mmea" else model.base_model
    dtype = config.dtype
    if dtype is None and not isinstance(model_or_base, torch.nn.Module):
        dtype = "float64"  # a file: train in double precision unless told otherwise
    base = load_base(model_or_base, device=config.device, dtype=dtype)
    return AdaptedModel(base) if config.method == "mmea" else base


def _labelled(
    data: str | os.PathLike | Sequence[ase.Atoms],
    keys: DataKeys | None,
    atomic_numbers: Sequence[int],
    what: str,
    head: str,
) -> list[ase.Atoms]:
    if isinstance(data, str | os.PathLike):
        return read_structures(data, keys, atomic_numbers=atomic_numbers, head=head)
    return label_structures(list(data), keys, atomic_numbers=atomic_numbers, source=what, head=head)


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other")
    checkpoint = out_dir / CHECKPOINT_NAME
    if resume:
        if not checkpoint.is_file():
            raise OutputExistsError(
                f"cannot resume: {str(checkpoint)!r} does not exist (start without resume)"
            )
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output path {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory {str(out_dir)!r} is not empty; pass overwrite (--overwrite) to "
            "replace its results or resume (--resume) to continue its run"
        )


def _clear_outputs(out_dir: Path) -> None:
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- fit_adapter
def fit_adapter(
    model_or_base: AdaptedModel | torch.nn.Module | str | os.PathLike,
    train: str | os.PathLike | Sequence[ase.Atoms],
    valid: str | os.PathLike | Sequence[ase.Atoms] | None = None,
    config: TrainConfig | None = None,
    name: str | None = None,
    *,
    keys: DataKeys | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callable[[dict[str, Any], torch.nn.Module], None] | None = None,
) -> FitResult:
    """Fine-tune a frozen MACE base on reference data with MMEA (or LoRA / full, to compare).

    Args:
        model_or_base: an :class:`~mmea_calc.AdaptedModel` (the adapter is added to it), a MACE
            module, or a mace ``.model`` path.
        train: labelled structures (see :class:`~mmea_calc.data.DataKeys`) or a file path.
        valid: the same for validation; ``None`` splits ``config.valid_fraction`` off ``train``.
        config: the hyper-parameters; default :class:`TrainConfig`.
        name: adapter name; defaults to the output directory's name (``.`` becomes ``_``), else
            ``"adapter"``.
        keys: where the reference values are in the structures.
        out_dir: where results and the per-epoch checkpoint go (``None``: nothing is written).
        resume: continue the run checkpointed in ``out_dir``.
        overwrite: replace the results in a non-empty ``out_dir``.
        callback: called as ``callback(record, module)`` after every epoch.

    Returns:
        A :class:`FitResult`; the trained tensors hold the best (EMA) weights on validation.

    Raises:
        DataError, UnsupportedElementError: bad data (nothing is written).
        OutputExistsError: ``out_dir`` holds results and neither ``overwrite`` nor ``resume``.
        KeyboardInterrupt: re-raised after the best result so far has been written (nothing
            is written when no epoch had finished).

    Example:
        >>> from mmea_calc.testing import build_tiny_mace, random_cluster
        >>> from ase.calculators.emt import EMT
        >>> data = [random_cluster(6, ("C", "O"), seed=s) for s in range(4)]
        >>> for atoms in data:
        ...     atoms.calc = EMT()
        ...     atoms.info["REF_energy"] = atoms.get_potential_energy()
        ...     atoms.arrays["REF_forces"] = atoms.get_forces()
        >>> result = fit_adapter(build_tiny_mace(), data, config=TrainConfig(rank=2, epochs=2))
        >>> result.method, result.epochs_completed, result.trainable_parameters > 0
        ('mmea', 2, True)
    """
    config = config or TrainConfig()
    out = Path(out_dir) if out_dir is not None else None
    name = name or (out.resolve().name.replace(".", "_") if out is not None else "adapter")
    if out is not None:
        _check_out_dir(out, resume, overwrite)
    elif resume:
        raise ConfigError("resume needs out_dir (where the checkpoint is)")
    ctx = distributed.context(config.device)
    try:
        if ctx.distributed and config.device is not None:
            device = torch.device(config.device)
            if device.type == "cuda" and device.index is None:  # one GPU per rank
                config = dataclasses.replace(config, device=f"cuda:{ctx.local_rank}")
        ctx.barrier()  # every rank has checked the output folder before rank 0 writes to it
        return _fit(ctx, model_or_base, train, valid, config, name, keys, out, resume,
                    overwrite, callback)  # fmt: skip
    finally:
        ctx.close()


def _fit(
    ctx: distributed.Context,
    model_or_base: Any,
    train: Any,
    valid: Any,
    config: TrainConfig,
    name: str,
    keys: DataKeys | None,
    out: Path | None,
    resume: bool,
    overwrite: bool,
    callback: Callable[[dict[str, Any], torch.nn.Module], None] | None,
) -> FitResult:
    model = _prepare_model(model_or_base, config, name)
    info = model.base_info if isinstance(model, AdaptedModel) else base_info(model)
    head = resolve_head(info["heads"], config.head)
    zs = info["atomic_numbers"]
    train_atoms = _labelled(train, keys, zs, "the training data", head)
    if valid is None:
        train_atoms, valid_atoms = split_structures(train_atoms, config.valid_fraction, config.seed)
    else:
        valid_atoms = _labelled(valid, keys, zs, "the validation data", head)
    run = _trainer.Run(
        config=config,
        train_atoms=train_atoms,
        valid_atoms=valid_atoms,
        train_graphs=labelled_graphs(train_atoms, info, head),
        valid_graphs=labelled_graphs(valid_atoms, info, head),
        base=info,
        hashes={"train": data_hash(train_atoms), "valid": data_hash(valid_atoms)},
        base_fingerprints=frozenset(fingerprints(_bare(model))),
        ctx=ctx,
    )
    state = _trainer.read_checkpoint(out, run) if resume else None
    e0s = state.e0s if state is not None else _fit_e0s(model, run)
    subject = _make_subject(model, config, name, e0s, head)
    if out is not None and ctx.is_main:  # rank 0 alone writes
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _clear_outputs(out)
    loop = _trainer.Loop(run, subject, out, state, callback)
    try:
        loop.train()
    except KeyboardInterrupt:
        if loop.best_state is None:
            logger.warning("interrupted before the first epoch ended: nothing written")
        elif ctx.distributed:  # ranks stop at different points: no more collectives
            logger.warning("interrupted: the last checkpoint holds the run (--resume)")
        else:
            logger.warning("interrupted: writing the best result so far")
            _finish(loop, name, "interrupted")
        raise
    return _finish(loop, name, loop.status)


def _bare(model: AdaptedModel | torch.nn.Module) -> torch.nn.Module:
    return model.base_model if isinstance(model, AdaptedModel) else model


def _fit_e0s(model: Any, run: _trainer.Run) -> dict[int, float] | None:
    if not run.config.fit_e0s:
        return None
    base = _bare(model)
    size = run.config.eval_batch_size
    pred = _trainer.predict_all(run.ctx, base, run.train_graphs, batch_size=size, forces=False)
    ref = reference_values(run.train_atoms)
    e0s = fit_e0_correction(run.train_atoms, ref["energy"] - pred["energy"], run.config.e0_ridge)
    shift = np.mean((ref["energy"] - pred["energy"]) / ref["num_atoms"]) * 1000
    logger.info("E0 correction %s (mean base residual %.2f meV/atom)", e0s, shift)
    return e0s


def _finish(loop: _trainer.Loop, name: str, status: str) -> FitResult:
    """Restore the best weights, measure them, write outputs; the :class:`FitResult`."""
    run, subject = loop.run, loop.subject
    loop.restore_best()
    if isinstance(subject, _MMEASubject):
        subject.calibrate(run.train_graphs, run.config.eval_batch_size)
    e0s = subject.e0s
    metrics = {
        "train": loop.evaluate(run.train_graphs, run.train_atoms),
        "valid": loop.evaluate(run.valid_graphs, run.valid_atoms),
    }
    times = [h["seconds"] for h in loop.history]
    summary = {
        "method": subject.method,
        "name": name,
        "status": status,
        "trainable_parameters": subject.trainable_parameters,
        "epochs_completed": loop.epoch,
        "best_epoch": loop.best_epoch,
        "seconds_per_epoch": float(np.mean(times)) if times else math.nan,
        "metrics": metrics,
        "e0_correction": {str(z): v for z, v in sorted(e0s.items())} if e0s else None,
        "data": {
            "train_sha256": run.hashes["train"],
            "valid_sha256": run.hashes["valid"],
            "n_train": len(run.train_atoms),
            "n_valid": len(run.valid_atoms),
            "has_stress": has_stress(run.train_atoms),
        },
        "config": run.config.to_dict(),
    }
    writes = loop.best_state is not None or status != "interrupted"
    if loop.out is not None and run.ctx.is_main and writes:  # rank 0 alone writes
        environment = None
        if subject.method == "mmea":
            environment = describe_environment(subject.module, run.train_atoms)
        subject.export(loop.out, environment, summary)
        full = dict(summary, base=run.base, history=loop.history)
        full["mmea_calc_version"] = __version__
        atomic_write_json(loop.out / TRAINING_NAME, _json_safe(full))
    return FitResult(
        method=subject.method,
        name=name,
        model=subject.result_model(),
        trainable_parameters=subject.trainable_parameters,
        metrics=metrics,
        history=list(loop.history),
        e0s=e0s,
        best_epoch=loop.best_epoch,
        epochs_completed=loop.epoch,
        status=status,
        seconds_per_epoch=summary["seconds_per_epoch"],
        out_dir=loop.out,
        summary=summary,
    )


def _batches(model: AdaptedModel, graphs: Sequence[Any], batch_size: int) -> Iterator[dict]:
    for start in range(0, len(graphs), batch_size):
        yield collate(graphs[start : start + batch_size], dtype=model.dtype, device=model.device)


def calibrate_adapter(
    model: AdaptedModel,
    name: str,
    structures: str | os.PathLike | Sequence[ase.Atoms],
    *,
    batch_size: int = 16,
) -> dict[str, dict[str, list[float]]]:
    """Record adapter ``name``'s gate ranges on ``structures`` (its training data: a file or a
    list; no labels needed). See :meth:`~mmea_calc.AdaptedModel.calibrate_adapter`.

    ``fit_adapter`` does this on the training set at the end of every MMEA fit; this function
    is for adapters written before gate ranges existed (``mmea-calc calibrate``).

    Example:
        >>> from mmea_calc import MMEAConfig
        >>> from mmea_calc.testing import build_tiny_mace, random_cluster
        >>> model = AdaptedModel(build_tiny_mace())
        >>> model.add_adapter("a", MMEAConfig(rank=2))
        >>> ranges = calibrate_adapter(model, "a", [random_cluster(6, seed=s) for s in range(3)])
        >>> sorted(ranges)[0], len(ranges["interactions.0.linear"]["low"])
        ('interactions.0.linear', 2)
    """
    structures = read_atoms(structures)
    info = model.base_info
    head = model.adapter_head(name)
    graphs = [atoms_to_graph(atoms, info, head=head) for atoms in structures]
    if not graphs:
        raise DataError("calibration needs at least one structure (the adapter's training data)")
    return model.calibrate_adapter(name, _batches(model, graphs, batch_size))


def _json_safe(obj: Any) -> Any:
    """A JSON-ready copy: NaN/inf become ``None``, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
