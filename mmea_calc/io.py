"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``, never pickle.

Writes are atomic (temporary file in the same directory, then ``os.replace``) and the config
records the sha256 of the tensor file, so a crash between the two renames, a truncated download
or a hand-edited file is detected at load time instead of producing wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmea_calc.errors import AdapterFormatError, BaseModelMismatchError

if TYPE_CHECKING:
    from mmea_calc.model import AdaptedModel

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_adapter",
    "read_adapter_dir",
    "save_adapter",
]

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_REQUIRED_KEYS = ("format_version", "method", "rank", "phi", "targets", "base", "tensors_sha256")


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


def _tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def save_adapter(
    model: AdaptedModel,
    name: str,
    directory: str | os.PathLike,
    *,
    environment: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Save one adapter of ``model`` as a directory (created if needed; files replaced atomically).

    ``environment`` and ``training`` default to what the model holds in the adapter's metadata.
    """
    from mmea_calc import __version__

    record_meta = model.adapter_metadata(name)
    config = model.adapter_config(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrappers = model._wrapped()
    data = _tensor_bytes(
        model.adapter_state_dict(name), {"format": "pt", "mmea_format_version": str(FORMAT_VERSION)}
    )
    e0s = model.adapter_e0s(name)
    cfg = {
        "format_version": FORMAT_VERSION,
        "mmea_calc_version": __version__,
        "method": "mmea",
        "name": name,
        "rank": config.rank,
        "phi": config.phi,
        "shift_init_std": config.shift_init_std,
        "logit_bound": config.logit_bound,
        "target_patterns": config.targets,
        "targets": {
            t: {"irreps_in": str(wrappers[t].irreps_in), "irreps_out": str(wrappers[t].irreps_out)}
            for t in model.adapter_targets(name)
        },
        "base": model.base_info,
        "e0s": {str(z): v for z, v in sorted(e0s.items())} if e0s else None,
        "environment": dict(environment)
        if environment is not None
        else record_meta.get("environment"),
        "training": dict(training) if training is not None else record_meta.get("training"),
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write_bytes(directory / WEIGHTS_NAME, data)
    atomic_write_json(directory / CONFIG_NAME, cfg)
    if environment is not None:
        record_meta["environment"] = dict(environment)
    if training is not None:
        record_meta["training"] = dict(training)
    return directory


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
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected_sha256:
        raise error(
            f"{path} is corrupt or does not belong to its config: sha256 {digest[:12]}… "
            f"but {config_name} records {str(expected_sha256)[:12]}…"
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path} is not a valid safetensors file: {exc}") from exc


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


def load_adapter(
    model: AdaptedModel,
    directory: str | os.PathLike,
    name: str | None = None,
    *,
    set_active: bool = True,
) -> str:
    """Load an adapter directory into ``model``; returns the name it was loaded under."""
    from mmea_calc.model import MMEAConfig

    cfg, tensors = read_adapter_dir(directory)
    base = cfg["base"]
    if base.get("fingerprint") != model.fingerprint:
        raise BaseModelMismatchError(
            f"adapter {str(directory)!r} was trained on base model "
            f"{str(base.get('fingerprint'))[:12]}… "
            f"({base.get('model_class')}, elements {base.get('atomic_numbers')}, hidden "
            f"{base.get('hidden_irreps')}), not on this one {model.fingerprint[:12]}… "
            f"({model.base_info['model_class']}, elements {model.base_info['atomic_numbers']}, "
            f"hidden {model.base_info['hidden_irreps']})"
        )
    name = name or cfg.get("name") or Path(directory).resolve().name
    targets = list(cfg["targets"])
    available = model.adaptable_modules()
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise AdapterFormatError(f"adapter targets {unknown} do not exist in the base model")
    try:
        config = MMEAConfig(
            rank=int(cfg["rank"]),
            phi=cfg["phi"],
            targets=targets,
            shift_init_std=float(cfg.get("shift_init_std", 0.0)),
            # absent in files written before the bound existed: those were trained unbounded
            logit_bound=cfg.get("logit_bound"),
        )
    except (TypeError, ValueError) as exc:
        raise AdapterFormatError(f"adapter config in {str(directory)!r} is invalid: {exc}") from exc
    e0s = {int(z): float(v) for z, v in (cfg.get("e0s") or {}).items()}
    meta = {k: cfg.get(k) for k in ("environment", "training")}
    model.add_adapter(name, config, e0s=e0s or None, metadata=meta, set_active=False)
    try:
        _copy_tensors(model, name, tensors, directory)
    except AdapterFormatError:
        model.delete_adapter(name)
        raise
    if set_active:
        model.set_adapter(name)
    return name


def _copy_tensors(
    model: AdaptedModel, name: str, tensors: Mapping[str, torch.Tensor], directory: Any
) -> None:
    params = dict(model.named_adapter_parameters(name))
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise AdapterFormatError(
            f"adapter {str(directory)!r} tensors do not match its config: missing {missing}, "
            f"unexpected {extra}"
        )
    for key, param in params.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(param.shape):
            raise AdapterFormatError(
                f"adapter {str(directory)!r} tensor {key!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(param.shape)} for this base and rank"
            )
        if not torch.isfinite(value).all():
            raise AdapterFormatError(f"adapter {str(directory)!r} tensor {key!r} holds NaN/inf")
        with torch.no_grad():
            param.copy_(value.to(dtype=param.dtype, device=param.device))
