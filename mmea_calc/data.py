"""Structures to graphs through mace-torch's own data pipeline; labelled datasets; E0 fitting.

Reference values are read once (:func:`read_structures`, :func:`label_structures`) into copies of
the structures under fixed internal keys (:data:`LABEL_KEYS`), whatever the user's key names or
ASE's storage, so everything downstream (graphs, hashing, metrics) reads one place.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ase
import ase.io
import numpy as np
import torch
from ase.stress import voigt_6_to_full_3x3_stress

from mmea_calc._deps import DefaultKeys, mace_data, torch_geometric, utils
from mmea_calc.errors import DataError, InvalidStructureError, UnsupportedElementError
from mmea_calc.mace_model import resolve_head

__all__ = [
    "LABEL_KEYS",
    "WEIGHT_KEYS",
    "DataKeys",
    "atoms_to_graph",
    "check_atoms",
    "check_elements",
    "check_geometry",
    "collate",
    "data_hash",
    "fit_e0_correction",
    "has_stress",
    "label_structures",
    "labelled_graphs",
    "read_atoms",
    "read_structures",
    "reference_values",
    "split_structures",
    "z_table_of",
]


def check_elements(numbers: Sequence[int] | np.ndarray, atomic_numbers: Sequence[int]) -> None:
    """Raise :class:`UnsupportedElementError` for elements the base model does not know."""
    known = set(int(z) for z in atomic_numbers)
    unknown = sorted(set(int(z) for z in np.unique(numbers)) - known)
    if unknown:
        names = [ase.data.chemical_symbols[z] for z in unknown]
        raise UnsupportedElementError(
            f"elements {names} are not known to the base model; it knows "
            f"{[ase.data.chemical_symbols[z] for z in sorted(known)]}"
        )


def check_geometry(atoms: ase.Atoms) -> None:
    """Raise :class:`InvalidStructureError` for empty structures, NaN positions, bad cells."""
    if len(atoms) == 0:
        raise InvalidStructureError("the structure is empty (0 atoms)")
    positions = atoms.positions
    if not np.isfinite(positions).all():
        bad = np.nonzero(~np.isfinite(positions).all(axis=1))[0]
        raise InvalidStructureError(f"positions of atoms {bad[:10].tolist()} are NaN or infinite")
    pbc = atoms.pbc
    if pbc.any():
        cell = atoms.cell.array
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


def check_atoms(atoms: ase.Atoms, atomic_numbers: Sequence[int]) -> None:
    """Raise a typed error for structures the base model cannot evaluate."""
    check_geometry(atoms)
    check_elements(atoms.numbers, atomic_numbers)


def atoms_to_graph(
    atoms: ase.Atoms,
    model_info: dict[str, Any],
    key_specification: Any | None = None,
    check: bool = True,
    z_table: Any | None = None,
    head: str | None = None,
) -> Any:
    """One ``mace.data.AtomicData`` graph, in float64 (positions are never rounded).

    ``check=False`` skips :func:`check_atoms` for callers that already ran it; callers building
    many graphs pass their ``key_specification`` and ``z_table`` (:func:`z_table_of`) once.
    ``head``: the head of a multi-head base the graph is evaluated on (``None``: the base's
    default head, :func:`~mmea_calc.mace_model.resolve_head`; mace itself would silently take
    the last head for a name it does not know: this raises).

    torch's process-wide default dtype is left alone (mace builds the graph's tensors in it;
    what that rounds is rebuilt here in float64 from the same numbers).
    """
    if check:
        check_atoms(atoms, model_info["atomic_numbers"])
    keyspec = key_specification or mace_data.KeySpecification()
    z_table = z_table or z_table_of(model_info)
    heads = list(model_info["heads"])
    config = mace_data.config_from_atoms(
        atoms, key_specification=keyspec, head_name=resolve_head(heads, head)
    )
    graph = mace_data.AtomicData.from_config(
        config, z_table=z_table, cutoff=float(model_info["r_max"]), heads=heads
    )
    return _in_float64(graph, config)


#: Reference values and weights of a graph, rebuilt in float64 from the configuration.
_EXACT_LABELS = ("energy", "forces", "stress", "virials")
_EXACT_WEIGHTS = ("energy", "forces", "stress", "virials")


def _in_float64(graph: Any, config: Any) -> Any:
    """``graph`` with what torch's default dtype rounded rebuilt in float64 (a no-op when the
    default is float64).

    Positions, the periodic cell vectors and the shifts (integer image counts times the cell),
    the reference values and any weight float32 cannot hold exactly come again from
    ``config``'s float64 numbers; the other floats (fields only mace's electrostatic extensions
    read, ``volume``/``rcell`` among them: inverting the cell again would cost every MD step)
    stay as built, since :func:`collate` casts every float to the model's dtype. The
    cell rows mace invents along non-periodic directions (a box far larger than the structure)
    are only upcast: nothing crosses them (their image counts are 0), and the stress volume
    they enter cancels in :class:`~mmea_calc.MMEACalculator`'s conversion to ``atoms.cell``.
    """
    f64 = torch.float64
    if torch.get_default_dtype() == f64:
        return graph  # nothing was rounded
    graph.positions = torch.as_tensor(config.positions, dtype=f64)
    cell = graph.cell.to(f64)
    if config.cell is not None and config.pbc is not None:
        periodic = torch.as_tensor(list(config.pbc), dtype=torch.bool)
        cell[periodic] = torch.as_tensor(np.asarray(config.cell), dtype=f64)[periodic]
    graph.cell = cell
    graph.unit_shifts = graph.unit_shifts.to(f64)  # whole numbers: exact in any dtype
    graph.shifts = graph.unit_shifts @ graph.cell
    for key in _EXACT_LABELS:
        value = config.properties.get(key)
        if value is None:
            continue
        value = np.asarray(value, dtype=np.float64)
        if key in ("stress", "virials") and value.size == 6:
            value = voigt_6_to_full_3x3_stress(value)
        if value.size == graph[key].numel():
            graph[key] = torch.as_tensor(value, dtype=f64).reshape(graph[key].shape)
    weights = {f"{key}_weight": config.property_weights.get(key) for key in _EXACT_WEIGHTS}
    weights["weight"] = config.weight
    for key, value in weights.items():  # 0 and 1 (the usual ones) are exact in any dtype
        if value is not None and float(np.float32(value)) != float(value):
            graph[key] = torch.tensor(float(value), dtype=f64)
    return graph


def z_table_of(model_info: dict[str, Any]) -> Any:
    """mace's atomic-number table of a base (``model_info`` from :func:`~mmea_calc.identity.
    base_info`)."""
    return utils.AtomicNumberTable(list(model_info["atomic_numbers"]))


def collate(
    graphs: Sequence[Any], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Batch graphs into the dict a MACE model takes, floats cast to the model's dtype.

    Every tensor is a copy (the graphs can be batched again: mace marks positions as requiring
    grad in place). One graph, as every MD step of a calculator has, is laid out directly
    (:func:`_collate_one`: what torch_geometric gives, without its per-key bookkeeping).
    """
    graphs = list(graphs)
    if len(graphs) == 1:
        one = _collate_one(graphs[0], dtype, device)
        if one is not None:
            return one
    batch = torch_geometric.Batch.from_data_list(graphs).to(device)
    out = batch.to_dict()
    for key, value in out.items():
        if torch.is_tensor(value) and torch.is_floating_point(value):
            out[key] = value.to(dtype=dtype)
    return out


def _collate_one(
    graph: Any, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor] | None:
    """``torch_geometric.Batch.from_data_list([graph]).to(device).to_dict()`` with floats cast
    to ``dtype``, key for key (sorted), 0-d values as ``[1]``, ``batch`` and ``ptr`` added;
    ``None`` for a graph holding anything but tensors (the general path handles it)."""
    num_nodes = graph.num_nodes
    keys = graph.keys
    if num_nodes is None or "batch" in keys or "ptr" in keys:
        return None
    out: dict[str, torch.Tensor] = {}
    for key in sorted([*keys, "batch", "ptr"]):
        if key == "batch":
            value = torch.zeros(num_nodes, dtype=torch.long)
        elif key == "ptr":
            value = torch.tensor([0, num_nodes])
        else:
            value = graph[key]
            if not torch.is_tensor(value):
                return None
            if value.dim() == 0:
                value = value.unsqueeze(0)
        if torch.is_floating_point(value):
            out[key] = value.to(device=device, dtype=dtype, copy=True)
        else:
            out[key] = value.to(device=device, copy=True)
    return out


# ---------------------------------------------------------------------------- labelled datasets
#: Where :func:`label_structures` puts the reference values on its copies of the structures.
LABEL_KEYS = {"energy": "mmea_energy", "forces": "mmea_forces", "stress": "mmea_stress"}
_PLAIN = {"energy": "energy", "forces": "forces", "stress": "stress"}


@dataclass(frozen=True)
class DataKeys:
    """Names of the reference values in the input structures (defaults as in mace-torch).

    ``virials`` (eV) are used as mace's virials loss would use them, converted to a stress
    (``-virials / volume``) when a structure has no stress; ``head`` names the head of a
    multi-head base a structure belongs to (structures of another head are refused).

    When a key is absent from ``atoms.info``/``atoms.arrays`` and it is the default
    (``REF_*``) or the plain ASE name (``energy``...), the value stored on ``atoms.calc`` is used
    (ASE >= 3.23 moves plain ``energy``/``forces``/``stress`` there when reading extxyz).
    """

    energy: str = DefaultKeys.ENERGY.value
    forces: str = DefaultKeys.FORCES.value
    stress: str = DefaultKeys.STRESS.value
    virials: str = DefaultKeys.VIRIALS.value
    head: str = DefaultKeys.HEAD.value


#: mace's per-structure loss weights (``atoms.info``), kept on the labelled copies as mace reads
#: them (``config_from_atoms``): ``config_weight`` scales every term of the structure,
#: ``config_<quantity>_weight`` one term.
WEIGHT_KEYS = ("config_weight", "config_energy_weight", "config_forces_weight",
               "config_stress_weight")  # fmt: skip


def _lookup(atoms: ase.Atoms, quantity: str, key: str) -> np.ndarray | None:
    store = atoms.arrays if quantity == "forces" else atoms.info
    if LABEL_KEYS[quantity] in store:  # already labelled by this module
        key = LABEL_KEYS[quantity]
    if key in store and store[key] is not None:
        return np.asarray(store[key], dtype=np.float64)
    default = getattr(DataKeys(), quantity)
    calc = getattr(atoms, "calc", None)
    results = getattr(calc, "results", None) or {}
    if key in (default, _PLAIN[quantity]) and results.get(_PLAIN[quantity]) is not None:
        return np.asarray(results[_PLAIN[quantity]], dtype=np.float64)
    return None


def label_structures(
    structures: Sequence[ase.Atoms],
    keys: DataKeys | None = None,
    *,
    atomic_numbers: Sequence[int] | None = None,
    source: str = "dataset",
    head: str | None = None,
) -> list[ase.Atoms]:
    """Copies of ``structures`` with energy, forces (and stress) under :data:`LABEL_KEYS`, and
    mace's per-structure loss weights (:data:`WEIGHT_KEYS`) as they were.

    Args:
        structures: the structures, labelled under ``keys`` (or on ``atoms.calc``).
        keys: where the reference values are; default :class:`DataKeys`.
        atomic_numbers: when given, every structure is checked against these elements.
        source: a name for the data in error messages (e.g. the file path).
        head: the head the data trains; a structure naming another (``keys.head``) raises.

    Raises:
        DataError: empty dataset, a structure without energy or forces, forces of the wrong
            shape, or non-finite reference values.
        UnsupportedElementError: elements outside ``atomic_numbers``.
    """
    keys = keys or DataKeys()
    if len(structures) == 0:
        raise DataError(f"{source} holds no structures")
    labelled = []
    for index, atoms in enumerate(structures):
        where = f"structure {index} of {source}"
        if atomic_numbers is not None:
            try:
                check_atoms(atoms, atomic_numbers)
            except (InvalidStructureError, UnsupportedElementError) as exc:
                raise type(exc)(f"{where}: {exc}") from None
        energy = _lookup(atoms, "energy", keys.energy)
        forces = _lookup(atoms, "forces", keys.forces)
        stress = _lookup(atoms, "stress", keys.stress)
        if energy is None or energy.size != 1:
            raise DataError(
                f"{where} has no energy under key {keys.energy!r} (info keys: "
                f"{sorted(atoms.info)}); pass the right --energy-key"
            )
        if forces is None:
            raise DataError(
                f"{where} has no forces under key {keys.forces!r} (per-atom arrays: "
                f"{sorted(atoms.arrays)}); pass the right --forces-key"
            )
        if forces.shape != (len(atoms), 3):
            raise DataError(
                f"{where}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)"
            )
        if stress is not None and stress.size not in (6, 9):
            raise DataError(f"{where}: stress has {stress.size} values, expected 6 or 9")
        virials = _virials(atoms, keys.virials, where)
        if stress is None and virials is not None:
            stress = -virials / atoms.get_volume()  # mace: virials = -stress * volume
        _check_head(atoms, keys.head, head, where)
        weights = _weights(atoms, where, from_virials=stress is not None and virials is not None)
        values = [energy, forces] + ([stress] if stress is not None else [])
        if not all(np.isfinite(v).all() for v in values):
            raise DataError(f"{where} holds NaN or infinite reference values")
        copy = ase.Atoms(
            numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc
        )
        copy.info[LABEL_KEYS["energy"]] = float(energy.reshape(()))
        copy.arrays[LABEL_KEYS["forces"]] = forces.copy()
        if stress is not None:
            copy.info[LABEL_KEYS["stress"]] = _stress_matrix(stress)
        copy.info.update(weights)
        labelled.append(copy)
    return labelled


def _virials(atoms: ase.Atoms, key: str, where: str) -> np.ndarray | None:
    if atoms.info.get(key) is None:
        return None
    virials = np.asarray(atoms.info[key], dtype=np.float64)
    if virials.size not in (6, 9):
        raise DataError(f"{where}: virials ({key!r}) have {virials.size} values, expected 6 or 9")
    if atoms.cell.rank != 3:
        raise DataError(
            f"{where}: virials ({key!r}) need a 3-D cell to become a stress; this cell has "
            f"rank {atoms.cell.rank}"
        )
    return _stress_matrix(virials)


def _check_head(atoms: ase.Atoms, key: str, head: str | None, where: str) -> None:
    value = atoms.info.get(key)
    if value is None or head is None or str(value) == head:
        return
    raise DataError(
        f"{where} belongs to head {value!r} ({key!r} in atoms.info) but this run uses head "
        f"{head!r}; an adapter serves one head: train one per head, or drop the key"
    )


def _weights(atoms: ase.Atoms, where: str, from_virials: bool) -> dict[str, float]:
    """The structure's mace loss weights (validated); ``config_virials_weight`` weighs the
    stress made from virials."""
    found = {k: atoms.info[k] for k in WEIGHT_KEYS if atoms.info.get(k) is not None}
    if from_virials and atoms.info.get("config_virials_weight") is not None:
        found["config_stress_weight"] = atoms.info["config_virials_weight"]
    out = {}
    for key, value in found.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number >= 0):
            raise DataError(f"{where}: {key} must be a number >= 0, got {value!r}")
        out[key] = number
    return out


def _stress_matrix(stress: np.ndarray) -> np.ndarray:
    if stress.size == 9:
        return stress.reshape(3, 3).copy()
    return voigt_6_to_full_3x3_stress(stress.reshape(6))


def read_structures(
    path: str | os.PathLike,
    keys: DataKeys | None = None,
    *,
    atomic_numbers: Sequence[int] | None = None,
    head: str | None = None,
) -> list[ase.Atoms]:
    """Read an extxyz (or any ASE-readable) file into labelled structures.

    See :func:`label_structures` for what is checked; a missing or unreadable file raises
    :class:`~mmea_calc.errors.DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"data file {str(path)!r} is empty (no structures)")
    try:
        structures = ase.io.read(path, index=":")
    except Exception as exc:  # ASE raises many types for unreadable files
        raise DataError(f"could not read {str(path)!r} with ASE: {exc}") from exc
    if isinstance(structures, ase.Atoms):
        structures = [structures]
    return label_structures(
        structures, keys, atomic_numbers=atomic_numbers, source=repr(str(path)), head=head
    )


