"""Loading a frozen base MACE model.

A *base* is any mace-torch ``MACE``/``ScaleShiftMACE`` module. :func:`load_base` returns it in
eval mode with every parameter frozen; it is moved or converted only when the caller asks
(``device``/``dtype``). Its identity (:func:`~mmea_calc.identity.fingerprint`) lets an adapter
refuse to run on a model it was not trained for.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mmea_calc.base_format import embedded_base_dir, read_base_dir
from mmea_calc.errors import BaseModelError
from mmea_calc.identity import base_info, fingerprint
from mmea_calc.mace_model import check_mace

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
    return check_mace(model, f"base model file {str(path)!r}")


def _load_path(source: str | os.PathLike, device: str) -> torch.nn.Module:
    if isinstance(source, str) and source == EMBEDDED:
        return read_base_dir(embedded_base_dir(), device=device)
    path = Path(source)
    if path.is_dir():
        return check_mace(read_base_dir(path, device=device), f"base directory {str(path)!r}")
    return _load_file(path, device)


def load_base(
    source: str | os.PathLike | torch.nn.Module,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> torch.nn.Module:
    """Load a MACE model as a frozen base.

    Args:
        source: a safe base directory (``config.json`` + ``model.safetensors``, see
            :mod:`mmea_calc.base_format`), ``"embedded"`` for the base shipped with the package,
            a mace ``.model`` file (a pickle: load only trusted files) or an in-memory MACE
            module (frozen in place).
        device: torch device to put the model on; ``None`` keeps a module where it is and
            loads files onto the CPU.
        dtype: ``"float32"``/``"float64"`` to convert the model, ``None`` to keep its dtype.

    Returns:
        The model in eval mode with ``requires_grad=False`` on every parameter. A module given
        as ``source`` is that same module (frozen, and moved/converted only if asked).

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> base = load_base(build_tiny_mace(), dtype="float64")
        >>> any(p.requires_grad for p in base.parameters())
        False
    """
    torch_dtype = resolve_dtype(dtype)
    if isinstance(source, torch.nn.Module):
        model = check_mace(source, "the given module")
    elif isinstance(source, str | os.PathLike):
        model = _load_path(source, str(device) if device is not None else "cpu")
    else:
        raise BaseModelError(
            f"base source of type {type(source).__name__} is not supported; give a base "
            "directory, 'embedded', a path to a mace .model file or a MACE module"
        )
    if torch_dtype is not None:
        model = model.to(dtype=torch_dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
