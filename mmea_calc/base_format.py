"""A safe on-disk format for base MACE models: ``model.safetensors`` + ``config.json``, no pickle.

``config.json`` holds the constructor arguments of the mace-torch model class (class names,
irreps as strings, the gate activation by name, atomic energies, scale/shift, ...), from which
:func:`read_base_dir` rebuilds the module with mace-torch's own classes and then loads the
state dict from ``model.safetensors``. Only whitelisted classes can be named: a config that
names anything else is refused (:class:`~mmea_calc.errors.BaseFormatError`), so reading a base
directory never runs code from the file. :func:`write_base_dir` rebuilds the model from the
config it is about to write and checks that energies and forces agree (to float rounding) before
writing anything, so a model with features this format does not capture is refused instead of
saved wrong. The state dict itself round-trips exactly (same fingerprint).

The package may ship its own base in this format (``mmea_calc/embedded/base/``), loaded by
``load_base("embedded")``, with adapters in ``mmea_calc/embedded/adapters/<name>/``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ase
import numpy as np
import torch
from safetensors.torch import save

from mmea_calc._deps import mace
from mmea_calc._version import __version__
from mmea_calc.data import atoms_to_graph, collate
from mmea_calc.errors import BaseFormatError, EmbeddedAssetsMissingError, OutputExistsError
from mmea_calc.files import (
    BASE_CONFIG_NAME,
    BASE_WEIGHTS_NAME,
    atomic_write_bytes,
    atomic_write_json,
    read_checked_safetensors,
    read_json_config,
    sha256_hex,
)
from mmea_calc.identity import base_info, fingerprint, fingerprints
from mmea_calc.mace_model import base_config, build_from_config, float_dtype_name

__all__ = [
    "BASE_CONFIG_NAME",
    "BASE_FORMAT_VERSION",
    "BASE_WEIGHTS_NAME",
    "EMBEDDED_DIR",
    "embedded_adapter_dirs",
    "embedded_base_dir",
    "is_base_dir",
    "read_base_dir",
    "write_base_dir",
]

logger = logging.getLogger(__name__)

BASE_FORMAT_VERSION = 1
#: Assets shipped inside the package: ``base/``, ``adapters/<name>/``, ``data/``.
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"

_REQUIRED_KEYS = (
    "format_version",
    "model_class",
    "dtype",
    "config",
    "fingerprint",
    "tensors_sha256",
)


def _probe_outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy and forces on a small fixed cluster holding every element of the model."""
    numbers = [int(z) for z in model.atomic_numbers]
    numbers = (numbers * 4)[: max(4, len(numbers))]
    grid = np.array([[i % 3, (i // 3) % 3, i // 9] for i in range(len(numbers))], dtype=float)
    offsets = np.random.default_rng(0).normal(scale=0.1, size=grid.shape)
    atoms = ase.Atoms(numbers=numbers, positions=1.4 * grid + offsets)
    dtype = next(model.parameters()).dtype
    info = base_info(model)
    graphs = [atoms_to_graph(atoms, info, head=head) for head in info["heads"]]  # every head
    out = model(collate(graphs, dtype=dtype), training=False)
    return out["energy"].detach(), out["forces"].detach()


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- files
def write_base_dir(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write ``model`` as a safe base directory (``model.safetensors`` + ``config.json``).

    Args:
        model: a mace-torch ``MACE`` or ``ScaleShiftMACE`` (not an AdaptedModel).
        directory: created if needed; an existing non-empty one needs ``overwrite=True``.
        overwrite: replace the files of an existing base directory.
        verify: rebuild the model from the config first and require identical energies and
            forces on a probe structure (nothing is written if they differ).

    Returns:
        The directory.

    Example:
        >>> import tempfile
        >>> from mmea_calc import fingerprint
        >>> from mmea_calc.testing import build_tiny_mace
        >>> model = build_tiny_mace()
        >>> path = write_base_dir(model, tempfile.mkdtemp() + "/base")
        >>> fingerprint(read_base_dir(path)) == fingerprint(model)
        True
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{str(directory)!r} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{str(directory)!r} is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    model_class = type(model).__name__
    config, dtype = base_config(model), float_dtype_name(model)
    state = _state_tensors(model)
    if verify:
        _verify_rebuild(model, model_class, config, dtype, state)
    data = save(state, metadata={"format": "pt", "mmea_base_format_version": "1"})
    document = {
        "format_version": BASE_FORMAT_VERSION,
        "mmea_calc_version": __version__,
        "mace_torch_version": getattr(mace, "__version__", None),
        "model_class": model_class,
        "dtype": dtype,
        "config": config,
        "fingerprint": fingerprint(model),
        "info": base_info(model),
        "tensors_sha256": sha256_hex(data),
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / BASE_WEIGHTS_NAME, data)
    atomic_write_json(directory / BASE_CONFIG_NAME, document)
    logger.info(
        "wrote base %s (%s, %s) to %s", model_class, dtype, document["fingerprint"][:12], directory
    )
    return directory


def _verify_rebuild(
    model: torch.nn.Module,
    model_class: str,
    config: dict[str, Any],
    dtype: str,
    state: dict[str, torch.Tensor],
) -> None:
    rebuilt = build_from_config(model_class, config, dtype, state)
    device = next(model.parameters()).device
    rebuilt = rebuilt.to(device)
    energy, forces = _probe_outputs(model)
    energy2, forces2 = _probe_outputs(rebuilt)
    # equal up to rounding: TorchScript's profiling executor changes the last bits between a
    # module's first calls (the same pickle loaded twice differs by ~1e-16 eV/Å in float64)
    tol = 1e-10 if energy.dtype == torch.float64 else 1e-4
    scale = 1.0 + float(forces.abs().max()) if forces.numel() else 1.0
    close_e = torch.allclose(energy, energy2, rtol=tol, atol=tol)
    if not (close_e and torch.allclose(forces, forces2, rtol=tol, atol=tol * scale)):
        delta = float((forces - forces2).abs().max())
        raise BaseFormatError(
            f"this {model_class} cannot be stored in the safe base format: the model rebuilt "
            f"from its config differs (max |dF| {delta:.3g} eV/Å, energy {float(energy[0]):.10g} "
            f"vs {float(energy2[0]):.10g} eV)"
        )


def is_base_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a safe base's ``config.json``."""
    return Path(path).is_dir() and (Path(path) / BASE_CONFIG_NAME).is_file()


def _read_document(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise BaseFormatError(f"base directory {str(directory)!r} does not exist")
    for name in (BASE_CONFIG_NAME, BASE_WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise BaseFormatError(
                f"{str(directory)!r} is not a base directory: {name} is missing (a base holds "
                f"{BASE_CONFIG_NAME} and {BASE_WEIGHTS_NAME}; make one with mmea-calc convert-base)"
            )
    return read_json_config(
        directory / BASE_CONFIG_NAME, _REQUIRED_KEYS, BASE_FORMAT_VERSION, BaseFormatError, "bases"
    )


def read_base_dir(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Rebuild a base model from a safe base directory (see :func:`write_base_dir`).

    Validates the format version, the whitelisted class names, the tensor file's checksum,
    every tensor's name and shape (strict state-dict load) and the model fingerprint; raises
    :class:`~mmea_calc.errors.BaseFormatError` for each. Returns the model in eval mode in the
    dtype it was saved in (use :func:`mmea_calc.load_base` for a frozen, converted copy).
    """
    directory = Path(directory)
    document = _read_document(directory)
    state = read_checked_safetensors(
        directory / BASE_WEIGHTS_NAME,
        document["tensors_sha256"],
        BaseFormatError,
        BASE_CONFIG_NAME,
    )
    if not isinstance(document["config"], dict):
        raise BaseFormatError(f"{directory / BASE_CONFIG_NAME}: 'config' must be a JSON object")
    try:
        model = build_from_config(
            document["model_class"], document["config"], document["dtype"], state
        )
    except BaseFormatError as exc:
        raise BaseFormatError(f"base {str(directory)!r}: {exc}") from exc
    if document["fingerprint"] not in fingerprints(model):  # this version's or version 1's
        raise BaseFormatError(
            f"base {str(directory)!r} rebuilt to fingerprint {fingerprint(model)[:12]}…, but its "
            f"config records {str(document['fingerprint'])[:12]}…"
        )
    return model.to(device).eval()


def embedded_adapter_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """The adapter directories under ``ROOT/adapters/`` (default: the package's embedded ones).

    Raises :class:`~mmea_calc.errors.EmbeddedAssetsMissingError` when there are none.
    """
    folder = Path(root if root is not None else EMBEDDED_DIR) / "adapters"
    found = sorted(p.parent for p in folder.glob("*/adapter_config.json"))
    if not found:
        raise EmbeddedAssetsMissingError(
            f"no embedded adapters: {str(folder)!r} holds no adapter directories (this build of "
            "mmea_calc ships without them; pass adapter directories explicitly)"
        )
    return found


def embedded_base_dir(root: str | os.PathLike | None = None) -> Path:
    """The base directory under ``ROOT/base/`` (default: the package's embedded one)."""
    folder = Path(root if root is not None else EMBEDDED_DIR) / "base"
    if not is_base_dir(folder):
        raise EmbeddedAssetsMissingError(
            f"no embedded base model: {str(folder)!r} holds no {BASE_CONFIG_NAME} (this build of "
            "mmea_calc ships without it; pass a .model file or a base directory instead)"
        )
    return folder
