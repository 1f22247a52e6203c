"""File helpers and the names of every file this package writes.

Atomic writes (temporary file in the same directory, then ``os.replace``: readers see the old
file or the new one, never half), JSON configs with a format version, and safetensors files
checked against the sha256 their config records. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "BASE_CONFIG_NAME",
    "BASE_WEIGHTS_NAME",
    "CHECKPOINT_NAME",
    "MODEL_NAME",
    "TRAINING_NAME",
    "atomic_write_bytes",
    "atomic_write_json",
    "read_checked_safetensors",
    "read_json_config",
    "sha256_hex",
]

#: An adapter directory: its config and its tensors.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: A safe base directory: its config and its tensors.
BASE_CONFIG_NAME = "config.json"
BASE_WEIGHTS_NAME = "model.safetensors"
#: A fine-tuning output: the training summary, the per-epoch checkpoint and, for the LoRA and
#: full fine-tunes, the resulting mace model (a pickle, mace's own format).
TRAINING_NAME = "training.json"
CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "model.model"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as JSON (indent 2, sorted keys)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json_config(
    path: Path,
    required: Sequence[str],
    version: int,
    error: type[Exception],
    kind: str,
) -> dict[str, Any]:
    """Read a JSON object with ``required`` keys and ``format_version == version``.

    Raises ``error`` (a typed :mod:`mmea_calc.errors` class) naming the file and the problem.
    """
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise error(f"{path} must hold a JSON object, not {type(document).__name__}")
    missing = [k for k in required if k not in document]
    if missing:
        raise error(f"{path} lacks required keys {missing}")
    if document["format_version"] != version:
        raise error(
            f"{path} has format_version {document['format_version']!r}; this mmea_calc reads "
            f"version {version} (upgrade mmea_calc to read newer {kind})"
        )
    return document


def read_checked_safetensors(
    path: Path, expected_sha256: Any, error: type[Exception], config_name: str
) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it against the sha256 its config records."""
    digest = sha256_hex(path.read_bytes())
    if digest != expected_sha256:
        raise error(
            f"{path} is corrupt or does not belong to its config: sha256 {digest[:12]}… "
            f"but {config_name} records {str(expected_sha256)[:12]}…"
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path} is not a valid safetensors file: {exc}") from exc
