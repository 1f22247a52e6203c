"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``, never pickle.

This module maps a directory to (config dict, tensors) and back, and checks the files on their
own: format version, required keys, the tensor file's sha256 recorded in the config (so a
truncated download or a hand-edited file is detected at load time instead of producing wrong
numbers). Fitting the files to a model (base fingerprint, targets, shapes) is
:meth:`mmea_calc.AdaptedModel.load_adapter`'s half.

Writing over an adapter replaces it as a whole: each file is replaced atomically, and until the
new config is in place the old tensors stay reachable under their checksum's name
(``.adapter_model.safetensors.<sha256>.bak``, hard-linked, removed after the write), which
:func:`read_adapter_dir` reads when the config's checksum points there. A reader (or a crash)
at any moment sees the old adapter or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from mmea_calc._version import __version__
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
    """Write an adapter directory (created if needed), replacing any adapter in it as a whole
    (see the module docstring: old or new, never a mix, whenever it is read or a crash stops
    the write). Other files in the directory are left alone.

    ``config`` gets ``format_version``, ``mmea_calc_version`` and the tensor file's sha256
    added.
    """
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
    weights = directory / WEIGHTS_NAME
    backup = None
    old_sha = _recorded_sha(directory / CONFIG_NAME)
    if weights.is_file() and old_sha is not None:
        # keep the tensors the old config describes under their checksum's name until the new
        # config is in place: a crash in between still reads as the old adapter
        backup = _backup_path(directory, old_sha)
        backup.unlink(missing_ok=True)
        try:
            os.link(weights, backup)
        except OSError:  # no hard links on this file system: a copy does the same
            atomic_write_bytes(backup, weights.read_bytes())
    atomic_write_bytes(weights, data)
    atomic_write_json(directory / CONFIG_NAME, document)
    for stale in directory.glob(_BACKUP_GLOB):  # this write's backup and any a crash left
        stale.unlink(missing_ok=True)
    return directory


#: Tensors a config still describes while a new adapter is written over it (see below).
_BACKUP_GLOB = f".{WEIGHTS_NAME}.*.bak"


def _backup_path(directory: Path, sha256: str) -> Path:
    return directory / f".{WEIGHTS_NAME}.{sha256}.bak"


def _recorded_sha(config_path: Path) -> str | None:
    try:
        value = json.loads(config_path.read_text()).get("tensors_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value.isalnum() else None


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
    sha = cfg["tensors_sha256"]
    backup = _backup_path(directory, str(sha)) if isinstance(sha, str) else None
    if backup is not None and backup.is_file():  # a write was cut between its two files
        weights_path = backup
    tensors = read_checked_safetensors(weights_path, sha, AdapterFormatError, CONFIG_NAME)
    return cfg, tensors
