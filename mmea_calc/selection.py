"""Choosing an adapter for a structure: explicit, tagged, by elements, or by descriptor router.

The router compares a structure with each candidate adapter's training environment in the base
model's invariant descriptor space (the ``0e`` node features of every layer, from the bare base).
Each adapter stores per-element mean/std of those descriptors (:func:`describe_environment`).
The distance of a structure to an environment is the mean over its atoms of the RMS distance to
the element's mean descriptor, in units of the per-feature spread pooled over the candidate
environments (a nearest-centroid rule: every candidate is measured in the same units, so a broad
environment does not win merely by being broad). With one candidate this is the plain RMS
z-score: about 1 inside the training distribution, much larger outside (an out-of-domain score).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ase
import numpy as np
import torch

from mmea_calc.data import atoms_to_graph, collate
from mmea_calc.errors import AdapterNotFoundError, ConfigError, NoCandidateAdapterError
from mmea_calc.identity import base_info
from mmea_calc.mace_model import invariant_feature_index
from mmea_calc.routing import NeighbourhoodStatistics, neighbourhood_descriptor

__all__ = [
    "PER_ATOM",
    "TAG_KEY",
    "AdapterSelector",
    "Choice",
    "describe_environment",
    "describe_neighbourhoods",
    "descriptor_distance",
    "invariant_descriptors",
]

logger = logging.getLogger(__name__)

#: ``atoms.info`` key that names the adapter for that structure (wins over automatic choice).
TAG_KEY = "mmea_adapter"
#: ``select`` value (and ``Choice.name``) of per-atom routing (:mod:`mmea_calc.routing`).
PER_ATOM = "per-atom"
_STD_FLOOR = 1e-2  # fraction of the element's mean std used as a floor for each feature's std


def _any_head(info: Mapping[str, Any]) -> str:
    """Node features and neighbourhood descriptors come before the readouts: any head does."""
    return info["heads"][0]


def _bare_call(model: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The bare base's output on ``data``: an AdaptedModel's nodes are routed to the base for
    this call only (nothing model-wide is switched, so concurrent calls are unaffected)."""
    if hasattr(model, "route"):
        model.route(data, [None] * (int(data["ptr"].shape[0]) - 1))
    return model(data, compute_force=False, training=False)


def invariant_descriptors(
    model: Any, atoms_list: Sequence[ase.Atoms], batch_size: int = 16
) -> list[np.ndarray]:
    """Per-atom invariant descriptors of the *bare* base model, one ``[n_atoms, D]`` array each."""
    base = getattr(model, "base_model", model)
    info = getattr(model, "base_info", None) or base_info(base)
    dtype = next(base.parameters()).dtype
    device = next(base.parameters()).device
    index = invariant_feature_index(base).to(device)
    result: list[np.ndarray] = []
    for start in range(0, len(atoms_list), batch_size):
        chunk = atoms_list[start : start + batch_size]
        graphs = [atoms_to_graph(a, info, head=_any_head(info)) for a in chunk]
        data = collate(graphs, dtype=dtype, device=device)
        out = _bare_call(model, data)
        feats = out["node_feats"].detach().index_select(1, index).cpu().numpy()
        ptr = data["ptr"].cpu().numpy()
        result += [feats[ptr[i] : ptr[i + 1]].astype(np.float64) for i in range(len(chunk))]
    return result


def describe_neighbourhoods(
    model: Any, atoms_list: Sequence[ase.Atoms], batch_size: int = 16
) -> dict[str, Any]:
    """Per-element mean/std of the per-atom routing descriptor
    (:func:`mmea_calc.routing.neighbourhood_descriptor`) over ``atoms_list``, JSON-ready."""
    module = getattr(model, "base_model", model)
    info = getattr(model, "base_info", None) or base_info(module)
    dtype = next(module.parameters()).dtype
    device = next(module.parameters()).device
    stats = None
    zs = torch.tensor(info["atomic_numbers"])
    with torch.no_grad():
        for start in range(0, len(atoms_list), batch_size):
            chunk = atoms_list[start : start + batch_size]
            graphs = [atoms_to_graph(a, info, head=_any_head(info)) for a in chunk]
            data = collate(graphs, dtype=dtype, device=device)
            descriptors = neighbourhood_descriptor(module, data)
            stats = stats or NeighbourhoodStatistics(descriptors.shape[1])
            stats.add(descriptors, zs[data["node_attrs"].argmax(dim=1).cpu()])
    return stats.to_dict()


