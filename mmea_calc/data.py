"""Structures to graphs through mace-torch's own data pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ase
import numpy as np
import torch
from mace import data as mace_data
from mace.tools import torch_geometric, torch_tools, utils

from mmea_calc._deps import mace  # noqa: F401  (import order, see _deps)
from mmea_calc.errors import InvalidStructureError, UnsupportedElementError

__all__ = ["atoms_to_graph", "check_atoms", "collate"]


def check_atoms(atoms: ase.Atoms, atomic_numbers: Sequence[int]) -> None:
    """Raise a typed error for structures the base model cannot evaluate."""
    if len(atoms) == 0:
        raise InvalidStructureError("the structure is empty (0 atoms)")
    positions = atoms.get_positions()
    if not np.isfinite(positions).all():
        bad = np.nonzero(~np.isfinite(positions).all(axis=1))[0]
        raise InvalidStructureError(f"positions of atoms {bad[:10].tolist()} are NaN or infinite")
    known = set(int(z) for z in atomic_numbers)
    unknown = sorted(set(int(z) for z in atoms.numbers) - known)
    if unknown:
        names = [ase.data.chemical_symbols[z] for z in unknown]
        raise UnsupportedElementError(
            f"elements {names} are not known to the base model; it knows "
            f"{[ase.data.chemical_symbols[z] for z in sorted(known)]}"
        )
    pbc = atoms.get_pbc()
    if pbc.any():
        cell = np.asarray(atoms.get_cell())
        if not np.isfinite(cell).all():
            raise InvalidStructureError("the cell holds NaN or infinite values")
        lengths = np.linalg.norm(cell, axis=1)
        if (lengths[pbc] < 1e-8).any():
            raise InvalidStructureError(
                f"periodic directions {np.nonzero(pbc)[0].tolist()} need non-zero cell vectors; "
                f"cell lengths are {lengths.round(6).tolist()}"
            )
        if pbc.all() and abs(np.linalg.det(cell)) < 1e-8:
            raise InvalidStructureError(
                f"the periodic cell has zero volume ({atoms.get_volume():.3g} Å^3)"
            )


def atoms_to_graph(
    atoms: ase.Atoms,
    model_info: dict[str, Any],
    key_specification: Any | None = None,
    check: bool = True,
) -> Any:
    """One ``mace.data.AtomicData`` graph, built in float64 (positions are never rounded).

    ``check=False`` skips :func:`check_atoms` for callers that already ran it.
    """
    if check:
        check_atoms(atoms, model_info["atomic_numbers"])
    keyspec = key_specification or mace_data.KeySpecification()
    z_table = utils.AtomicNumberTable(list(model_info["atomic_numbers"]))
    with torch_tools.default_dtype(torch.float64):  # scoped: mace reads the default dtype
        config = mace_data.config_from_atoms(atoms, key_specification=keyspec)
        return mace_data.AtomicData.from_config(
            config, z_table=z_table, cutoff=float(model_info["r_max"]), heads=model_info["heads"]
        )


def collate(
    graphs: Sequence[Any], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Batch graphs into the dict a MACE model takes, floats cast to the model's dtype."""
    batch = torch_geometric.Batch.from_data_list(list(graphs)).to(device)
    out = batch.to_dict()
    for key, value in out.items():
        if torch.is_tensor(value) and torch.is_floating_point(value):
            out[key] = value.to(dtype=dtype)
    return out
