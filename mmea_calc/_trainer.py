"""The training loop behind :func:`mmea_calc.train.fit_adapter` and its checkpoint format.

The checkpoint is one safetensors file (written atomically): the trained tensors, their EMA, the
best weights so far and Adam's per-tensor state as tensors; everything else (epoch, scheduler,
history, E0 correction, the identity of the run) as JSON in the file's metadata. No pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch_ema import ExponentialMovingAverage

from mmea_calc.data import collate, fit_e0_correction, has_stress, reference_values
from mmea_calc.distributed import Context
from mmea_calc.errors import DataError
from mmea_calc.files import CHECKPOINT_NAME, atomic_write_bytes
from mmea_calc.metrics import error_metrics, loss_denominators, loss_fn, predict

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
RESUMABLE = ("epochs", "patience", "device", "eval_batch_size")
#: Settings added after checkpoints existed, with the value every run before them had.
ADDED_SETTINGS = {"preset": "gates", "head": None}
IMPROVEMENT = 1e-4  # relative drop of the validation criterion that counts as better


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


# ---------------------------------------------------------------------------- run and state
@dataclass
class Run:
    """The fixed inputs of one run."""

    config: Any
    train_atoms: list[ase.Atoms]
    valid_atoms: list[ase.Atoms]
    train_graphs: list[Any]
    valid_graphs: list[Any]
    base: dict[str, Any]
    hashes: dict[str, str]
    #: fingerprints a checkpoint may record for this base (older, precision-dependent ones too)
    base_fingerprints: frozenset[str] = frozenset()
    #: this process's rank in a data-parallel run (a world of one by default)
    ctx: Context = field(default_factory=Context)

    @property
    def use_stress(self) -> bool:
        return self.config.stress_weight > 0 and has_stress(self.train_atoms)

    @property
    def eval_stress(self) -> bool:
        return has_stress(self.train_atoms) or has_stress(self.valid_atoms)

    def identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this run. The batch is the global
        one (per-rank batch times ranks), so a run resumes under another world size that
        keeps it."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in RESUMABLE}
        config["batch_size"] = self.config.batch_size * self.ctx.world_size
        return {"config": config, "base": self.base["fingerprint"], "data": self.hashes}


def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
    """A run identity with the settings it does not use dropped and the ones added since older
    checkpoints filled in (so that a checkpoint resumes across those changes)."""
    config = {**ADDED_SETTINGS, **identity["config"]}
    if config.get("method") != "lora" and config.get("preset") != "paper":
        config.pop("lora_alpha", None)  # unused by this run
    elif config.get("lora_alpha") is None:  # the defaults: mace-torch's 1, the paper's rank
        config["lora_alpha"] = 1.0 if config.get("method") == "lora" else float(config["rank"])
    return {**identity, "config": config}


@dataclass
class State:
    """Everything that changes during training (what a checkpoint holds)."""

    epoch: int
    params: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    ema_updates: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    best: dict[str, torch.Tensor] | None
    best_epoch: int
    best_criterion: float
    bad_epochs: int
    history: list[dict[str, Any]]
    e0s: dict[int, float] | None
    best_e0s: dict[int, float] | None


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, layout = {}, {}
    for index, per_param in state["state"].items():
        layout[str(index)] = sorted(per_param)
        for key, value in per_param.items():
            tensors[f"optim/{index}/{key}"] = torch.as_tensor(value)
    return tensors, {"layout": layout, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    per_param = {
        int(index): {key: tensors[f"optim/{index}/{key}"] for key in keys}
        for index, keys in meta["layout"].items()
    }
    return {"state": per_param, "param_groups": meta["param_groups"]}


def write_checkpoint(path: Path, run: Run, state: State) -> None:
    tensors = {f"param/{k}": v for k, v in state.params.items()}
    if state.ema is not None:
        tensors.update({f"ema/{k}": v for k, v in state.ema.items()})
    if state.best is not None:
        tensors.update({f"best/{k}": v for k, v in state.best.items()})
    optim_tensors, optim_meta = _flatten_optimizer(state.optimizer)
    tensors.update(optim_tensors)
    meta = {
        "version": CHECKPOINT_VERSION,
        "identity": run.identity(),
        "optimizer": optim_meta,
        "e0s": _e0_json(state.e0s),
        "best_e0s": _e0_json(state.best_e0s),
    }
    for key in ("epoch", "ema_updates", "scheduler", "best_epoch", "best_criterion"):
        meta[key] = getattr(state, key)
    meta.update(bad_epochs=state.bad_epochs, history=state.history)
    data = save(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata={"mmea_checkpoint": json.dumps(meta)},
    )
    atomic_write_bytes(path, data)


def read_checkpoint(out: Path, run: Run) -> State:
    """Read ``out/checkpoint.safetensors`` and check it belongs to ``run``."""
    path = out / CHECKPOINT_NAME
    raw = path.read_bytes()
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["mmea_checkpoint"])
        tensors = load(raw)
    except (SafetensorError, KeyError, TypeError, json.JSONDecodeError, OSError) as exc:
        raise DataError(f"checkpoint {str(path)!r} is unreadable: {exc}") from exc
    if meta.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"checkpoint {str(path)!r} has unknown version {meta.get('version')!r}")
    want, have = _comparable(run.identity()), _comparable(meta["identity"])
    if have["base"] in run.base_fingerprints:  # written before fingerprints were dtype-free
        have["base"] = want["base"]
    if json.dumps(want, sort_keys=True) != json.dumps(have, sort_keys=True):
        diff = [k for k in want["config"] if want["config"][k] != have["config"].get(k)]
        diff += [k for k in ("base", "data") if want[k] != have[k]]
        raise DataError(
            f"cannot resume from {str(path)!r}: it was made with different {diff}; resume with "
            "the same base, data and settings (only epochs/patience may change)"
        )

    def group(prefix: str) -> dict[str, torch.Tensor] | None:
        found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        return found or None

    return State(
        epoch=meta["epoch"],
        params=group("param/") or {},
        ema=group("ema/"),
        ema_updates=meta["ema_updates"],
        optimizer=_unflatten_optimizer(tensors, meta["optimizer"]),
        scheduler=meta["scheduler"],
        best=group("best/"),
        best_epoch=meta["best_epoch"],
        best_criterion=meta["best_criterion"],
        bad_epochs=meta["bad_epochs"],
        history=meta["history"],
        e0s=_e0_read(meta["e0s"]),
        best_e0s=_e0_read(meta["best_e0s"]),
    )


def _e0_json(e0s: dict[int, float] | None) -> dict[str, float] | None:
    return {str(z): float(v) for z, v in sorted(e0s.items())} if e0s else None


def _e0_read(e0s: dict[str, float] | None) -> dict[int, float] | None:
    return {int(z): float(v) for z, v in e0s.items()} if e0s else None


def predict_all(
    ctx: Context, module: torch.nn.Module, graphs: Sequence[Any], **kwargs: Any
) -> dict[str, np.ndarray]:
    """:func:`~mmea_calc.metrics.predict` over ``graphs``, split over the ranks of ``ctx``
    and gathered back in order (every rank gets every prediction)."""
    if not ctx.distributed:
        return predict(module, graphs, **kwargs)
    part = ctx.shard(len(graphs))
    mine = predict(module, graphs[part], **kwargs) if part.stop > part.start else None
    pieces = [p for p in ctx.gather(mine) if p is not None]
    return {key: np.concatenate([p[key] for p in pieces]) for key in pieces[0]}


# ---------------------------------------------------------------------------- the loop
class Loop:
    """Epochs of training with validation, best-weights tracking and checkpoints."""

    def __init__(
        self,
        run: Run,
        subject: Any,
        out: Path | None,
        state: State | None,
        callback: Callable[[dict[str, Any], torch.nn.Module], None] | None,
    ) -> None:
        cfg = run.config
        self.run, self.subject, self.out, self.callback = run, subject, out, callback
        params = list(subject.params.values())
        self.optimizer = torch.optim.Adam(
            params, lr=cfg.lr, amsgrad=cfg.amsgrad, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=cfg.lr_factor, patience=cfg.scheduler_patience
        )
        self.ema = ExponentialMovingAverage(params, decay=cfg.ema_decay) if cfg.ema_decay else None
        self.epoch, self.best_epoch, self.bad_epochs = 0, 0, 0
        self.best_criterion = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self.status = "complete"
        self.best_e0s: dict[int, float] | None = None
        if state is not None:
            self._load(state)

    def _load(self, state: State) -> None:
        self.subject.restore(state.params)
        if self.ema is not None and state.ema is not None:
            with torch.no_grad():
                for key, shadow in zip(self.subject.params, self.ema.shadow_params, strict=True):
                    shadow.copy_(state.ema[key])
            self.ema.num_updates = state.ema_updates
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.epoch, self.best_epoch = state.epoch, state.best_epoch
        self.best_criterion, self.bad_epochs = state.best_criterion, state.bad_epochs
        self.best_state, self.history = state.best, list(state.history)
        self.subject.set_e0s(state.e0s)
        self.best_e0s = state.best_e0s
        logger.info("resumed after epoch %d", self.epoch)

    def state(self) -> State:
        return State(
            epoch=self.epoch,
            params=self.subject.snapshot(),
            ema=self._ema_tensors(),
            ema_updates=self.ema.num_updates if self.ema is not None else 0,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            best=self.best_state,
            best_epoch=self.best_epoch,
            best_criterion=self.best_criterion,
            bad_epochs=self.bad_epochs,
            history=self.history,
            e0s=self.subject.e0s,
            best_e0s=self.best_e0s,
        )

    def _ema_tensors(self) -> dict[str, torch.Tensor] | None:
        if self.ema is None:
            return None
        return dict(zip(self.subject.params, self.ema.shadow_params, strict=True))

    @contextlib.contextmanager
    def _averaged(self) -> Iterator[None]:
        """Within the block the trained tensors hold their EMA (when there is one)."""
        if self.ema is None:
            yield
            return
        with self.ema.average_parameters():
            yield

    def restore_best(self) -> None:
        """Put the best weights (and their E0 correction) into the subject."""
        if self.best_state is not None:
            self.subject.restore(self.best_state)
            self.subject.set_e0s(self.best_e0s)

    def _refit_e0s(self) -> None:
        """Re-solve the per-element energy correction for the current weights (closed form).

        Forces do not see a per-element constant, so with a small energy weight it drifts;
        refitting it every epoch keeps the energy free of such offsets.
        """
        run = self.run
        pred = predict_all(
            run.ctx,
            self.subject.module,
            run.train_graphs,
            batch_size=run.config.eval_batch_size,
            forces=False,
        )
        ref = reference_values(run.train_atoms)
        delta = fit_e0_correction(
            run.train_atoms, ref["energy"] - pred["energy"], run.config.e0_ridge
        )
        current = self.subject.e0s or {}
        self.subject.set_e0s({z: current.get(z, 0.0) + d for z, d in delta.items()})

    def evaluate(self, graphs: Sequence[Any], atoms: Sequence[ase.Atoms]) -> dict[str, float]:
        cfg = self.run.config
        pred = predict_all(
            self.run.ctx,
            self.subject.module,
            graphs,
            batch_size=cfg.eval_batch_size,
            stress=self.run.eval_stress,
        )
        return error_metrics(pred, reference_values(atoms))

    def _train_epoch(self, epoch: int) -> float:
        """One pass over the training set in global batches of ``batch_size * world_size``
        (one seeded order for every rank; each rank computes its contiguous share of every
        global batch, normalised by the global batch; gradients summed over the ranks)."""
        cfg, run, ctx = self.run.config, self.run, self.run.ctx
        device, dtype = _device_dtype(self.subject.module)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(run.train_graphs), generator=generator).tolist()
        params = list(self.subject.params.values())
        step = cfg.batch_size * ctx.world_size
        total, count = 0.0, 0
        for start in range(0, len(order), step):
            members = order[start : start + step]
            chunk = [run.train_graphs[i] for i in members[ctx.shard(len(members))]]
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._backward(chunk, device, dtype)
            if ctx.distributed:
                loss = self._reduce_gradients(params, loss)
            if cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, max_norm=cfg.clip_grad)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            total += float(loss) * len(members)
            count += len(members)
        return total / count

    def _backward(self, chunk: list[Any], device: torch.device, dtype: torch.dtype) -> Any:
        """Loss of this rank's share of a global batch, back-propagated; returns it."""
        run, ctx = self.run, self.run.ctx
        batch = collate(chunk, dtype=dtype, device=device) if chunk else None
        if batch is not None:
            denominators = loss_denominators(batch, run.use_stress)
        else:  # this rank's share of a short last batch is empty
            denominators = torch.zeros(3, dtype=dtype, device=device)
        ctx.sum_(denominators)  # the whole global batch's normalisers
        if batch is None:
            return torch.zeros((), dtype=dtype, device=device)
        out = self.subject.module(
            batch, training=True, compute_force=True, compute_stress=run.use_stress
        )
        loss = loss_fn(out, batch, run.config, run.use_stress, denominators)
        loss.backward()
        return loss.detach()

    def _reduce_gradients(self, params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Sum the trained tensors' gradients (and the loss) over the ranks, in one
        all-reduce: what ``DistributedDataParallel`` does, for the trained tensors only."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype)])
        self.run.ctx.sum_(flat)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()
        return flat[-1]

    def _criterion(self, metrics: dict[str, float]) -> float:
        cfg = self.run.config
        value = cfg.criterion_energy_weight * metrics["energy_rmse_meV_per_atom"]
        return value + metrics["forces_rmse_meV_per_A"] + metrics.get("stress_rmse_meV_per_A3", 0.0)

    def step(self) -> dict[str, Any]:
        """One epoch: train, validate (EMA weights), schedule, track the best, checkpoint."""
        started = time.perf_counter()
        epoch = self.epoch + 1
        loss = self._train_epoch(epoch)
        with self._averaged():
            if self.run.config.fit_e0s:
                self._refit_e0s()
            metrics = self.evaluate(self.run.valid_graphs, self.run.valid_atoms)
            criterion = self._criterion(metrics)
            improved = criterion < self.best_criterion * (1.0 - IMPROVEMENT)
            if improved:
                self.best_state = self.subject.snapshot()
                self.best_e0s = self.subject.e0s
        self.scheduler.step(criterion)
        if improved:
            self.best_criterion, self.best_epoch, self.bad_epochs = criterion, epoch, 0
        else:
            self.bad_epochs += 1
        self.epoch = epoch
        record = {
            "epoch": epoch,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "criterion": criterion,
            "best": improved,
            "seconds": time.perf_counter() - started,
            "valid": metrics,
        }
        self.history.append(record)
        if self.out is not None and self.run.ctx.is_main:  # rank 0 alone writes
            write_checkpoint(self.out / CHECKPOINT_NAME, self.run, self.state())
        return record

    def train(self) -> None:
        cfg = self.run.config
        while self.epoch < cfg.epochs:
            if cfg.patience is not None and self.bad_epochs >= cfg.patience:
                self.status = "early-stopped"
                logger.info("early stop after epoch %d (best %d)", self.epoch, self.best_epoch)
                break
            record = self.step()
            logger.info(
                "epoch %d loss %.4g E %.3g meV/atom F %.3g meV/A",
                record["epoch"],
                record["loss"],
                record["valid"]["energy_mae_meV_per_atom"],
                record["valid"]["forces_mae_meV_per_A"],
            )
            if self.callback is not None and self.run.ctx.is_main:
                self.callback(record, self.subject.module)
