"""What is in an adapter directory, a fine-tuning output or a base model (``mmea-calc info``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ase.data

from mmea_calc.base import load_base
from mmea_calc.errors import AdapterFormatError
from mmea_calc.files import ADAPTER_CONFIG_NAME, BASE_CONFIG_NAME, MODEL_NAME, TRAINING_NAME
from mmea_calc.identity import base_info
from mmea_calc.io import read_adapter_dir

__all__ = ["describe_path"]


def describe_path(path: str) -> dict[str, Any]:
    """What ``mmea-calc info`` reports for an adapter dir, a finetune dir or a base model."""
    target = Path(path)
    if not target.exists():
        raise AdapterFormatError(f"{path!r} does not exist")
    training_file = target / TRAINING_NAME
    training = json.loads(training_file.read_text()) if training_file.is_file() else None
    if target.is_dir() and (target / ADAPTER_CONFIG_NAME).is_file():
        info = _describe_adapter(target)
    elif target.is_dir() and training is not None and (target / MODEL_NAME).is_file():
        info = _describe_model(target / MODEL_NAME, kind="finetune")
        info.update(method=training["method"], name=training.get("name"))
        info["trainable_parameters"] = training["trainable_parameters"]
        lora = training["method"] == "lora"
        info["rank"] = training["config"]["rank"] if lora else None
        if lora:  # runs written before the default changed to None used mace's alpha 1
            alpha = training["config"].get("lora_alpha")
            info["lora_alpha"] = 1.0 if alpha is None else alpha
        info["trainable_parameters_per_part"] = {
            training["method"]: training["trainable_parameters"]
        }
        info["base_fingerprint"] = training.get("base", {}).get("fingerprint")
    elif target.is_file() or (target / BASE_CONFIG_NAME).is_file():  # .model file or base dir
        info = _describe_model(target, kind="base")
    else:
        raise AdapterFormatError(
            f"{path!r} holds neither an adapter (adapter_config.json), a base (config.json) "
            "nor a finetune result (training.json + model.model)"
        )
    if training is not None:
        info["training"] = {k: v for k, v in training.items() if k not in ("history", "base")}
    info["path"] = str(target)
    info["elements"] = [ase.data.chemical_symbols[z] for z in info.pop("atomic_numbers")]
    return info


def _describe_adapter(directory: Path) -> dict[str, Any]:
    cfg, tensors = read_adapter_dir(directory)
    environment = cfg.get("environment") or {}
    return {
        "kind": "adapter",
        "method": cfg["method"],
        "name": cfg.get("name"),
        "rank": cfg["rank"],
        "phi": cfg["phi"],
        "preset": cfg.get("preset", "gates"),
        "lora_alpha": cfg.get("lora_alpha"),
        "trainable_parameters": int(sum(t.numel() for t in tensors.values())),
        "trainable_parameters_per_part": _per_part(cfg, tensors),
        "targets": list(cfg["targets"]),
        "fingerprint": cfg["base"]["fingerprint"],
        "head": cfg.get("head"),
        "heads": cfg["base"].get("heads"),
        "base": cfg["base"],
        "atomic_numbers": environment.get("atomic_numbers", cfg["base"]["atomic_numbers"]),
        "e0s": cfg.get("e0s"),
        "logit_bound": cfg.get("logit_bound"),
        "calibrated": bool(cfg.get("gate_ranges")),
        # per-atom routing needs these statistics (fits record them; `mmea-calc calibrate` too)
        "routing_statistics": bool(environment.get("neighbourhood")),
        "training": cfg.get("training"),
    }


def _per_part(cfg: dict[str, Any], tensors: dict[str, Any]) -> dict[str, int]:
    """Scalars per part (``gates``, and the ``paper`` preset's parts), from the tensor keys:
    ``<target linear>.<gate tensor>`` or ``<base tensor>.<factor>``."""
    owners = {t: "gates" for t in cfg["targets"]}
    owners.update(cfg.get("paper_tensors") or {})
    counts: dict[str, int] = {"gates": 0}
    for key, tensor in tensors.items():
        owner = max((o for o in owners if key.startswith(o + ".")), key=len, default=None)
        if owner is None:
            raise AdapterFormatError(f"adapter tensor {key!r} belongs to no target nor part")
        part = owners[owner]
        counts[part] = counts.get(part, 0) + int(tensor.numel())
    return counts


def _describe_model(path: Path, kind: str) -> dict[str, Any]:
    model = load_base(path)
    info = base_info(model)
    return {
        "kind": kind,
        "method": "base",
        "trainable_parameters": 0,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "fingerprint": info["fingerprint"],
        "heads": info["heads"],
        "atomic_numbers": info["atomic_numbers"],
        "base": info,
    }
