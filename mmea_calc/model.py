"""AdaptedModel: one frozen MACE base plus named, swappable MMEA adapters (PEFT-style verbs).

The base module is never modified: the adapters live in the :class:`AdaptedModel` (one
:class:`~mmea_calc.adapter.MMEALayer` per targeted linear) and act through forward hooks that
are registered on the base's linears for the duration of one call and removed in ``finally``;
the ``paper`` preset's updates of base tensors (:mod:`mmea_calc.paper`) are substituted for one
call with :func:`torch.func.functional_call`, or applied by per-call hooks in mixed batches.
Which adapter serves which node travels with the call, in the graph dict
(:data:`ADAPTER_INDEX_KEY`), so any number of models (and calculators) can share one base.
Forward calls on one base take turns (:func:`base_lock`, one re-entrant lock per base module):
models and calculators sharing a base are correct when called from several threads at once,
and calls on different bases still run in parallel. (A lock, not call-scoped hooks: the hooks
must sit on the shared module for mace's forward to reach them, and a MACE forward with forces
keeps torch's cores busy anyway.) Calling the *bare* base module directly from another thread
while an adapted call runs is not covered: that call would see the hooks.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmea_calc._deps import e3nn_jit, o3
from mmea_calc.adapter import (
    FrozenMMEALinear,
    Mixture,
    MMEALayer,
    Route,
)
from mmea_calc.base import load_base
from mmea_calc.config import MMEAConfig
from mmea_calc.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    TargetError,
)
from mmea_calc.identity import base_info, fingerprints
from mmea_calc.mace_model import (
    fold_e0_corrections,
    model_heads,
    node_energy_module,
    node_wise_linears,
    resolve_head,
)
from mmea_calc.model_files import AdapterFiles
from mmea_calc.paper import PaperParts, mixed_hooks
from mmea_calc.routing import (
    ADAPTER_INDEX_KEY,
    DEFAULT_SHARPNESS,
    PER_ATOM_KEY,
    SHARPNESS_KEY,
    NeighbourhoodStatistics,
    mixture_tables,
    mixture_weights,
    neighbourhood_descriptor,
)

__all__ = ["ADAPTER_INDEX_KEY", "PER_ATOM_KEY", "SHARPNESS_KEY", "AdaptedModel", "MMEAConfig"]

logger = logging.getLogger(__name__)

BASE_NAMES = (None, "base")


@dataclass
class _AdapterRecord:
    config: MMEAConfig
    targets: list[str]
    head: str
    e0s: dict[int, float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _scalar_width(module: torch.nn.Module) -> int:
    irreps_in = o3.Irreps(str(module.irreps_in))
    return sum(mul for mul, ir in irreps_in if ir == o3.Irrep("0e"))


def _match(pattern: str, name: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or name.endswith("." + pattern)


def _layer_key(target: str) -> str:
    """ModuleDict key of a target (``.`` is not allowed there; ``-`` never occurs in names)."""
    return target.replace(".", "-")


def _hook(layer: MMEALayer, route: Route, module: Any, args: tuple, output: Any) -> Any:
    return layer(args[0], output, route)


def _per_graph_max(grades: list[torch.Tensor], data: Mapping[str, Any]) -> torch.Tensor:
    """Each graph's largest node value, ``[num_graphs]`` (0 where no node is outside)."""
    node = torch.stack(grades).amax(dim=0)
    num_graphs = int(data["ptr"].shape[0]) - 1
    out = node.new_zeros(num_graphs)
    return out.scatter_reduce(0, data["batch"], node, reduce="amax", include_self=True)


def _slot_rows(data: Mapping[str, Any], route: Route) -> tuple[list, list]:
    """Per slot of a mixed route: its node indices and the indices of the edges they send."""
    sender = data["edge_index"][0]
    num_nodes = int(data["node_attrs"].shape[0])
    nodes, edges = [], []
    for _, index in route.slots:
        mask = torch.zeros(num_nodes, dtype=torch.bool, device=sender.device)
        mask[index] = True
        nodes.append(index)
        edges.append(torch.nonzero(mask[sender]).squeeze(1))
    return nodes, edges


_BASE_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = (
    weakref.WeakKeyDictionary()
)
_BASE_LOCKS_GUARD = threading.Lock()


