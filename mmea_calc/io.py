"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``, never pickle.

This module maps a directory to (config dict, tensors) and back, and checks the files on their
own: format version, required keys, the tensor file's sha256 recorded in the config (so a crash
between the two renames, a truncated download or a hand-edited file is detected at load time
instead of producing wrong numbers). Fitting the files to a model (base fingerprint, targets,
shapes) is :meth:`mmea_calc.AdaptedModel.load_adapter`'s half. Writes are atomic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from mmea_calc.errors import AdapterFormatError
from mmea_calc.files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    atomic_write_bytes,
    atomic_write_json,
    read_checked_safetensors,
    read_json_config,
    sha256_hex,
)

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "is_adapter_dir",
    "read_adapter_dir",
    "write_adapter_dir",
]

FORMAT_VERSION = 1
CONFIG_NAME = ADAPTER_CONFIG_NAME
WEIGHTS_NAME = ADAPTER_WEIGHTS_NAME
_REQUIRED_KEYS = ("format_version", "method", "rank", "phi", "targets", "base", "tensors_sha256")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding an ``adapter_config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def write_adapter_dir(
    directory: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> Path:
    """Write an adapter directory (created if needed; each file replaced atomically).

    ``config`` gets ``format_version``, ``mmea_calc_version`` and the tensor file's sha256
    added; the tensors are written first, so a crash leaves a config that refuses the new
    tensors rather than a config that describes missing ones.
    """
    from mmea_calc import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = save(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata={"format": "pt", "mmea_format_version": str(FORMAT_VERSION)},
    )
    document = dict(config)
    document.update(
        format_version=FORMAT_VERSION,
        mmea_calc_version=__version__,
        method="mmea",
        tensors_sha256=sha256_hex(data),
    )
    atomic_write_bytes(directory / WEIGHTS_NAME, data)
    atomic_write_json(directory / CONFIG_NAME, document)
    return directory


def read_adapter_dir(
    directory: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an adapter directory's files (not yet against a base model)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"adapter directory {str(directory)!r} does not exist")
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise AdapterFormatError(
                f"{str(directory)!r} is not an adapter directory: {path.name} is missing "
                f"(an adapter holds {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    cfg = read_json_config(cfg_path, _REQUIRED_KEYS, FORMAT_VERSION, AdapterFormatError, "adapters")
    if cfg["method"] != "mmea":
        raise AdapterFormatError(f"{cfg_path} describes method {cfg['method']!r}, not 'mmea'")
    tensors = read_checked_safetensors(
        weights_path, cfg["tensors_sha256"], AdapterFormatError, CONFIG_NAME
    )
    return cfg, tensors