def read_atoms(structures: str | os.PathLike | Sequence[ase.Atoms]) -> list[ase.Atoms]:
    """``structures`` as a list (no labels needed): read with ASE when it is a path; a missing
    or unreadable file raises :class:`~mmea_calc.errors.DataError` naming it."""
    if not isinstance(structures, str | os.PathLike):
        return list(structures)
    path = Path(structures)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        return ase.io.read(path, index=":")
    except Exception as exc:  # ASE raises many types for unreadable files
        raise DataError(f"could not read {str(path)!r} with ASE: {exc}") from exc


def has_stress(structures: Sequence[ase.Atoms]) -> bool:
    """Whether any labelled structure carries a reference stress."""
    return any(LABEL_KEYS["stress"] in a.info for a in structures)


def reference_values(structures: Sequence[ase.Atoms]) -> dict[str, Any]:
    """Energies ``[n]``, concatenated forces ``[n_atoms, 3]`` and stresses of labelled structures.

    ``stress`` is ``[n_with_stress, 3, 3]`` with ``stress_mask`` marking which structures have one.
    """
    mask = np.array([LABEL_KEYS["stress"] in a.info for a in structures])
    stresses = [a.info[LABEL_KEYS["stress"]] for a in structures if LABEL_KEYS["stress"] in a.info]
    return {
        "energy": np.array([a.info[LABEL_KEYS["energy"]] for a in structures]),
        "forces": np.concatenate([a.arrays[LABEL_KEYS["forces"]] for a in structures]),
        "stress": np.array(stresses).reshape(-1, 3, 3),
        "stress_mask": mask,
        "num_atoms": np.array([len(a) for a in structures]),
    }


