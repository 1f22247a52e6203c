"""One frozen base plus its adapters, as the serving front ends take them.

:class:`~mmea_calc.MMEACalculator` (ASE) and :class:`mmea_calc.torchsim.MMEAModel` (TorchSim)
accept the same ``base``/``adapters``/``device``/``dtype`` arguments; this module turns them
into an :class:`~mmea_calc.AdaptedModel` the same way for both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mmea_calc.base import EMBEDDED, resolve_dtype
from mmea_calc.base_format import embedded_adapter_dirs
from mmea_calc.model import AdaptedModel

__all__ = ["AdapterSpec", "adapter_items", "served_model"]

AdapterSpec = str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]


def adapter_items(adapters: AdapterSpec) -> list[tuple[str | None, Path]]:
    """``(name or None, directory)`` pairs from a path, a list, ``{name: path}`` or
    ``"embedded"`` (every adapter shipped with the package)."""
    if isinstance(adapters, str) and adapters == EMBEDDED:
        return [(None, path) for path in embedded_adapter_dirs()]
    if isinstance(adapters, str | os.PathLike):
        return [(None, Path(adapters))]
    if isinstance(adapters, Mapping):
        return [(str(name), Path(path)) for name, path in adapters.items()]
    return [(None, Path(path)) for path in adapters]


def served_model(
    base: str | os.PathLike | torch.nn.Module,
    adapters: AdapterSpec = (),
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> AdaptedModel:
    """The :class:`~mmea_calc.AdaptedModel` a front end serves.

    ``base`` is a mace ``.model`` file, a safe base directory, ``"embedded"``, a MACE module or
    an :class:`~mmea_calc.AdaptedModel` (used as is, with the adapters it holds). Files load in
    float64 on the CPU unless ``dtype``/``device`` say otherwise; a given module keeps its
    device and dtype unless they are given (then it is converted in place: it is the caller's
    object). ``adapters`` (see :func:`adapter_items`) are loaded without changing the active
    adapter.
    """
    dtype = resolve_dtype(dtype)
    if isinstance(base, AdaptedModel):
        model = base
        if device is not None or dtype is not None:  # asked for: the caller's model moves
            model = base.to(device=device, dtype=dtype)
    elif isinstance(base, torch.nn.Module):
        model = AdaptedModel(base, device=device, dtype=dtype)
    else:
        model = AdaptedModel(base, device=device, dtype=dtype or torch.float64)
    for name, path in adapter_items(adapters):
        model.load_adapter(path, name=name, set_active=False)
    return model
