"""Loading a frozen base MACE model and fingerprinting it.

A *base* is any mace-torch ``MACE``/``ScaleShiftMACE`` module. :func:`load_base` returns it in
eval mode with every parameter frozen; :func:`fingerprint` identifies it so that an adapter can
refuse to run on a model it was not trained for.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmea_calc._deps import o3
from mmea_calc.errors import BaseModelError

__all__ = ["EMBEDDED", "base_info", "fingerprint", "load_base", "resolve_dtype"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float": torch.float32,
    "double": torch.float64,
}
#: ``load_base(EMBEDDED)`` loads the base shipped in ``mmea_calc/embedded/base/``.
EMBEDDED = "embedded"
_REQUIRED_ATTRS = ("atomic_numbers", "r_max", "interactions", "products", "readouts")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"float64"``/``torch.float64``/``None`` into a torch dtype (or ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise BaseModelError(f"dtype {dtype} is not supported; use float32 or float64")
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise BaseModelError(
            f"dtype {dtype!r} is not supported; valid: 'float32', 'float64'"
        ) from None


def _check_mace(model: Any, origin: str) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise BaseModelError(
            f"{origin} holds a {type(model).__name__}, not a torch.nn.Module; "
            "expected a mace-torch MACE or ScaleShiftMACE model"
        )
    missing = [a for a in _REQUIRED_ATTRS if not hasattr(model, a)]
    if missing:
        raise BaseModelError(
            f"{origin} is a {type(model).__name__} without {missing}; "
            "expected a mace-torch MACE or ScaleShiftMACE model"
        )
    return model


def _load_file(path: Path, device: str) -> torch.nn.Module:
    if not path.is_file():
        raise BaseModelError(f"base model file {str(path)!r} does not exist")
    # mace .model files are pickled modules: only load files you trust.
    try:
        model = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a model file"
        raise BaseModelError(
            f"could not read base model {str(path)!r} as a mace .model file: {exc}"
        ) from exc
    return _check_mace(model, f"base model file {str(path)!r}")


def _load_path(source: str | os.PathLike, device: str) -> torch.nn.Module:
    from mmea_calc.base_format import embedded_base_dir, read_base_dir

    if isinstance(source, str) and source == EMBEDDED:
        return read_base_dir(embedded_base_dir(), device=device)
    path = Path(source)
    if path.is_dir():
        return _check_mace(read_base_dir(path, device=device), f"base directory {str(path)!r}")
    return _load_file(path, device)


def load_base(
    source: str | os.PathLike | torch.nn.Module,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> torch.nn.Module:
    """Load a MACE model as a frozen base.

    Args:
        source: a safe base directory (``config.json`` + ``model.safetensors``, see
            :mod:`mmea_calc.base_format`), ``"embedded"`` for the base shipped with the package,
            a mace ``.model`` file (a pickle: load only trusted files) or an in-memory MACE
            module (frozen in place).
        device: torch device to put the model on.
        dtype: ``"float32"``/``"float64"`` to convert the model, ``None`` to keep its dtype.

    Returns:
        The model in eval mode with ``requires_grad=False`` on every parameter.

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> base = load_base(build_tiny_mace(), dtype="float64")
        >>> any(p.requires_grad for p in base.parameters())
        False
    """
    torch_dtype = resolve_dtype(dtype)
    if isinstance(source, torch.nn.Module):
        model = _check_mace(source, "the given module")
    elif isinstance(source, str | os.PathLike):
        model = _load_path(source, str(device))
    else:
        raise BaseModelError(
            f"base source of type {type(source).__name__} is not supported; give a base "
            "directory, 'embedded', a path to a mace .model file or a MACE module"
        )
    if torch_dtype is not None:
        model = model.to(dtype=torch_dtype)
    model = model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _normalised_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base's own state dict: adapter tensors dropped, wrapper key segments removed."""
    state = {}
    for key, value in model.state_dict().items():
        if ".mmea_adapters." in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def hidden_irreps(model: torch.nn.Module) -> str:
    """The hidden irreps of the first layer, as mace-torch records them."""
    return str(o3.Irreps(str(model.products[0].linear.irreps_out)))


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the base state dict plus r_max, atomic numbers and hidden irreps.

    Floating-point tensors are hashed as float64, so a float32 model converted to float64 keeps
    its fingerprint. Adapter tensors of an :class:`~mmea_calc.AdaptedModel` are ignored.
    """
    digest = hashlib.sha256()
    for key, value in sorted(_normalised_state(model).items()):
        tensor = value.detach().to("cpu")
        tensor = tensor.to(torch.float64) if tensor.is_floating_point() else tensor.to(torch.int64)
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    digest.update(f"r_max={float(model.r_max):.12g}".encode())
    digest.update(f"z={[int(z) for z in model.atomic_numbers]}".encode())
    digest.update(f"hidden={hidden_irreps(model)}".encode())
    return digest.hexdigest()


def base_info(model: torch.nn.Module) -> dict[str, Any]:
    """A JSON-ready description of a base model: fingerprint, r_max, elements, irreps, class."""
    return {
        "fingerprint": fingerprint(model),
        "r_max": float(model.r_max),
        "atomic_numbers": [int(z) for z in model.atomic_numbers],
        "hidden_irreps": hidden_irreps(model),
        "model_class": type(model).__name__,
        "num_interactions": int(model.num_interactions),
        "heads": list(getattr(model, "heads", ["Default"])),
    }