def labelled_graphs(
    structures: Sequence[ase.Atoms], model_info: dict[str, Any], head: str | None = None
) -> list[Any]:
    """Graphs of labelled structures, carrying ``energy``/``forces``/``stress`` and weights,
    on ``head`` (see :func:`atoms_to_graph`)."""
    keyspec = mace_data.KeySpecification(
        info_keys={"energy": LABEL_KEYS["energy"], "stress": LABEL_KEYS["stress"]},
        arrays_keys={"forces": LABEL_KEYS["forces"]},
    )
    return [atoms_to_graph(a, model_info, keyspec, head=head) for a in structures]


def split_structures(
    structures: Sequence[ase.Atoms], valid_fraction: float = 0.1, seed: int = 0
) -> tuple[list[ase.Atoms], list[ase.Atoms]]:
    """Seeded random split into (train, valid); valid holds at least one structure."""
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if len(structures) < 2:
        raise DataError(
            f"cannot split {len(structures)} structure(s) into training and validation sets; "
            "give at least 2 structures or a separate validation file"
        )
    order = np.random.default_rng(seed).permutation(len(structures))
    n_valid = min(max(1, round(valid_fraction * len(structures))), len(structures) - 1)
    valid = sorted(order[:n_valid].tolist())
    train = sorted(order[n_valid:].tolist())
    return [structures[i] for i in train], [structures[i] for i in valid]


