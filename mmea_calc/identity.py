"""The identity of a base model: its fingerprint and a JSON-ready description.

An adapter records the fingerprint of the base it was trained on and refuses to load onto any
other (:class:`~mmea_calc.errors.BaseModelMismatchError`). The fingerprint does not depend on the
precision the base is served in: an adapter trained on a float64 base serves on the same base
converted to float32, and the other way round.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from mmea_calc.mace_model import hidden_irreps

__all__ = ["FINGERPRINT_VERSION", "base_info", "fingerprint", "fingerprints"]

#: 2: floating-point tensors hashed after rounding to float32 (precision-independent);
#: 1 (files written before it, no ``fingerprint_version``): hashed as float64, so a float64
#: base converted to float32 changed its fingerprint.
FINGERPRINT_VERSION = 2
#: The dtype every floating-point tensor is rounded to before hashing (version 2).
CANONICAL_DTYPE = torch.float32


def _digest(model: torch.nn.Module, float_dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().to("cpu")
        tensor = tensor.to(float_dtype) if tensor.is_floating_point() else tensor.to(torch.int64)
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    digest.update(f"r_max={float(model.r_max):.12g}".encode())
    digest.update(f"z={[int(z) for z in model.atomic_numbers]}".encode())
    digest.update(f"hidden={hidden_irreps(model)}".encode())
    return digest.hexdigest()


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the base state dict plus r_max, atomic numbers and hidden irreps.

    Floating-point tensors are rounded to float32 before hashing, so the same base served in
    float32 or float64 has one fingerprint (two float64 bases that differ only below float32's
    precision share it too). The tensors are read (copied to the CPU), so ``model`` must hold
    real values: a ``meta``-device module has no fingerprint.

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> base = build_tiny_mace()
        >>> fingerprint(base) == fingerprint(base.float()) == fingerprint(base.float().double())
        True
        >>> fingerprint(base) == fingerprint(build_tiny_mace(seed=1))
        False
    """
    return _digest(model, CANONICAL_DTYPE)


def fingerprints(model: torch.nn.Module) -> set[str]:
    """Every fingerprint an adapter file may record for ``model`` as it is now: this version's
    and version 1's (float64 hashing: it matches only a base served in the dtype the adapter
    was trained in)."""
    return {fingerprint(model), _digest(model, torch.float64)}


def base_info(model: torch.nn.Module) -> dict[str, Any]:
    """A JSON-ready description of a base model: fingerprint, r_max, elements, irreps, class."""
    return {
        "fingerprint": fingerprint(model),
        "fingerprint_version": FINGERPRINT_VERSION,
        "r_max": float(model.r_max),
        "atomic_numbers": [int(z) for z in model.atomic_numbers],
        "hidden_irreps": hidden_irreps(model),
        "model_class": type(model).__name__,
        "num_interactions": int(model.num_interactions),
        "heads": list(getattr(model, "heads", ["Default"])),
    }