def describe_environment(model: Any, atoms_list: Sequence[ase.Atoms]) -> dict[str, Any]:
    """The environment description an adapter stores for automatic selection and per-atom
    routing.

    Args:
        model: a base MACE module or an :class:`~mmea_calc.AdaptedModel` (its bare base is used).
        atoms_list: the structures that define the environment (usually the training set).

    Returns:
        JSON-ready dict: elements, atomic numbers, structure count, periodic fraction,
        per-element descriptor mean/std/count (``descriptor``, for ``select="auto"``) and the
        per-atom routing statistics (``neighbourhood``, :func:`describe_neighbourhoods`).
    """
    if len(atoms_list) == 0:
        raise ConfigError("describe_environment needs at least one structure")
    descriptors = invariant_descriptors(model, list(atoms_list))
    numbers = np.concatenate([a.numbers for a in atoms_list])
    feats = np.concatenate(descriptors, axis=0)
    per_element = {}
    for z in sorted(set(numbers.tolist())):
        rows = feats[numbers == z]
        per_element[str(z)] = {
            "mean": rows.mean(axis=0).tolist(),
            "std": rows.std(axis=0).tolist(),
            "count": int(rows.shape[0]),
        }
    zs = sorted(set(numbers.tolist()))
    return {
        "atomic_numbers": zs,
        "elements": [ase.data.chemical_symbols[z] for z in zs],
        "n_structures": len(atoms_list),
        "periodic_fraction": float(np.mean([a.pbc.all() for a in atoms_list])),
        "descriptor": {"dim": int(feats.shape[1]), "per_element": per_element},
        "neighbourhood": describe_neighbourhoods(model, list(atoms_list)),
    }


def descriptor_distance(
    descriptors: np.ndarray,
    numbers: np.ndarray,
    environment: Mapping[str, Any],
    pool: Sequence[Mapping[str, Any]] | None = None,
) -> float:
    """Mean over atoms of the RMS standardised distance to the element's mean descriptor.

    Args:
        descriptors: ``[n_atoms, D]`` invariant descriptors of the structure.
        numbers: atomic numbers of its atoms.
        environment: the environment measured against (:func:`describe_environment`).
        pool: environments whose per-feature spreads are pooled (RMS) into the unit of length;
            ``None`` uses ``environment``'s own spread (a z-score).
    """
    pool = list(pool) if pool else [environment]
    total = 0.0
    for z in np.unique(numbers):
        key = str(int(z))
        mean = np.asarray(environment["descriptor"]["per_element"][key]["mean"])
        spreads = [np.asarray(e["descriptor"]["per_element"][key]["std"]) for e in pool]
        std = np.sqrt(np.mean(np.square(spreads), axis=0))
        std = np.maximum(std, _STD_FLOOR * max(std.mean(), 1e-12)) + 1e-12
        rows = descriptors[numbers == z]
        total += np.sqrt((((rows - mean) / std) ** 2).mean(axis=1)).sum()
    return float(total / len(numbers))


@dataclass(frozen=True)
class Choice:
    """An adapter choice: ``name`` (``None`` = base, :data:`PER_ATOM` = every atom its own
    mix), how it was made, router distance if any."""

    name: str | None
    reason: str
    distance: float | None = None


Select = str | None | Callable[[ase.Atoms], "str | None"]


