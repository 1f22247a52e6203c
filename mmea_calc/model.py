"""AdaptedModel: one frozen MACE base plus named, swappable MMEA adapters (PEFT-style verbs)."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mmea_calc._deps import o3
from mmea_calc.adapter import PHI_CHOICES, MMEAGate, MMEALinear, Routing, _RoutingSource
from mmea_calc.base import base_info, load_base
from mmea_calc.errors import AdapterExistsError, AdapterNotFoundError, TargetError

__all__ = ["ADAPTER_INDEX_KEY", "AdaptedModel", "MMEAConfig"]

logger = logging.getLogger(__name__)

#: Graph-dict key of the per-node adapter index (into ``AdaptedModel.adapter_names``; -1 = base).
ADAPTER_INDEX_KEY = "mmea_adapter_index"


@dataclass
class MMEAConfig:
    """Hyper-parameters of one MMEA adapter.

    Attributes:
        rank: width ``r`` of the SiLU bottleneck feeding the gates.
        phi: ``"exp"`` (default) or ``"1+x"``, the map from gate logit to scale.
        targets: ``None`` for every ``o3.Linear`` with internal weights, or module names / glob
            patterns (``"interactions.*.linear"``); each pattern must match something.
        shift_init_std: std of the normal init of ``W_s`` (0 keeps the adapter an exact identity).
        logit_bound: soft bound ``c`` on gate logits (``c tanh(g / c)``), so that ``exp`` cannot
            overflow far outside the training data; ``None`` for the paper's unbounded map.
    """

    rank: int = 16
    phi: str = "exp"
    targets: str | Sequence[str] | None = None
    shift_init_std: float = 0.0
    logit_bound: float | None = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.phi not in PHI_CHOICES:
            raise ValueError(f"phi={self.phi!r} is not supported; valid: {list(PHI_CHOICES)}")
        if self.logit_bound is not None and not self.logit_bound > 0:
            raise ValueError(f"logit_bound must be > 0 or None, got {self.logit_bound!r}")
        if self.shift_init_std < 0:
            raise ValueError(f"shift_init_std must be >= 0, got {self.shift_init_std}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        elif self.targets is not None:
            self.targets = list(self.targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _AdapterRecord:
    config: MMEAConfig
    targets: list[str]
    e0s: dict[int, float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _adaptable_linears(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    found = {}
    for name, module in base.named_modules():
        if isinstance(module, MMEALinear):
            found[name] = module
        elif isinstance(module, o3.Linear) and module.internal_weights and "base_layer" not in name:
            found[name] = module
    return found


def _match(pattern: str, name: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or name.endswith("." + pattern)


class AdaptedModel(torch.nn.Module):
    """A frozen MACE base with named MMEA adapters.

    Calling the model takes and returns what the MACE model does (graph dict in; ``energy``,
    ``forces``, ``stress``... out). Nodes use the active adapter, or — when the graph dict holds
    ``ADAPTER_INDEX_KEY`` — each node its own (see :meth:`route`).

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> model = AdaptedModel(build_tiny_mace())
        >>> model.add_adapter("water", MMEAConfig(rank=4))
        >>> model.adapter_names, model.active_adapter
        (['water'], 'water')
        >>> model.num_trainable_parameters("water") > 0
        True
    """

    def __init__(self, base: torch.nn.Module | str | os.PathLike) -> None:
        super().__init__()
        base = load_base(base)
        self.base_model = base
        self.base_info = base_info(base)
        self._routing = _RoutingSource()
        self._records: dict[str, _AdapterRecord] = {}
        self._active: str | None = None
        self._disabled = False
        self._e0_cache: dict[tuple, torch.Tensor] = {}

    # ---------------------------------------------------------------- introspection
    @property
    def fingerprint(self) -> str:
        """The base model's fingerprint (see :func:`mmea_calc.base.fingerprint`)."""
        return self.base_info["fingerprint"]

    @property
    def adapter_names(self) -> list[str]:
        return list(self._records)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base_model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def adapter_config(self, name: str) -> MMEAConfig:
        return self._record(name).config

    def adapter_targets(self, name: str) -> list[str]:
        return list(self._record(name).targets)

    def adapter_metadata(self, name: str) -> dict[str, Any]:
        """Free-form metadata kept with the adapter (environment, training summary, ...)."""
        return self._record(name).metadata

    def adapter_e0s(self, name: str) -> dict[int, float] | None:
        """Per-element energy corrections (eV, by atomic number) the adapter adds, if any."""
        return self._record(name).e0s

    def set_adapter_e0s(self, name: str, e0s: Mapping[int, float] | None) -> None:
        """Set (or clear, with ``None``) the per-element energy corrections of an adapter."""
        record = self._record(name)
        record.e0s = {int(z): float(v) for z, v in e0s.items()} if e0s else None
        self._e0_cache = {k: v for k, v in self._e0_cache.items() if k[0] != name}

    def _record(self, name: str) -> _AdapterRecord:
        if name not in self._records:
            raise AdapterNotFoundError(
                f"no adapter named {name!r}; loaded adapters: {self.adapter_names or 'none'}"
            )
        return self._records[name]

    def _wrapped(self) -> dict[str, MMEALinear]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, MMEALinear)}

    def adaptable_modules(self) -> dict[str, str]:
        """Names of the linears MMEA can target, with their ``irreps_in -> irreps_out``."""
        return {
            n: f"{m.irreps_in} -> {m.irreps_out}"
            for n, m in _adaptable_linears(self.base_model).items()
        }

    # ---------------------------------------------------------------- adapter management
    def resolve_targets(self, targets: Sequence[str] | None) -> list[str]:
        """Module names selected by ``targets`` (``None`` = every adaptable linear)."""
        available = _adaptable_linears(self.base_model)
        usable = {n for n, m in available.items() if _scalar_width(m) > 0}
        if targets is None:
            chosen = [n for n in available if n in usable]
        else:
            chosen = []
            for pattern in targets:
                hits = [n for n in available if _match(pattern, n)]
                if not hits:
                    raise TargetError(
                        f"target {pattern!r} matches no adaptable o3.Linear; available: "
                        f"{sorted(available)}"
                    )
                bad = [n for n in hits if n not in usable]
                if bad:
                    raise TargetError(f"targets {bad} have no 0e input block to drive gates")
                chosen += [n for n in hits if n not in chosen]
        if not chosen:
            raise TargetError("no adaptable o3.Linear (with internal weights) in the base model")
        return [n for n in available if n in chosen]

    def add_adapter(
        self,
        name: str,
        config: MMEAConfig | None = None,
        *,
        e0s: Mapping[int, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        set_active: bool = True,
    ) -> None:
        """Add a fresh (identity) adapter and, by default, make it active."""
        if not isinstance(name, str) or not name or name == "base" or "." in name:
            raise ValueError(
                f"adapter name {name!r} is not valid: use a non-empty string without '.', "
                "other than 'base'"
            )
        if name in self._records:
            raise AdapterExistsError(
                f"an adapter named {name!r} is already loaded; delete it first or pick "
                f"another name (loaded: {self.adapter_names})"
            )
        config = config or MMEAConfig()
        targets = self.resolve_targets(config.targets)
        for target in targets:
            wrapper = self._wrap(target)
            lay = wrapper.layout
            wrapper.mmea_adapters[name] = MMEAGate(
                lay.num_scalar_in,
                config.rank,
                lay.num_gates,
                lay.num_shifts,
                phi=config.phi,
                shift_init_std=config.shift_init_std,
                logit_bound=config.logit_bound,
                dtype=self.dtype,
                device=self.device,
            )
        self._records[name] = _AdapterRecord(
            config=config,
            targets=targets,
            e0s={int(z): float(v) for z, v in e0s.items()} if e0s else None,
            metadata=dict(metadata or {}),
        )
        if set_active:
            self.set_adapter(name)

    def _wrap(self, target: str) -> MMEALinear:
        module = self.base_model.get_submodule(target)
        if isinstance(module, MMEALinear):
            return module
        parent_name, _, child = target.rpartition(".")
        parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
        wrapper = MMEALinear(module, self._routing).to(self.device)
        setattr(parent, child, wrapper)
        return wrapper

    def _unwrap_empty(self) -> None:
        for target, wrapper in self._wrapped().items():
            if not wrapper.mmea_adapters:
                parent_name, _, child = target.rpartition(".")
                parent = (
                    self.base_model.get_submodule(parent_name) if parent_name else self.base_model
                )
                setattr(parent, child, wrapper.base_layer)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` active for nodes without explicit routing (``None``/``"base"``: none)."""
        if name in (None, "base"):
            self._active = None
            return
        self._record(name)
        self._active = name

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and its tensors; the base is left exactly as loaded."""
        self._record(name)
        for wrapper in self._wrapped().values():
            if name in wrapper.mmea_adapters:
                del wrapper.mmea_adapters[name]
        del self._records[name]
        self._e0_cache = {k: v for k, v in self._e0_cache.items() if k[0] != name}
        if self._active == name:
            self._active = None
        self._unwrap_empty()

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Context manager in which the model is the bare base model."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    def adapter_parameters(self, name: str) -> Iterator[torch.nn.Parameter]:
        """The trainable tensors of one adapter."""
        for _, param in self.named_adapter_parameters(name):
            yield param

    def named_adapter_parameters(self, name: str) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(key, tensor)`` pairs of one adapter; keys as in the adapter file."""
        record = self._record(name)
        wrappers = self._wrapped()
        for target in record.targets:
            for pname, param in wrappers[target].mmea_adapters[name].named_parameters():
                yield f"{target}.{pname}", param

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_adapter_parameters(name)}

    def num_trainable_parameters(self, name: str) -> int:
        """Number of scalars one adapter trains (its gates; the frozen base not counted)."""
        return sum(p.numel() for p in self.adapter_parameters(name))

    def save_adapter(self, name: str, directory: str | os.PathLike, **kw: Any) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``."""
        from mmea_calc.io import save_adapter

        save_adapter(self, name, directory, **kw)

    def load_adapter(
        self, directory: str | os.PathLike, name: str | None = None, *, set_active: bool = True
    ) -> str:
        """Load an adapter directory (validated against this base); returns its name."""
        from mmea_calc.io import load_adapter

        return load_adapter(self, directory, name=name, set_active=set_active)

    # ---------------------------------------------------------------- forward
    def route(self, data: dict[str, torch.Tensor], adapters: Sequence[str | None]) -> None:
        """Put per-node adapter indices into ``data`` from one adapter name per graph."""
        index = {n: i for i, n in enumerate(self.adapter_names)}
        per_graph = []
        for name in adapters:
            if name in (None, "base"):
                per_graph.append(-1)
            else:
                self._record(name)
                per_graph.append(index[name])
        per_graph_t = torch.tensor(per_graph, dtype=torch.long, device=data["batch"].device)
        data[ADAPTER_INDEX_KEY] = per_graph_t[data["batch"]]

    def _routing_for(self, data: Mapping[str, Any]) -> Routing | None:
        if self._disabled:
            return None
        node_index = data.get(ADAPTER_INDEX_KEY) if hasattr(data, "get") else None
        if node_index is None:
            return Routing(names=(self._active,)) if self._active is not None else None
        names = tuple(self.adapter_names)
        return Routing(names=names, node_slot=node_index.to(torch.long))

    def _e0_table(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        if key not in self._e0_cache:
            e0s = self._records[name].e0s or {}
            zs = self.base_info["atomic_numbers"]
            self._e0_cache[key] = torch.tensor(
                [e0s.get(z, 0.0) for z in zs], dtype=dtype, device=device
            )
        return self._e0_cache[key]

    def _node_e0_shift(self, data: Mapping[str, Any], routing: Routing) -> torch.Tensor | None:
        attrs = data["node_attrs"]
        element = attrs.argmax(dim=1)
        shift = None
        for slot, name in enumerate(routing.names):
            if name is None or not self._records[name].e0s:
                continue
            table = self._e0_table(name, attrs.dtype, attrs.device)
            values = table.index_select(0, element)
            if routing.node_slot is not None:
                values = values * (routing.node_slot == slot).to(values.dtype)
            shift = values if shift is None else shift + values
        return shift

    def forward(self, data: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, Any]:
        routing = self._routing_for(data)
        self._routing.routing = routing
        try:
            out = self.base_model(data, **kwargs)
        finally:
            self._routing.routing = None
        if routing is not None:
            shift = self._node_e0_shift(data, routing)
            if shift is not None:
                out = dict(out)
                num_graphs = out["energy"].shape[0]
                graph_shift = torch.zeros(num_graphs, dtype=shift.dtype, device=shift.device)
                graph_shift = graph_shift.index_add(0, data["batch"], shift)
                out["energy"] = out["energy"] + graph_shift
                if out.get("node_energy") is not None:
                    out["node_energy"] = out["node_energy"] + shift
        return out


def _scalar_width(module: torch.nn.Module) -> int:
    irreps_in = o3.Irreps(str(module.irreps_in))
    return sum(mul for mul, ir in irreps_in if ir == o3.Irrep("0e"))
