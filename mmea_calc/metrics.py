"""Predictions of a model on graphs, the training loss and the error metrics reported."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmea_calc.data import collate

__all__ = ["error_metrics", "loss_denominators", "loss_fn", "predict"]


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def predict(
    module: torch.nn.Module,
    graphs: Sequence[Any],
    *,
    batch_size: int = 16,
    forces: bool = True,
    stress: bool = False,
) -> dict[str, np.ndarray]:
    """Energies ``[n]`` (eV), forces ``[n_atoms, 3]`` and stresses ``[n, 3, 3]`` of graphs.

    ``module`` is a MACE model or an :class:`~mmea_calc.AdaptedModel`; graphs come from
    :func:`~mmea_calc.data.atoms_to_graph` / :func:`~mmea_calc.data.labelled_graphs`. Results
    are float64 numpy arrays.
    """
    device, dtype = _device_dtype(module)
    energy, force, stresses = [], [], []
    for start in range(0, len(graphs), batch_size):
        data = collate(graphs[start : start + batch_size], dtype=dtype, device=device)
        out = module(data, training=False, compute_force=forces, compute_stress=stress)
        energy.append(out["energy"].detach().cpu().double().numpy())
        if forces:
            force.append(out["forces"].detach().cpu().double().numpy())
        if stress:
            stresses.append(out["stress"].detach().cpu().double().numpy())
    result = {"energy": np.concatenate(energy)}
    if forces:
        result["forces"] = np.concatenate(force)
    if stress:
        result["stress"] = np.concatenate(stresses)
    return result


def loss_denominators(batch: dict[str, torch.Tensor], use_stress: bool) -> torch.Tensor:
    """The normalisers of :func:`loss_fn`'s terms for ``batch``: summed energy weights,
    3 x summed per-atom force weights and 9 x summed stress weights (``[3]``). Data-parallel
    training sums them over the ranks, so every rank normalises by the global batch."""
    w_e = batch["weight"] * batch["energy_weight"]
    w_f = (batch["weight"] * batch["forces_weight"])[batch["batch"]]
    parts = [w_e.sum(), 3 * w_f.sum()]
    if use_stress:
        parts.append(9 * (batch["weight"] * batch["stress_weight"]).sum())
    else:
        parts.append(w_e.new_zeros(()))
    return torch.stack(parts)


def loss_fn(
    out: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    config: Any,
    use_stress: bool,
    denominators: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted MSE of energy per atom, forces and (when labelled) stress; masked by weights.

    ``denominators`` (:func:`loss_denominators`, default: this batch's own) normalise the
    three terms; a rank of a data-parallel run passes the global batch's, so that the ranks'
    losses add up to the loss of the whole batch.
    """
    if denominators is None:
        denominators = loss_denominators(batch, use_stress)
    den = denominators.clamp_min(1e-12)
    num_atoms = (batch["ptr"][1:] - batch["ptr"][:-1]).to(out["energy"].dtype)
    w_e = batch["weight"] * batch["energy_weight"]
    err_e = ((out["energy"] - batch["energy"]) / num_atoms) ** 2
    loss = config.energy_weight * (w_e * err_e).sum() / den[0]
    w_f = (batch["weight"] * batch["forces_weight"])[batch["batch"]]
    err_f = ((out["forces"] - batch["forces"]) ** 2).sum(dim=1)
    loss = loss + config.forces_weight * (w_f * err_f).sum() / den[1]
    if use_stress:
        w_s = batch["weight"] * batch["stress_weight"]
        err_s = ((out["stress"] - batch["stress"]) ** 2).sum(dim=(1, 2))
        err_s = torch.where(w_s > 0, err_s, torch.zeros_like(err_s))  # no cell: NaN stress
        loss = loss + config.stress_weight * (w_s * err_s).sum() / den[2]
    return loss


def error_metrics(pred: dict[str, np.ndarray], ref: dict[str, Any]) -> dict[str, float]:
    """MAE and RMSE of energy per atom (meV/atom), force components (meV/Å), stress (meV/Å³).

    ``ref`` is :func:`~mmea_calc.data.reference_values` of the same structures. Stress keys are
    present only when some structure has a reference stress and ``pred`` holds stresses.
    """
    de = (pred["energy"] - ref["energy"]) / ref["num_atoms"] * 1000.0
    df = (pred["forces"] - ref["forces"]).reshape(-1) * 1000.0
    out = {
        "n_structures": len(ref["energy"]),
        "energy_mae_meV_per_atom": float(np.abs(de).mean()),
        "energy_rmse_meV_per_atom": float(np.sqrt((de**2).mean())),
        "forces_mae_meV_per_A": float(np.abs(df).mean()),
        "forces_rmse_meV_per_A": float(np.sqrt((df**2).mean())),
    }
    if ref["stress_mask"].any() and pred.get("stress") is not None:
        ds = (pred["stress"][ref["stress_mask"]] - ref["stress"]).reshape(-1) * 1000.0
        out["stress_mae_meV_per_A3"] = float(np.abs(ds).mean())
        out["stress_rmse_meV_per_A3"] = float(np.sqrt((ds**2).mean()))
    return out