class AdapterSelector:
    """Picks an adapter per structure and remembers the choice per (numbers, pbc).

    Args:
        model: the :class:`~mmea_calc.AdaptedModel` whose adapters are chosen from.
        select: ``"auto"``, an adapter name, ``"per-atom"`` (every atom mixes the loaded
            adapters by its own neighbourhood, :mod:`mmea_calc.routing`), ``None``/``"base"``,
            or ``atoms -> name | None``.
            ``"auto"`` and a callable are asked once per composition (atomic numbers and pbc)
            and their answer is kept, so an MD trajectory never switches adapter;
            :meth:`reselect` forgets the answers.
        on_unknown: ``"error"`` (default) or ``"base"`` when no adapter covers the elements.

    ``revision`` counts changes of the rule (``select``, ``on_unknown``, :meth:`reselect`);
    the remembered choices are also forgotten whenever the model's ``revision`` changes
    (adapters added, loaded or deleted).
    """

    def __init__(
        self,
        model: Any,
        select: Select = "auto",
        on_unknown: str = "error",
        head: str | None = None,
    ) -> None:
        self.model = model
        self.head = head
        self._cache: dict[tuple, Choice] = {}
        self._model_revision = model.revision
        self.revision = 0
        self.on_unknown = on_unknown
        self.select = select

    @property
    def on_unknown(self) -> str:
        return self._on_unknown

    @on_unknown.setter
    def on_unknown(self, value: str) -> None:
        if value not in ("error", "base"):
            raise ConfigError(f"on_unknown={value!r} is not valid; use 'error' or 'base'")
        self._on_unknown = value
        self.reselect()

    @property
    def select(self) -> Select:
        return self._select

    @select.setter
    def select(self, value: Select) -> None:
        if isinstance(value, str) and value not in ("auto", "base"):
            self.check_name(value)
        elif not (value is None or isinstance(value, str) or callable(value)):
            raise ConfigError(
                f"select={value!r} is not valid; use 'auto', an adapter name, 'per-atom', "
                "None/'base', or a callable atoms -> name"
            )
        self._select = value
        self.reselect()

    def reselect(self) -> None:
        """Forget remembered choices: the next structure of each kind is chosen anew."""
        self._cache.clear()
        self.revision += 1

    def check_name(self, name: str | None) -> str | None:
        """``name`` if this selector may serve it (``None`` for ``None``/``"base"``); a clear
        error for unknown adapters, another head's, or per-atom routing it cannot do."""
        if name in (None, "base"):
            return None
        if name == PER_ATOM:
            if not self.candidates():
                where = "" if self.head is None else f" of head {self.head!r}"
                raise AdapterNotFoundError(
                    f"per-atom routing needs loaded adapters{where}; none are"
                )
            self.model.check_per_atom(self.candidates())  # a clear error if it cannot
            return name
        if name not in self.model.adapter_names:
            raise AdapterNotFoundError(
                f"no adapter named {name!r}; loaded adapters: {self.model.adapter_names or 'none'}"
            )
        if self.head is not None:
            self.model.check_head([name], self.head)
        return name

    def choose(self, atoms: ase.Atoms) -> Choice:
        """The adapter for ``atoms`` (tag > explicit > remembered callable/auto choice)."""
        if self.model.revision != self._model_revision:  # adapters changed: choose anew
            self._model_revision = self.model.revision
            self._cache.clear()
        tag = atoms.info.get(TAG_KEY)
        if tag is not None:
            return self._checked(Choice(self.check_name(str(tag)), "tag"), atoms)
        if not callable(self._select) and self._select != "auto":
            return self._checked(Choice(self.check_name(self._select), "explicit"), atoms)
        key = (atoms.numbers.tobytes(), tuple(bool(p) for p in atoms.pbc))
        if key not in self._cache:
            if callable(self._select):
                choice = Choice(self.check_name(self._select(atoms)), "callable")
                choice = self._checked(choice, atoms)
            else:
                choice = self._auto(atoms)
            self._cache[key] = choice
        return self._cache[key]

    def _checked(self, choice: Choice, atoms: ase.Atoms) -> Choice:
        """A per-atom choice, after checking that some adapter covers every element."""
        if choice.name != PER_ATOM:
            return choice
        covered = set()
        for name in self.candidates():
            covered |= set(self.model.neighbourhood_statistics(name))
        missing = sorted({int(z) for z in atoms.numbers} - covered)
        if not missing:
            return choice
        symbols = [ase.data.chemical_symbols[z] for z in missing]
        message = (
            f"per-atom routing: no adapter's training data held {symbols} (in "
            f"{atoms.get_chemical_formula()}); adapters cover "
            f"{sorted(ase.data.chemical_symbols[z] for z in covered)}"
        )
        if self.on_unknown == "base":
            logger.warning("%s; those atoms run the bare base (on_unknown='base')", message)
            return choice
        raise NoCandidateAdapterError(message + "; pass on_unknown='base' to run them on the base")

    def _environment(self, name: str) -> Mapping[str, Any] | None:
        return self.model.adapter_metadata(name).get("environment")

    def candidates(self) -> list[str]:
        """The adapters this selector may pick: those of its ``head`` (every one without)."""
        names = self.model.adapter_names
        if self.head is None:
            return names
        return [n for n in names if self.model.adapter_head(n) == self.head]

    def _auto(self, atoms: ase.Atoms) -> Choice:
        elements = set(int(z) for z in atoms.numbers)
        covered, unknown_env = [], []
        for name in self.candidates():
            env = self._environment(name)
            if env is None:
                unknown_env.append(name)
            elif elements <= set(env["atomic_numbers"]):
                covered.append(name)
        if not covered:
            return self._no_candidate(atoms, unknown_env)
        desc = invariant_descriptors(self.model, [atoms])[0]
        envs = [self._environment(n) for n in covered]
        scores = {
            n: descriptor_distance(desc, atoms.numbers, env, pool=envs)
            for n, env in zip(covered, envs, strict=True)
        }
        best = min(scores, key=scores.get)
        logger.info("router distances %s -> %s", scores, best)
        return Choice(best, "elements" if len(covered) == 1 else "router", scores[best])

    def _no_candidate(self, atoms: ase.Atoms, unknown_env: list[str]) -> Choice:
        have = sorted({ase.data.chemical_symbols[z] for z in atoms.numbers})
        listing = {
            n: (self._environment(n) or {}).get("elements", "unknown (no environment stored)")
            for n in self.model.adapter_names
        }
        message = (
            f"no adapter covers the elements {have} of {atoms.get_chemical_formula()}; "
            f"adapters and their elements: {listing or 'no adapters loaded'}"
        )
        if self.on_unknown == "base":
            logger.warning("%s; running the bare base model (on_unknown='base')", message)
            return Choice(None, "fallback")
        raise NoCandidateAdapterError(message + "; pass on_unknown='base' to run the base model")