def base_lock(base: torch.nn.Module) -> threading.RLock:
    """The lock serialising forward calls on ``base`` across every :class:`AdaptedModel` (and
    thread) that shares it: hooks registered on a shared module for one call would act on a
    concurrent call's nodes. Re-entrant, so a call may run nested forwards on the same base."""
    with _BASE_LOCKS_GUARD:
        lock = _BASE_LOCKS.get(base)
        if lock is None:
            lock = _BASE_LOCKS[base] = threading.RLock()
        return lock


def _e0_dict(e0s: Mapping[int, float] | None) -> dict[int, float] | None:
    return {int(z): float(v) for z, v in e0s.items()} if e0s else None


# e3nn.util.jit.compile(model) would script the (shared) base in place, leaving the per-call
# hooks on linears that no longer run: the bare base, silently. Refuse instead; export with
# AdaptedModel.freeze(name) or mmea_calc.export.
@e3nn_jit.compile_mode("unsupported")
class AdaptedModel(AdapterFiles, torch.nn.Module):
    """A frozen MACE base with named MMEA adapters.

    Calling the model takes and returns what the MACE model does (graph dict in; ``energy``,
    ``forces``, ``stress``... out). Nodes use the active adapter, or — when the graph dict holds
    :data:`ADAPTER_INDEX_KEY` — each node its own (see :meth:`route`).

    Args:
        base: a MACE module (used in place, frozen; never copied), or anything
            :func:`~mmea_calc.load_base` takes.
        device, dtype: passed to :func:`~mmea_calc.load_base`; ``None`` keeps a module's.

    ``revision`` counts changes that alter what the model computes (adapters added, loaded or
    deleted, E0 corrections set, the active adapter changed): calculators compare it to know
    that cached results are stale.

    Example:
        >>> from mmea_calc.testing import build_tiny_mace
        >>> model = AdaptedModel(build_tiny_mace())
        >>> model.add_adapter("water", MMEAConfig(rank=4))
        >>> model.adapter_names, model.active_adapter
        (['water'], 'water')
        >>> model.num_trainable_parameters("water") > 0
        True
    """

    def __init__(
        self,
        base: torch.nn.Module | str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base_model = load_base(base, device=device, dtype=dtype)
        self.mmea_layers = torch.nn.ModuleDict()
        self.paper_parts = torch.nn.ModuleDict()  # adapter name -> PaperParts (preset "paper")
        # plain dicts, not submodules here: the linears MMEA can gate, and the others with why
        self._linears, self._not_gateable = node_wise_linears(self.base_model)
        self._records: dict[str, _AdapterRecord] = {}
        self._active: str | None = None
        self._disabled = False
        self._revision = 0
        self._base_info: dict[str, Any] | None = None
        self._fingerprints: set[str] | None = None
        self._e0_tables: dict[tuple, torch.Tensor] = {}
        self._mixture_tables: dict[tuple, tuple[torch.Tensor, ...]] = {}
        # (node index, its version, (revision, num_nodes), route): see _route
        self._route_cache: tuple | None = None

    def __getattr__(self, name: str) -> Any:
        """torch's lookup of submodules, parameters and buffers; a clear refusal where a caller
        wants an attribute of a MACE module (``r_max``, ``atomic_numbers``, ``interactions``...):
        mace's own wrappers (``MaceTorchSimModel``, ``MACECalculator``, the cuEquivariance and
        LAMMPS converters) would run or rebuild the bare base and lose the adapters."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_model")
            if base is None or name.startswith("__") or not hasattr(base, name):
                raise
        raise AttributeError(
            f"AdaptedModel has no attribute {name!r}: it is not a MACE module, and mace's own "
            "wrappers (MaceTorchSimModel, MACECalculator, cuEquivariance/LAMMPS converters) "
            "cannot serve its adapters. Use mmea_calc.torchsim.MMEAModel or MMEACalculator, "
            "AdaptedModel.freeze(name) for a plain MACE module with one adapter baked in, or "
            ".base_model for the bare base"
        )

    # ---------------------------------------------------------------- introspection
    @property
    def base_info(self) -> dict[str, Any]:
        """The base's identity (:func:`mmea_calc.identity.base_info`), computed on first use."""
        if self._base_info is None:
            self._base_info = base_info(self.base_model)
        return self._base_info

    @property
    def fingerprint(self) -> str:
        """The base model's fingerprint (see :func:`mmea_calc.identity.fingerprint`)."""
        return self.base_info["fingerprint"]

    @property
    def accepted_fingerprints(self) -> set[str]:
        """The fingerprints an adapter file may record to load onto this base: this version's
        and the precision-dependent one files written before it hold
        (:func:`mmea_calc.identity.fingerprints`)."""
        if self._fingerprints is None:
            self._fingerprints = fingerprints(self.base_model)
        return self._fingerprints

    @property
    def revision(self) -> int:
        return self._revision

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

    def set_adapter_environment(self, name: str, environment: Mapping[str, Any] | None) -> None:
        """Set the description of adapter ``name``'s training environment
        (:func:`~mmea_calc.describe_environment`): automatic selection and per-atom routing
        read it, and :meth:`save_adapter` writes it."""
        self._record(name).metadata["environment"] = (
            None if environment is None else dict(environment)
        )
        self._changed()

    @property
    def heads(self) -> list[str]:
        """The base's heads (``["Default"]`` for a single-head model)."""
        return model_heads(self.base_model)

    def adapter_head(self, name: str) -> str:
        """The head of the base adapter ``name`` belongs to (see :meth:`add_adapter`)."""
        return self._record(name).head

    def check_head(self, names: Sequence[str | None], head: str) -> None:
        """Raise :class:`~mmea_calc.errors.ConfigError` unless every adapter in ``names``
        (``None``/``"base"``: the bare base, any head) belongs to ``head``."""
        other = {n: self._record(n).head for n in names if n not in BASE_NAMES}
        other = {n: h for n, h in other.items() if h != head}
        if other:
            raise ConfigError(
                f"adapters {sorted(other)} belong to heads {sorted(set(other.values()))}, not to "
                f"head {head!r}: an adapter serves the head it was trained on (its E0 "
                "corrections are that head's); serve it with head=<its head>"
            )

    def adapter_e0s(self, name: str) -> dict[int, float] | None:
        """Per-element energy corrections (eV, by atomic number) the adapter adds, if any."""
        return self._record(name).e0s

    def set_adapter_e0s(self, name: str, e0s: Mapping[int, float] | None) -> None:
        """Set (or clear, with ``None``) the per-element energy corrections of an adapter."""
        self._record(name).e0s = _e0_dict(e0s)
        self._changed()

    def _changed(self) -> None:
        self._revision += 1
        self._e0_tables.clear()
        self._mixture_tables.clear()
        self._route_cache = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> AdaptedModel:
        """``.to()``/``.float()``/``.double()``...: convert, then forget what was computed from
        the old tensors (the base's identity is recomputed on demand) and bump the revision."""
        module = super()._apply(fn, *args, **kwargs)
        self._base_info = None
        self._fingerprints = None
        self._changed()
        return module

    def _record(self, name: str) -> _AdapterRecord:
        if name not in self._records:
            raise AdapterNotFoundError(
                f"no adapter named {name!r}; loaded adapters: {self.adapter_names or 'none'}"
            )
        return self._records[name]

    def adaptable_modules(self) -> dict[str, str]:
        """Names of the linears MMEA can target, with their ``irreps_in -> irreps_out``."""
        return {n: f"{m.irreps_in} -> {m.irreps_out}" for n, m in self._linears.items()}

    def layer(self, target: str) -> MMEALayer:
        """The :class:`~mmea_calc.adapter.MMEALayer` of a targeted linear."""
        key = _layer_key(target)
        if key not in self.mmea_layers:
            raise TargetError(f"{target!r} is not targeted by any adapter of this model")
        return self.mmea_layers[key]

    # ---------------------------------------------------------------- adapter management
    def resolve_targets(self, targets: Sequence[str] | None) -> list[str]:
        """Module names selected by ``targets`` (``None`` = every adaptable linear).

        Adaptable are the node-wise ``o3.Linear`` modules of mace's blocks
        (:func:`~mmea_calc.mace_model.node_wise_linears`); any other ``o3.Linear`` is left
        out of the default set, and a pattern that matches one raises :class:`TargetError`
        naming it and why.
        """
        available = self._linears
        usable = {n for n, m in available.items() if _scalar_width(m) > 0}
        if targets is None:
            chosen = [n for n in available if n in usable]
            if self._not_gateable:
                logger.warning(
                    "MMEA leaves %d o3.Linear modules of the base ungated: %s",
                    len(self._not_gateable),
                    "; ".join(f"{n}: {why}" for n, why in self._not_gateable.items()),
                )
        else:
            chosen = []
            for pattern in targets:
                refused = [n for n in self._not_gateable if _match(pattern, n)]
                if refused:
                    raise TargetError(
                        f"target {pattern!r} matches o3.Linear modules MMEA cannot gate: "
                        + "; ".join(f"{n!r}: {self._not_gateable[n]}" for n in refused)
                    )
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
            others = "; ".join(f"{n!r}: {why}" for n, why in self._not_gateable.items())
            raise TargetError(
                "no adaptable o3.Linear (node-wise, with internal weights and a 0e input) in the "
                "base model" + (f"; o3.Linear modules MMEA cannot gate: {others}" if others else "")
            )
        return [n for n in available if n in chosen]

    def add_adapter(
        self,
        name: str,
        config: MMEAConfig | None = None,
        *,
        e0s: Mapping[int, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        set_active: bool = True,
        is_trainable: bool = True,
        init_weights: bool = True,
        head: str | None = None,
    ) -> None:
        """Add a fresh (identity) adapter and, by default, make it active.

        ``head``: the head of a multi-head base the adapter belongs to (its E0 corrections are
        for that head, and it serves structures on that head only); ``None``: the base's only
        head or its ``Default`` head (:func:`~mmea_calc.mace_model.resolve_head`).

        Its tensors go to the device and dtype of each targeted linear (the base is not moved).
        ``init_weights=False`` draws no random numbers: every tensor starts at zero, for
        tensors about to be loaded (:meth:`load_adapter` uses it, so loading leaves torch's
        global RNG as it was).
        """
        if not isinstance(name, str) or not name or name == "base" or "." in name:
            raise ConfigError(
                f"adapter name {name!r} is not valid: use a non-empty string without '.', "
                "other than 'base'"
            )
        if name in self._records:
            raise AdapterExistsError(
                f"an adapter named {name!r} is already loaded; delete it first or pick "
                f"another name (loaded: {self.adapter_names})"
            )
        config = config or MMEAConfig()
        head = resolve_head(self.heads, head)
        targets = self.resolve_targets(config.targets)
        try:  # a failure half-way leaves no gate behind
            for target in targets:
                key = _layer_key(target)
                linear = self._linears[target]
                if key not in self.mmea_layers:
                    self.mmea_layers[key] = MMEALayer(linear)
                gate = self.mmea_layers[key].add_gate(
                    name,
                    config.rank,
                    like=linear.weight,
                    phi=config.phi,
                    shift_init_std=config.shift_init_std,
                    logit_bound=config.logit_bound,
                    init_weights=init_weights,
                )
                gate.requires_grad_(is_trainable)
            if config.preset == "paper":
                parts = PaperParts(self.base_model, config.rank, config.lora_scaling, init_weights)
                self.paper_parts[name] = parts.requires_grad_(is_trainable)
        except BaseException:
            self._remove_tensors(name, targets)
            raise
        self._records[name] = _AdapterRecord(
            config=config,
            targets=targets,
            head=head,
            e0s=_e0_dict(e0s),
            metadata=dict(metadata or {}),
        )
        self._changed()
        if set_active:
            self.set_adapter(name)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` active for nodes without explicit routing (``None``/``"base"``: none)."""
        if name not in BASE_NAMES:
            self._record(name)
        else:
            name = None
        if name != self._active:
            self._active = name
            self._changed()

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and its tensors (the base is never touched)."""
        record = self._record(name)
        self._remove_tensors(name, record.targets)
        del self._records[name]
        if self._active == name:
            self._active = None
        self._changed()

    def _remove_tensors(self, name: str, targets: Sequence[str]) -> None:
        for target in targets:
            key = _layer_key(target)
            if key not in self.mmea_layers:
                continue
            layer = self.mmea_layers[key]
            if name in layer.gates:
                del layer.gates[name]
            if not layer.gates:
                del self.mmea_layers[key]
        if name in self.paper_parts:
            del self.paper_parts[name]

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Context manager in which the model is the bare base model."""
        previous, self._disabled = self._disabled, True
        self._changed()  # what the model computes changes: calculators must not reuse results
        try:
            yield
        finally:
            self._disabled = previous
            self._changed()

    def adapter_parameters(self, name: str) -> Iterator[torch.nn.Parameter]:
        """The tensors of one adapter."""
        for _, param in self.named_adapter_parameters(name):
            yield param

    def named_adapter_parameters(self, name: str) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(key, tensor)`` pairs of one adapter; keys as in the adapter file."""
        for target in self._record(name).targets:
            gate = self.mmea_layers[_layer_key(target)].gates[name]
            for pname, param in gate.named_parameters():
                yield f"{target}.{pname}", param
        if name in self.paper_parts:
            yield from self.paper_parts[name].named_tensors()

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_adapter_parameters(name)}

    def num_trainable_parameters(self, name: str) -> int:
        """Number of scalars one adapter holds (what training updates; the base not counted)."""
        return sum(p.numel() for p in self.adapter_parameters(name))

    def parameters_per_part(self, name: str) -> dict[str, int]:
        """Scalars of adapter ``name`` per part: ``gates`` and, for the ``paper`` preset, the
        parts of :data:`mmea_calc.paper.PARTS`. The values sum to
        :meth:`num_trainable_parameters`."""
        record = self._record(name)
        gates = (self.mmea_layers[_layer_key(t)].gates[name] for t in record.targets)
        counts = {"gates": sum(p.numel() for g in gates for p in g.parameters())}
        if name in self.paper_parts:
            counts.update(self.paper_parts[name].parameters_per_part())
        return counts

    def check_per_atom(self, names: Sequence[str]) -> None:
        """Raise :class:`~mmea_calc.errors.ConfigError` unless per-atom routing can serve the
        adapters ``names``: preset ``gates`` only, each with its neighbourhood statistics."""
        paper = [n for n in names if n in self.paper_parts]
        if paper:
            raise ConfigError(
                f"per-atom routing cannot serve adapters {paper} (preset 'paper'): it blends "
                "gates per atom, but their radial-MLP LoRA and Bessel frequencies act on edges "
                "(an edge between atoms with different weights has no single radial function) "
                "and their skip-TP and contraction updates are not gates; route them per "
                "structure (select='auto' or a name), or train preset 'gates' adapters"
            )
        for name in names:
            self.neighbourhood_statistics(name)

    # ---------------------------------------------------------------- forward
    def route(self, data: dict[str, torch.Tensor], adapters: Sequence[str | None]) -> None:
        """Put per-node adapter indices into ``data`` from one adapter name per graph."""
        index = {n: i for i, n in enumerate(self.adapter_names)}
        per_graph = []
        for name in adapters:
            if name in BASE_NAMES:
                per_graph.append(-1)
            else:
                self._record(name)
                per_graph.append(index[name])
        per_graph_t = torch.tensor(per_graph, dtype=torch.long, device=data["batch"].device)
        data[ADAPTER_INDEX_KEY] = per_graph_t[data["batch"]]
        data.pop(PER_ATOM_KEY, None)

    def route_per_atom(
        self,
        data: dict[str, torch.Tensor],
        adapters: Sequence[str] | None = None,
        sharpness: float = DEFAULT_SHARPNESS,
    ) -> None:
        """Mark ``data`` for per-atom routing: every node mixes ``adapters`` (default: all)
        with weights from its own neighbourhood (:mod:`mmea_calc.routing`). The forward output
        then holds ``adapter_weights`` ``[n_nodes, len(adapter_names)]``."""
        names = list(self.adapter_names if adapters is None else adapters)
        if not names:
            raise AdapterNotFoundError("per-atom routing needs at least one loaded adapter")
        self.check_per_atom(names)
        if not sharpness > 0:
            raise ConfigError(f"the routing sharpness must be > 0, got {sharpness!r}")
        attrs = data["node_attrs"]
        self._tables(tuple(names), attrs.dtype, attrs.device)  # checks them once (then cached)
        device = data["batch"].device
        index = [self.adapter_names.index(n) for n in names]
        data[PER_ATOM_KEY] = torch.tensor(index, dtype=torch.long, device=device)
        data[SHARPNESS_KEY] = torch.tensor(float(sharpness), dtype=torch.float64)
        data.pop(ADAPTER_INDEX_KEY, None)

    def neighbourhood_statistics(self, name: str) -> dict[int, tuple[list[float], list[float]]]:
        """``{atomic number: (mean, std)}`` of adapter ``name``'s per-atom routing descriptor
        over its training atoms, from its environment (``environment["neighbourhood"]``)."""
        environment = self.adapter_metadata(name).get("environment") or {}
        document = environment.get("neighbourhood")
        if document is None:
            raise ConfigError(
                f"adapter {name!r} holds no neighbourhood statistics, which per-atom routing "
                "needs (adapters trained before mmea_calc 0.3 lack them); record them from its "
                "training data with `mmea-calc calibrate ADAPTER_DIR --base BASE --data "
                "TRAIN.xyz`"
            )
        radial = int(self.base_model.radial_embedding.out_dim)
        dim = radial * len(self.base_info["atomic_numbers"])
        return NeighbourhoodStatistics.check(document, dim, f"adapter {name!r}")

    def _tables(self, names: tuple[str, ...], dtype: torch.dtype, device: torch.device) -> tuple:
        key = (names, dtype, device)
        if key not in self._mixture_tables:
            stats = [self.neighbourhood_statistics(n) for n in names]
            zs = self.base_info["atomic_numbers"]
            dim = len(next(iter(stats[0].values()))[0])
            self._mixture_tables[key] = mixture_tables(stats, zs, dim, dtype, device)
        return self._mixture_tables[key]

    def _mixture_route(self, data: dict[str, Any], per_atom: torch.Tensor) -> Route:
        if data.get(ADAPTER_INDEX_KEY) is not None:
            raise ConfigError(
                f"the graph dict holds both {ADAPTER_INDEX_KEY} and {PER_ATOM_KEY}: route a "
                "call either per structure or per atom"
            )
        names_all = self.adapter_names
        indices = per_atom.tolist()
        if not indices or min(indices) < 0 or max(indices) >= len(names_all):
            raise AdapterNotFoundError(
                f"{PER_ATOM_KEY} holds indices {indices}; valid are 0..{len(names_all) - 1} "
                f"(adapters {names_all})"
            )
        names = tuple(names_all[i] for i in indices)
        if any(n in self.paper_parts for n in names):
            self.check_per_atom(names)  # raises: they cannot be mixed per atom
        attrs = data["node_attrs"]
        tables = self._tables(names, attrs.dtype, attrs.device)
        element = attrs.argmax(dim=1)
        sharpness = float(data.get(SHARPNESS_KEY, DEFAULT_SHARPNESS))

        def compute() -> torch.Tensor:
            descriptors = neighbourhood_descriptor(self.base_model, data)
            return mixture_weights(descriptors, element, tables, sharpness)

        slots = tuple((name, None) for name in names)
        return Route(int(attrs.shape[0]), slots, mixture=Mixture(names, compute))

    def _mixture_energy_hook(self, data: Mapping[str, Any], route: Route) -> Any:
        """A forward hook adding each node's weighted E0 correction to its interaction energy,
        so that forces and stress include the weights' gradient (``None``: no corrections)."""
        names = route.mixture.names
        if not any(self._records[n].e0s for n in names):
            return None
        attrs = data["node_attrs"]
        rows = [self.adapter_names.index(n) + 1 for n in names]
        table = self._e0_table(attrs.dtype, attrs.device)[rows]  # [K, n_el]
        per_node = table[:, attrs.argmax(dim=1)].transpose(0, 1)  # [n, K]
        mixture = route.mixture

        def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
            shift = (mixture.weights() * per_node).sum(dim=1)
            return output + shift.view(-1, *([1] * (output.dim() - 1)))

        return hook

    def _route(self, data: Mapping[str, Any]) -> Route | None:
        """The route of one call: from ``data[ADAPTER_INDEX_KEY]`` or the active adapter."""
        if self._disabled:
            return None
        per_atom = data.get(PER_ATOM_KEY)
        if per_atom is not None:
            return self._mixture_route(data, per_atom)
        num_nodes = int(data["node_attrs"].shape[0])
        node_index = data.get(ADAPTER_INDEX_KEY)
        if node_index is None:
            return None if self._active is None else Route(num_nodes, ((self._active, None),))
        cached = self._route_cache
        if (
            cached is not None
            and cached[0] is node_index
            and cached[1] == node_index._version
            and cached[2] == (self._revision, num_nodes)
        ):
            return cached[3]
        route = self._index_route(node_index, num_nodes)
        self._route_cache = (node_index, node_index._version, (self._revision, num_nodes), route)
        return route

    def _index_route(self, node_index: torch.Tensor, num_nodes: int) -> Route | None:
        """The route of per-node adapter indices (cached by :meth:`_route` for the same
        tensor: a calculator hands the same one at every step of a trajectory)."""
        names = self.adapter_names
        present = torch.unique(node_index).tolist()  # one small host sync per new index
        if present and (present[0] < -1 or present[-1] >= len(names)):
            raise AdapterNotFoundError(
                f"{ADAPTER_INDEX_KEY} holds indices {present}; valid are -1 (base) and 0.."
                f"{len(names) - 1} (adapters {names})"
            )
        used = [i for i in present if i >= 0]
        if not used:
            return None
        if len(present) == 1:
            return Route(num_nodes, ((names[used[0]], None),))
        slots = tuple((names[i], torch.nonzero(node_index == i).squeeze(1)) for i in used)
        return Route(num_nodes, slots)

    def _check_route_heads(self, data: Mapping[str, Any], route: Route) -> None:
        """Multi-head bases: every node an adapter serves must be on that adapter's head (one
        host sync per call; single-head bases skip it)."""
        node_head = data["head"][data["batch"]]
        heads = self.heads
        for name, idx in route.slots:
            served = node_head if idx is None else node_head.index_select(0, idx)
            want = heads.index(self._records[name].head)
            if route.mixture is not None:  # per-atom routing: every node
                served = node_head
            if bool((served != want).any()):
                found = sorted({heads[i] for i in torch.unique(served).tolist()})
                raise ConfigError(
                    f"adapter {name!r} belongs to head {heads[want]!r} but serves nodes on "
                    f"heads {found}: build the graphs with head={heads[want]!r}"
                )

    def _e0_table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[n_adapters + 1, n_elements]`` E0 corrections; row 0 is the base (zeros)."""
        key = (dtype, device)
        if key not in self._e0_tables:
            zs = self.base_model.atomic_numbers.tolist()
            rows = [[0.0] * len(zs)]
            rows += [[(r.e0s or {}).get(int(z), 0.0) for z in zs] for r in self._records.values()]
            self._e0_tables[key] = torch.tensor(rows, dtype=dtype, device=device)
        return self._e0_tables[key]

    def _e0_shift(self, data: Mapping[str, Any], route: Route) -> torch.Tensor | None:
        """Per-node energy corrections of the adapters serving the nodes (``None``: none)."""
        if not any(self._records[name].e0s for name, _ in route.slots):
            return None
        attrs = data["node_attrs"]
        element = attrs.argmax(dim=1)
        table = self._e0_table(attrs.dtype, attrs.device)
        name, idx = route.slots[0]
        if idx is None:
            return table[self.adapter_names.index(name) + 1].index_select(0, element)
        return table[data[ADAPTER_INDEX_KEY] + 1, element]

    def forward(self, data: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, Any]:
        # The per-call hooks (and the paper preset's swapped tensors) live on the shared base
        # for the duration of the call: calls on one base, from any model, take turns.
        with base_lock(self.base_model):
            return self._forward(data, **kwargs)

    def _forward(self, data: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, Any]:
        route = self._route(data)
        if route is None:
            return self.base_model(data, **kwargs)
        if len(self.heads) > 1:
            self._check_route_heads(data, route)
        targets = {t for name, _ in route.slots for t in self._records[name].targets}
        calibrated = (
            self.layer(t).gates[n].calibrated
            for n, _ in route.slots
            for t in self._records[n].targets
        )
        if any(calibrated):  # collect how far the nodes lie outside the gates' ranges
            route = Route(route.num_nodes, route.slots, extrapolation=[], mixture=route.mixture)
        handles = []
        substitutions = None
        paper = [self.paper_parts[n] if n in self.paper_parts else None for n, _ in route.slots]
        try:
            if any(p is not None for p in paper):
                if route.slots[0][1] is None:  # one adapter serves every node: swap tensors
                    substitutions = paper[0].substitutions(self.base_model)
                else:  # re-evaluate the touched modules per adapter on its own nodes/edges
                    handles += mixed_hooks(self.base_model, paper, *_slot_rows(data, route))
            for target in targets:
                layer = self.mmea_layers[_layer_key(target)]
                hook = functools.partial(_hook, layer, route)
                handles.append(self._linears[target].register_forward_hook(hook))
            if route.mixture is not None:
                energy_hook = self._mixture_energy_hook(data, route)
                if energy_hook is not None:
                    module = node_energy_module(self.base_model)
                    handles.append(module.register_forward_hook(energy_hook))
            if substitutions is None:
                out = self.base_model(data, **kwargs)
            else:
                out = torch.func.functional_call(self.base_model, substitutions, (data,), kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if route.extrapolation:
            out = dict(out)
            out["adapter_extrapolation"] = _per_graph_max(route.extrapolation, data).sqrt()
        if route.mixture is not None:
            out = dict(out)
            with torch.no_grad():
                weights = route.mixture.weights().detach()
            columns = [self.adapter_names.index(n) for n in route.mixture.names]
            full = weights.new_zeros(weights.shape[0], len(self.adapter_names))
            columns_t = torch.tensor(columns, dtype=torch.long, device=weights.device)
            out["adapter_weights"] = full.index_copy(1, columns_t, weights)
            return out
        shift = self._e0_shift(data, route)
        if shift is not None:
            out = dict(out)
            num_graphs = out["energy"].shape[0]
            graph_shift = torch.zeros(num_graphs, dtype=shift.dtype, device=shift.device)
            out["energy"] = out["energy"] + graph_shift.index_add(0, data["batch"], shift)
            if out.get("node_energy") is not None:
                out["node_energy"] = out["node_energy"] + shift
        return out

    # ---------------------------------------------------------------- export
    def freeze(self, name: str) -> torch.nn.Module:
        """A new plain MACE module with adapter ``name`` baked in (for TorchScript and LAMMPS).

        The result is a deep copy of the base in which every linear the adapter targets is a
        :class:`~mmea_calc.adapter.FrozenMMEALinear` (the linear plus this adapter's gates), and
        whose per-element reference energies include the adapter's E0 corrections (in its head's
        row only); a ``paper`` adapter's updates are added to the copy's own tensors. It takes and
        returns what the base does, has no routing and no Python-side state, is in eval mode
        with nothing trainable, and compiles with ``e3nn.util.jit.compile`` (what mace's
        ``LAMMPS_MACE`` export does). This model and
        its base are left untouched. One adapter per frozen module: per-node routing cannot
        survive LAMMPS (its ghost atoms carry no structure index).

        Args:
            name: a loaded adapter (not ``None``/``"base"``).

        Raises:
            AdapterNotFoundError: ``name`` is not a loaded adapter.

        Example:
            >>> from mmea_calc.testing import build_tiny_mace
            >>> model = AdaptedModel(build_tiny_mace())
            >>> model.add_adapter("water", MMEAConfig(rank=4))
            >>> frozen = model.freeze("water")
            >>> type(frozen.interactions[0].linear).__name__, frozen is model.base_model
            ('FrozenMMEALinear', False)
        """
        record = self._record(name)
        frozen = copy.deepcopy(self.base_model)
        for target in record.targets:
            parent_name, _, child = target.rpartition(".")
            parent = frozen.get_submodule(parent_name)
            baked = FrozenMMEALinear(getattr(parent, child), self.layer(target), name)
            setattr(parent, child, baked)
        if name in self.paper_parts:
            self.paper_parts[name].merge_into(frozen)
        fold_e0_corrections(frozen, record.e0s, record.head)  # the adapter's head only
        for param in frozen.parameters():
            param.requires_grad_(False)
        return frozen.eval()
