"""The file and calibration half of :class:`~mmea_calc.AdaptedModel` (a mixin).

Writing and reading adapter directories against a loaded base (fingerprint check, targets,
tensor shapes, rollback on failure), and recording the gates' training ranges
(:meth:`AdapterFiles.calibrate_adapter`). The methods use the model's registry
(``_record``, ``layer``, ``add_adapter`` ...) and are documented as methods of
``AdaptedModel``, which inherits them.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmea_calc.adapter import FADE_SCALE, RANGE_MARGIN
from mmea_calc.config import MMEAConfig
from mmea_calc.errors import (
    AdapterFormatError,
    BaseModelMismatchError,
    ConfigError,
    UncalibratedAdapterWarning,
)
from mmea_calc.io import read_adapter_dir, write_adapter_dir
from mmea_calc.routing import ADAPTER_INDEX_KEY

__all__ = ["CALIBRATION_SLACK", "LEGACY_FADE_SCALE", "AdapterFiles"]

#: Calibrated ranges are widened by this fraction of their width (at least of 1.0) per side.
CALIBRATION_SLACK = 1e-6
#: The fade scale of files calibrated before logit ranges and ``gate_fade_scale`` existed.
LEGACY_FADE_SCALE = 1.0


def _exact(values: Any) -> torch.Tensor:
    """JSON numbers (or a tensor) as float64: the gate converts them to its own dtype, so a
    float64 model gets its ranges to the last digit (torch's default dtype would round them)."""
    return torch.as_tensor(values, dtype=torch.float64)


class AdapterFiles:
    """Adapter files and gate-range calibration for :class:`~mmea_calc.AdaptedModel`."""

    def save_adapter(
        self,
        name: str,
        directory: str | os.PathLike,
        *,
        environment: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``.

        ``environment`` and ``training`` default to what the adapter's metadata holds; given,
        they are also stored there.
        """
        record = self._record(name)
        meta = record.metadata
        if environment is not None:
            self.set_adapter_environment(name, environment)
        if training is not None:
            meta["training"] = dict(training)
        config = record.config
        e0s = record.e0s
        document = {
            "name": name,
            "rank": config.rank,
            "phi": config.phi,
            "shift_init_std": config.shift_init_std,
            "logit_bound": config.logit_bound,
            "preset": config.preset,
            "lora_alpha": config.lora_alpha,
            "target_patterns": config.targets,
            "targets": {
                t: {"irreps_in": str(layer.irreps_in), "irreps_out": str(layer.irreps_out)}
                for t in record.targets
                for layer in [self.layer(t)]
            },
            # the preset "paper" parts: {base tensor: part} (their tensors: "<base tensor>.*")
            "paper_tensors": self._paper_document(name),
            "base": self.base_info,
            "head": record.head,
            "e0s": {str(z): v for z, v in sorted(e0s.items())} if e0s else None,
            "environment": meta.get("environment"),
            "training": meta.get("training"),
            **self._ranges_document(name),
        }
        return write_adapter_dir(directory, document, self.adapter_state_dict(name))

    def _paper_document(self, name: str) -> dict[str, str] | None:
        if name not in self.paper_parts:
            return None
        return {t: spec.part for t, spec in self.paper_parts[name].specs.items()}

    def _gates(self, name: str) -> dict[str, Any]:
        """``{target: MMEAGate}`` of one adapter."""
        return {t: self.layer(t).gates[name] for t in self._record(name).targets}

    def is_calibrated(self, name: str) -> bool:
        """Whether adapter ``name`` holds its gate ranges (see :meth:`calibrate_adapter`)."""
        return all(g.calibrated for g in self._gates(name).values())

    def _ranges_document(self, name: str) -> dict[str, Any]:
        gates = self._gates(name)
        if not self.is_calibrated(name):
            return {"gate_ranges": None}
        ranges = {}
        for target, gate in gates.items():
            ranges[target] = {"low": gate.range_low.tolist(), "high": gate.range_high.tolist()}
            if gate.logit_low is not None:
                ranges[target]["logit_low"] = gate.logit_low.tolist()
                ranges[target]["logit_high"] = gate.logit_high.tolist()
        meta = self._records[name].metadata
        return {
            "gate_ranges": ranges,
            "gate_range_margin": meta.get("range_margin", RANGE_MARGIN),
            "gate_fade_scale": meta.get("fade_scale", FADE_SCALE),
        }

    def set_gate_ranges(
        self,
        name: str,
        ranges: Mapping[str, Mapping[str, Sequence[float]]] | None,
        margin: float = RANGE_MARGIN,
        fade_scale: float = FADE_SCALE,
    ) -> None:
        """Set (``None``: clear) the recorded ranges of adapter ``name``'s gates, ``{target:
        {"low": [...], "high": [...], "logit_low": [...], "logit_high": [...]}}`` (bottleneck
        and, for gates with ``l > 0`` outputs, optionally logit ranges; see
        :meth:`calibrate_adapter`), with the saturation ``margin`` and the ``fade_scale``."""
        gates = self._gates(name)
        if ranges is not None and set(ranges) != set(gates):
            raise ConfigError(
                f"gate ranges name targets {sorted(ranges)}, adapter {name!r} has {sorted(gates)}"
            )
        for target, gate in gates.items():
            if ranges is None:
                gate.set_range(None, None)
                continue
            entry = ranges[target]
            logits = None
            if entry.get("logit_low") is not None:
                logits = (_exact(entry["logit_low"]), _exact(entry["logit_high"]))
            gate.set_range(
                _exact(entry["low"]),
                _exact(entry["high"]),
                margin,
                logits=logits,
                fade_scale=fade_scale,
            )
        self._records[name].metadata["range_margin"] = margin
        self._records[name].metadata["fade_scale"] = fade_scale
        self._changed()

    def calibrate_adapter(
        self, name: str, batches: Iterable[dict[str, torch.Tensor]], margin: float = RANGE_MARGIN
    ) -> dict[str, dict[str, list[float]]]:
        """Record what adapter ``name``'s bottlenecks spanned on ``batches`` (its training data).

        Every node of every batch (graph dicts, as MACE takes them) is served by this adapter;
        per gate and bottleneck channel the minimum and maximum pre-activation are kept, and per
        gate logit (``l > 0`` outputs) its minimum and maximum. From then on bottlenecks and
        logits saturate smoothly outside those ranges and the update fades with the distance
        outside them (inside, nothing changes), and forward calls report that distance
        (``adapter_extrapolation``).

        Returns:
            The ranges, ``{target: {"low": [...], "high": [...], "logit_low": [...],
            "logit_high": [...]}}`` (also set on the gates).
        """
        gates = self._gates(name)
        previous = self._ranges_document(name)
        self.set_gate_ranges(name, None)  # measure the raw pre-activations
        low: dict[str, torch.Tensor] = {}
        high: dict[str, torch.Tensor] = {}

        def record(key: str, values: torch.Tensor) -> None:
            lo, hi = values.amin(dim=0), values.amax(dim=0)
            low[key] = torch.minimum(low[key], lo) if key in low else lo
            high[key] = torch.maximum(high[key], hi) if key in high else hi

        def seen(target: str, module: Any, args: tuple, z: torch.Tensor) -> None:
            if z.shape[0] == 0:
                return
            z = z.detach()
            record(target, z)
            gate = gates[target]
            if gate.gate is not None:  # the logits as the heads use them (bounded), unranged
                logits = gate.gate(torch.nn.functional.silu(z))
                if gate.logit_bound is not None:
                    logits = gate.logit_bound * torch.tanh(logits / gate.logit_bound)
                record("logit:" + target, logits)

        handles = [
            g.down.register_forward_hook(functools.partial(seen, t)) for t, g in gates.items()
        ]
        index = self.adapter_names.index(name)
        try:
            for batch in batches:
                batch = dict(batch)
                batch[ADAPTER_INDEX_KEY] = torch.full_like(batch["batch"], index)
                self(batch, training=False, compute_force=False)
            if not set(gates) <= set(low):
                raise ConfigError(f"cannot calibrate adapter {name!r}: the data holds no atoms")
        except BaseException:  # a failed calibration leaves the adapter as it was
            margin_before = previous.get("gate_range_margin", RANGE_MARGIN)
            fade_before = previous.get("gate_fade_scale", LEGACY_FADE_SCALE)
            self.set_gate_ranges(name, previous["gate_ranges"], margin_before, fade_before)
            raise
        finally:
            for handle in handles:
                handle.remove()
        # float slack: the same structure alone (another summation order in mace's message
        # passing) must not land a rounding error outside the range it was calibrated on
        slack = {k: CALIBRATION_SLACK * (high[k] - low[k]).clamp_min(1.0) for k in low}
        ranges: dict[str, dict[str, list[float]]] = {}
        for target in gates:
            entry = ranges[target] = {}
            for prefix, key in (("", target), ("logit_", "logit:" + target)):
                if key in low:
                    entry[prefix + "low"] = (low[key] - slack[key]).tolist()
                    entry[prefix + "high"] = (high[key] + slack[key]).tolist()
        self.set_gate_ranges(name, ranges, margin)
        return ranges

    def load_adapter(
        self,
        directory: str | os.PathLike,
        name: str | None = None,
        *,
        set_active: bool = True,
        is_trainable: bool = False,
    ) -> str:
        """Load an adapter directory (validated against this base); returns its name.

        The loaded tensors are frozen unless ``is_trainable`` (to continue training them). A
        failed load leaves the model as it was.
        """
        cfg, tensors = read_adapter_dir(directory)
        where = repr(str(directory))
        self._check_base(cfg["base"], where)
        name = name or cfg.get("name") or Path(directory).resolve().name
        targets = list(cfg["targets"])
        refused = {t: self._not_gateable[t] for t in targets if t in self._not_gateable}
        if refused:
            raise AdapterFormatError(
                f"adapter {where} targets linears MMEA cannot gate in this base: {refused}"
            )
        unknown = [t for t in targets if t not in self._linears]
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
                # absent in files written before presets existed: gates only
                preset=cfg.get("preset", "gates"),
                lora_alpha=cfg.get("lora_alpha"),
            )
        except (ConfigError, TypeError, ValueError) as exc:
            raise AdapterFormatError(f"adapter config in {where} is invalid: {exc}") from exc
        try:
            e0s = {int(z): float(v) for z, v in (cfg.get("e0s") or {}).items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise AdapterFormatError(f"adapter config in {where}: bad e0s: {exc}") from exc
        meta = {k: cfg.get(k) for k in ("environment", "training")}
        head = cfg.get("head")  # absent in files written before heads: the default head
        if head is not None and head not in self.heads:
            raise AdapterFormatError(
                f"adapter {where} belongs to head {head!r}, which the base lacks (heads "
                f"{self.heads})"
            )
        self.add_adapter(
            name,
            config,
            head=head,
            e0s=e0s,
            metadata=meta,
            set_active=False,
            is_trainable=is_trainable,
            init_weights=False,  # the file's tensors replace them: no draw from the global RNG
        )
        config.targets = cfg.get("target_patterns", targets)  # as written (targets resolved)
        try:  # any failure from here on (a warning turned error, Ctrl-C too) rolls back
            self._copy_tensors(name, tensors, where)
            self._load_ranges(name, cfg, where, directory)
        except BaseException:
            self.delete_adapter(name)
            raise
        if set_active:
            self.set_adapter(name)
        return name

    def _load_ranges(
        self, name: str, cfg: Mapping[str, Any], where: str, directory: str | os.PathLike
    ) -> None:
        if not cfg.get("gate_ranges"):
            warnings.warn(
                f"adapter {where} records no gate ranges (written before mmea_calc 0.2): its "
                "gates do not saturate outside the training data and no extrapolation grade is "
                "reported; record them with `mmea-calc calibrate "
                f"{directory} --base BASE --data TRAIN.xyz`",
                UncalibratedAdapterWarning,
                stacklevel=3,
            )
            return
        try:
            margin = float(cfg.get("gate_range_margin", RANGE_MARGIN))
            # files calibrated before gate_fade_scale existed keep the scale they had
            fade_scale = float(cfg.get("gate_fade_scale", LEGACY_FADE_SCALE))
            self.set_gate_ranges(name, cfg["gate_ranges"], margin, fade_scale)
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise AdapterFormatError(f"adapter {where}: bad gate_ranges: {exc}") from exc

    def _check_base(self, base: Mapping[str, Any], where: str) -> None:
        if base.get("fingerprint") in self.accepted_fingerprints:
            return
        mine = self.base_info
        hint = ""
        if base.get("fingerprint_version") is None:  # version 1: hashed as float64
            hint = (
                "; it was written before fingerprints became precision-independent, so it "
                "matches its base only in the dtype it was trained in: load it in that dtype "
                "(float64 by default) and save it again to serve it in any precision"
            )
        raise BaseModelMismatchError(
            f"adapter {where} was trained on base model {str(base.get('fingerprint'))[:12]}… "
            f"({base.get('model_class')}, elements {base.get('atomic_numbers')}, hidden "
            f"{base.get('hidden_irreps')}), not on this one {self.fingerprint[:12]}… "
            f"({mine['model_class']}, elements {mine['atomic_numbers']}, "
            f"hidden {mine['hidden_irreps']}){hint}"
        )

    def _copy_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        params = dict(self.named_adapter_parameters(name))
        missing = sorted(set(params) - set(tensors))
        extra = sorted(set(tensors) - set(params))
        if missing or extra:
            raise AdapterFormatError(
                f"adapter {where} tensors do not match its config: missing {missing}, "
                f"unexpected {extra}"
            )
        for key, param in params.items():
            value = tensors[key]
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterFormatError(
                    f"adapter {where} tensor {key!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(param.shape)} for this base and rank"
                )
            if not torch.isfinite(value).all():
                raise AdapterFormatError(f"adapter {where} tensor {key!r} holds NaN/inf")
            with torch.no_grad():
                param.copy_(value.to(dtype=param.dtype, device=param.device))