def data_hash(structures: Sequence[ase.Atoms]) -> str:
    """sha256 over the numbers, positions, cells and reference values of labelled structures."""
    digest = hashlib.sha256()
    for atoms in structures:
        for array in (
            atoms.numbers.astype(np.int64),
            atoms.positions.astype(np.float64),
            np.asarray(atoms.cell, dtype=np.float64),
            atoms.pbc.astype(np.int8),
            np.float64(atoms.info[LABEL_KEYS["energy"]]),
            atoms.arrays[LABEL_KEYS["forces"]].astype(np.float64),
            np.asarray(atoms.info.get(LABEL_KEYS["stress"], np.zeros(0)), dtype=np.float64),
        ):
            digest.update(np.ascontiguousarray(array).tobytes())
        for key in WEIGHT_KEYS:  # only where set: hashes of unweighted data stay as they were
            if key in atoms.info:
                digest.update(f"{key}={float(atoms.info[key])!r}".encode())
    return digest.hexdigest()


def fit_e0_correction(
    structures: Sequence[ase.Atoms], residual: Sequence[float], ridge: float = 1e-4
) -> dict[int, float]:
    """Per-element energies (eV) fitted to a per-structure energy residual, ridge towards 0.

    Solves ``min_x sum_i ((r_i - c_i . x) / N_i)^2 + ridge * n * |x|^2`` where ``c_i`` counts
    the atoms of each element in structure ``i`` (a per-atom fit, matching the per-atom energy
    loss). The ridge makes datasets of one composition well-posed: the offset is then shared
    between elements in proportion to their counts.

    Example:
        >>> import ase
        >>> mols = [ase.Atoms("H2O"), ase.Atoms("H2O")]
        >>> e0 = fit_e0_correction(mols, [0.3, 0.3])
        >>> round(2 * e0[1] + e0[8], 3)  # the constant residual is absorbed
        0.3
    """
    residual = np.asarray(residual, dtype=np.float64)
    if residual.shape != (len(structures),) or len(structures) == 0:
        raise DataError(
            f"need one residual per structure: got {residual.shape} for {len(structures)}"
        )
    elements = sorted({int(z) for a in structures for z in a.numbers})
    counts = np.array([[np.sum(a.numbers == z) for z in elements] for a in structures], float)
    n_atoms = counts.sum(axis=1, keepdims=True)
    rows, target = counts / n_atoms, residual / n_atoms[:, 0]
    lam = ridge * len(structures)
    lhs = np.vstack([rows, np.sqrt(lam) * np.eye(len(elements))])
    rhs = np.concatenate([target, np.zeros(len(elements))])
    solution, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
    return {z: float(v) for z, v in zip(elements, solution, strict=True)}
