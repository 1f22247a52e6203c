"""The identity of a base model: its fingerprint and a JSON-ready description.

An adapter records the fingerprint of the base it was trained on and refuses to load onto any
other (:class:`~mmea_calc.errors.BaseModelMismatchError`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from mmea_calc.mace_model import hidden_irreps

__all__ = ["base_info", "fingerprint"]


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the base state dict plus r_max, atomic numbers and hidden irreps.

    Floating-point tensors are hashed as float64, so a float32 model converted to float64 keeps
    its fingerprint. The tensors are read (copied to the CPU), so ``model`` must hold real
    values: a ``meta``-device module has no fingerprint.

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> base = build_tiny_mace()
        >>> fingerprint(base) == fingerprint(base.float())  # float64 -> float32 rounds weights
        False
        >>> fingerprint(base.float()) == fingerprint(base.float().double())
        True
    """
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
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
