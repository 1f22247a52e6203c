"""MMEACalculator: an ASE calculator serving a frozen MACE base with per-environment adapters."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import ase
import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mmea_calc._deps import mace_data
from mmea_calc.data import (
    atoms_to_graph,
    check_elements,
    check_geometry,
    collate,
    z_table_of,
)
from mmea_calc.errors import (
    ConfigError,
    ExtrapolationError,
    MmeaCalcError,
    NonFiniteResultError,
)
from mmea_calc.mace_model import resolve_head
from mmea_calc.model import ADAPTER_INDEX_KEY
from mmea_calc.routing import DEFAULT_SHARPNESS
from mmea_calc.selection import PER_ATOM, TAG_KEY, AdapterSelector, Choice, Select
from mmea_calc.serving import AdapterSpec, served_model

__all__ = ["MMEACalculator"]

logger = logging.getLogger(__name__)

#: Keywords of ASE's ``Calculator.__init__`` this calculator passes on.
_ASE_KEYWORDS = ("restart", "ignore_bad_restart_file", "label", "atoms", "directory")
#: What changes the per-composition state (element check, adapter choice, routing index).
_COMPOSITION_CHANGES = frozenset({"numbers", "pbc", "info", "model"})
_ON_EXTRAPOLATION = ("ignore", "warn", "error")
#: What ``MMEACalculator.set`` changes, and what only a new calculator can.
_SETTABLE = (
    "select",
    "head",
    "on_unknown",
    "on_extrapolation",
    "extrapolation_threshold",
    "routing_sharpness",
)
_FIXED_SETTINGS = ("base", "adapters", "device", "default_dtype")


def _check_on_extrapolation(value: Any) -> None:
    if value not in _ON_EXTRAPOLATION:
        raise ConfigError(
            f"on_extrapolation={value!r} is not valid; use one of {list(_ON_EXTRAPOLATION)}"
        )


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")


def _has_cell(atoms: ase.Atoms) -> bool:
    """Stress is defined for a cell of full rank (ASE's rule, as in its EMT calculator)."""
    return atoms.cell.rank == 3


@dataclass
class _Prepared:
    """Per-composition state: rebuilt only when numbers, pbc, tag or the model change."""

    choice: Choice
    node_index: torch.Tensor | None  # None: per-atom routing


class MMEACalculator(Calculator):
    """Energies, forces and stresses from a frozen MACE base plus swappable MMEA adapters.

    Args:
        base: a mace ``.model`` file, a safe base directory, ``"embedded"`` (the base shipped
            with the package), a loaded MACE module, or an :class:`~mmea_calc.AdaptedModel`
            (used as is, with the adapters it holds).
        adapters: adapter directories (a path, a list, or ``{name: path}``), or ``"embedded"``
            for every adapter shipped with the package; all must match the base's fingerprint.
        select: ``"auto"`` (by elements, then descriptor router), an adapter name,
            ``"per-atom"`` (every atom mixes the loaded adapters with weights from its own
            neighbourhood, smoothly: :mod:`mmea_calc.routing`), ``None`` or ``"base"`` for the
            bare base, or a callable ``atoms -> name | None``. ``"auto"`` and a callable are
            asked once per composition (atomic numbers and pbc) and their answer is kept;
            ``atoms.info["mmea_adapter"]`` overrides them per structure.
        device: torch device. ``None`` (default): the CPU for files, where a given module
            already is. A given module is moved only when a device is given.
        default_dtype: ``"float64"`` or ``"float32"``. ``None`` (default): float64 for files,
            a given module's own dtype. A given module is converted (in place: it is the
            caller's object) only when a dtype is given.
        on_unknown: ``"error"`` or ``"base"`` when no adapter covers a structure's elements.
        on_extrapolation: ``"ignore"`` (default), ``"warn"`` (a log warning per calculation)
            or ``"error"`` (:class:`~mmea_calc.errors.ExtrapolationError`) when a structure's
            extrapolation grade exceeds ``extrapolation_threshold``.
        extrapolation_threshold: grade above which a structure counts as extrapolating
            (default 1.0: a gate input one span of its training range beyond what training
            saw).
        routing_sharpness: exponent of per-atom routing's weights, ``w ~ (1 + s)^-sharpness``
            with ``s`` an atom's mean squared z-score against an adapter's training atoms
            (default 4: higher is closer to a hard split, lower blends more).
        head: the head of a multi-head base to serve, as ``MACECalculator(head=...)``:
            ``None`` (default) takes a single-head model's head or a ``Default`` head, and
            otherwise raises listing the heads (mace would fall back to the last head). Only
            adapters trained on this head serve (``"auto"`` picks among them).
        label, directory, atoms, restart, ignore_bad_restart_file: as for any ASE calculator.
            Any other keyword raises ``TypeError``.

    ``results["adapter"]`` names the adapter that served the last calculation (``None`` for the
    base, ``"per-atom"`` for per-atom routing, which adds ``results["adapter_weights"]``,
    ``[n_atoms, n_adapters]`` with columns in :attr:`adapter_names` order and rows summing to 1,
    or to 0 for atoms on the base), ``results["adapter_distance"]`` the router's out-of-domain
    score when auto selection ran, and ``results["adapter_extrapolation"]`` the structure's
    extrapolation grade: how far the most extreme gate input lies outside the range the
    adapter's training data spanned, in units of that range's span, high - low (0 inside;
    ``None`` for the base or an adapter without recorded ranges). It comes from the same
    forward pass, like the extrapolation grades of ACE potentials: in-distribution frames stay
    well below 1, compressed or rattled ones reach 1 to 1e4. Active-learning loops can harvest
    the frames above the threshold.
    Results are recomputed whenever the atoms, the selection rule or the model (adapters
    loaded or deleted, E0 corrections set) change.

    Example:
        >>> from ase.build import molecule
        >>> from mmea_calc import AdaptedModel, MMEAConfig
        >>> from mmea_calc.testing import build_tiny_mace
        >>> model = AdaptedModel(build_tiny_mace())
        >>> model.add_adapter("demo", MMEAConfig(rank=4))
        >>> atoms = molecule("H2O")
        >>> atoms.calc = MMEACalculator(model, select="demo")
        >>> forces = atoms.get_forces()
        >>> atoms.calc.results["adapter"], forces.shape
        ('demo', (3, 3))
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "energies",
        "forces",
        "stress",
    ]

    def __init__(
        self,
        base: str | os.PathLike | torch.nn.Module,
        adapters: AdapterSpec = (),
        select: Select = "auto",
        device: str | torch.device | None = None,
        default_dtype: str | None = None,
        on_unknown: str = "error",
        on_extrapolation: str = "ignore",
        extrapolation_threshold: float = 1.0,
        routing_sharpness: float = DEFAULT_SHARPNESS,
        head: str | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(_ASE_KEYWORDS))
        if unknown:
            valid = ["base", "adapters", "select", "device", "default_dtype", "on_unknown"]
            valid += ["on_extrapolation", "extrapolation_threshold", "routing_sharpness", "head"]
            raise TypeError(
                f"MMEACalculator got unexpected keyword arguments {unknown}; valid: "
                f"{valid + list(_ASE_KEYWORDS)}"
            )
        _check_on_extrapolation(on_extrapolation)
        _check_positive("extrapolation_threshold", extrapolation_threshold)
        _check_positive("routing_sharpness", routing_sharpness)
        self.routing_sharpness = float(routing_sharpness)
        self.on_extrapolation = on_extrapolation
        self.extrapolation_threshold = float(extrapolation_threshold)
        Calculator.__init__(self, **kwargs)
        self.model = served_model(base, adapters, device=device, dtype=default_dtype)
        self.head = resolve_head(self.model.heads, head)
        self.selector = AdapterSelector(
            self.model, select=select, on_unknown=on_unknown, head=self.head
        )
        info = self.model.base_info
        self._z_table = z_table_of(info)
        self._keyspec = mace_data.KeySpecification()
        self._prepared: _Prepared | None = None
        self._seen = self._revisions()

    # ------------------------------------------------------------------ ASE parameters
    def todict(self, skip_default: bool = True) -> dict[str, Any]:
        """The calculator's settings, as ASE calculators report them (``skip_default`` is
        accepted for ASE's signature; every setting is reported). ``select`` is reported as
        given, or as the callable's name; ``base`` and ``adapters`` as the model's fingerprint
        and adapter names (a model has no path to report)."""
        select = self.selector.select
        return {
            "base": self.model.fingerprint,
            "adapters": self.model.adapter_names,
            "select": getattr(select, "__name__", repr(select)) if callable(select) else select,
            "on_unknown": self.selector.on_unknown,
            "on_extrapolation": self.on_extrapolation,
            "extrapolation_threshold": self.extrapolation_threshold,
            "routing_sharpness": self.routing_sharpness,
            "head": self.head,
            "device": str(self.device),
            "default_dtype": str(self.dtype).replace("torch.", ""),
        }

    def set(self, **kwargs: Any) -> dict[str, Any]:
        """Change settings, as ASE's ``Calculator.set``: ``select``, ``head``, ``on_unknown``,
        ``on_extrapolation``, ``extrapolation_threshold``, ``routing_sharpness``. Results are
        reset when anything changes; the changed settings are returned. ``base``, ``adapters``,
        ``device`` and ``default_dtype`` cannot change (make a new calculator, or use
        ``calc.model.load_adapter``); any other name raises ``TypeError`` listing the valid
        ones."""
        fixed = sorted(set(kwargs) & set(_FIXED_SETTINGS))
        if fixed:
            raise ConfigError(
                f"MMEACalculator.set cannot change {fixed}: they define the model; make a new "
                "calculator (adapters: calc.model.load_adapter / delete_adapter)"
            )
        unknown = sorted(set(kwargs) - set(_SETTABLE) - set(_ASE_KEYWORDS))
        if unknown:
            raise TypeError(
                f"MMEACalculator.set got unknown settings {unknown}; valid: {list(_SETTABLE)}"
            )
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in _SETTABLE}
        if not ours:  # ASE's keywords only (Calculator.__init__ calls set before the model)
            return Calculator.set(self, **kwargs)
        current = self.todict()
        changed = {k: v for k, v in ours.items() if k == "select" or current.get(k) != v}
        if "on_extrapolation" in ours:
            _check_on_extrapolation(ours["on_extrapolation"])
        if "extrapolation_threshold" in ours:
            _check_positive("extrapolation_threshold", ours["extrapolation_threshold"])
        if "routing_sharpness" in ours:
            _check_positive("routing_sharpness", ours["routing_sharpness"])
        before = (self.head, self.selector.select, self.selector.on_unknown)
        try:  # all or nothing: a refused value leaves every setting as it was
            if "head" in ours:  # first: the selection rule is checked against the new head
                self.head = self.selector.head = resolve_head(self.model.heads, ours["head"])
                self.selector.reselect()
            if "select" in ours:
                self.selector.select = ours["select"]
            if "on_unknown" in ours:
                self.selector.on_unknown = ours["on_unknown"]
        except Exception:
            self.head = self.selector.head = before[0]
            self.selector.select, self.selector.on_unknown = before[1], before[2]
            raise
        for key in ("on_extrapolation", "extrapolation_threshold", "routing_sharpness"):
            if key in ours:
                value = ours[key]
                setattr(self, key, value if key == "on_extrapolation" else float(value))
        changed.update(Calculator.set(self, **kwargs))  # ASE's own keywords (label, ...)
        if changed:
            self.reset()
        return changed

    # ------------------------------------------------------------------ selection
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def adapter_names(self) -> list[str]:
        return self.model.adapter_names

    def set_adapter(self, name: str | None) -> None:
        """Serve every structure with adapter ``name`` (``None``/``"base"``: the bare base;
        ``"per-atom"``: per-atom routing)."""
        self.selector.select = name
        self.reset()

    def reselect(self) -> None:
        """Forget remembered choices (and cached results)."""
        self.selector.reselect()
        self.reset()

    def choose(self, atoms: ase.Atoms) -> Choice:
        """The adapter this calculator would use for ``atoms``."""
        check_geometry(atoms)
        check_elements(atoms.numbers, self.model.base_info["atomic_numbers"])
        return self.selector.choose(atoms)

    def _revisions(self) -> tuple[int, int]:
        return self.model.revision, self.selector.revision

    def reset(self) -> None:
        Calculator.reset(self)
        self._prepared = None

    def check_state(self, atoms: ase.Atoms, tol: float = 1e-15) -> list[str]:
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and atoms.info.get(TAG_KEY) != self.atoms.info.get(TAG_KEY):
            changes.append("info")
        if self._seen != self._revisions():
            changes.append("model")
        return changes

    # ------------------------------------------------------------------ evaluation
    def _node_index(self, choices: Sequence[Choice], sizes: Sequence[int]) -> torch.Tensor | None:
        if any(c.name == PER_ATOM for c in choices):
            if not all(c.name == PER_ATOM for c in choices):
                raise RuntimeError("per-atom and per-structure choices in one forward call")
            return None
        names = self.model.adapter_names
        per_graph = [-1 if c.name is None else names.index(c.name) for c in choices]
        index = torch.tensor(per_graph, dtype=torch.long).repeat_interleave(torch.tensor(sizes))
        return index.to(self.device)

    def _run(
        self,
        atoms_list: Sequence[ase.Atoms],
        choices: Sequence[Choice],
        stress: bool,
        node_index: torch.Tensor | None = None,
        labels: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        info = self.model.base_info
        graphs = [
            atoms_to_graph(
                a, info, self._keyspec, check=False, z_table=self._z_table, head=self.head
            )
            for a in atoms_list
        ]
        data = collate(graphs, dtype=self.dtype, device=self.device)
        if node_index is None:
            node_index = self._node_index(choices, [len(a) for a in atoms_list])
        if node_index is None:
            names = self.selector.candidates()
            self.model.route_per_atom(data, names, sharpness=self.routing_sharpness)
        else:
            data[ADAPTER_INDEX_KEY] = node_index
        out = self.model(data, compute_stress=stress, training=False)
        result = {
            "energy": out["energy"].detach().cpu().to(torch.float64).numpy(),
            "energies": out["node_energy"].detach().cpu().to(torch.float64).numpy(),
            "forces": out["forces"].detach().cpu().to(torch.float64).numpy(),
            "ptr": data["ptr"].cpu().numpy(),
        }
        if stress:
            result["stress"] = _stress_per_cell_volume(out["stress"], data["cell"], atoms_list)
        if out.get("adapter_extrapolation") is not None:
            grade = out["adapter_extrapolation"].detach().cpu().to(torch.float64).numpy()
            result["extrapolation"] = grade
        if out.get("adapter_weights") is not None:
            weights = out["adapter_weights"].detach().cpu().to(torch.float64).numpy()
            result["adapter_weights"] = weights
        _check_finite(result, atoms_list, choices, labels)
        return result

    def _results_of(self, raw: dict[str, np.ndarray], i: int, choice: Choice) -> dict[str, Any]:
        start, stop = raw["ptr"][i], raw["ptr"][i + 1]
        energy = float(raw["energy"][i])
        results: dict[str, Any] = {
            "energy": energy,
            "free_energy": energy,
            "energies": raw["energies"][start:stop].copy(),
            "forces": raw["forces"][start:stop].copy(),
            "adapter": choice.name,
            "adapter_distance": choice.distance,
            "adapter_extrapolation": self._extrapolation(raw, i, choice),
        }
        if "stress" in raw:
            results["stress"] = full_3x3_to_voigt_6_stress(raw["stress"][i])
        if "adapter_weights" in raw:
            results["adapter_weights"] = raw["adapter_weights"][start:stop].copy()
        return results

    def _extrapolation(self, raw: dict[str, np.ndarray], i: int, choice: Choice) -> float | None:
        if choice.name is None or "extrapolation" not in raw:
            return None
        served = self.model.adapter_names if choice.name == PER_ATOM else [choice.name]
        if not any(self.model.is_calibrated(name) for name in served):
            return None
        return float(raw["extrapolation"][i])

    def _extrapolating(self, results: dict[str, Any]) -> bool:
        grade = results.get("adapter_extrapolation")
        return grade is not None and grade > self.extrapolation_threshold

    def _extrapolation_message(self, results: dict[str, Any], what: str) -> str:
        return (
            f"{what} lies outside adapter {results['adapter']!r}'s training range: "
            f"extrapolation grade {results['adapter_extrapolation']:.3g} > threshold "
            f"{self.extrapolation_threshold:g}"
        )

    @staticmethod
    def _stress_for(atoms: ase.Atoms, properties: Sequence[str], where: str = "") -> bool:
        """Whether to compute stress: whenever the cell allows (MD and relaxation drivers ask
        for forces, then stress, of the same positions: one pass serves both); asking for
        stress without a 3-D cell raises."""
        if _has_cell(atoms):
            return True
        if "stress" in properties:
            raise PropertyNotImplementedError(
                f"stress needs a 3-D cell (cell rank 3){where}; this cell has rank "
                f"{atoms.cell.rank}"
            )
        return False

    def _prepare(self, atoms: ase.Atoms) -> _Prepared:
        """Per-composition work, as ASE's EMT does in ``initialize``."""
        choice = self.choose(atoms)
        return _Prepared(choice, self._node_index([choice], [len(atoms)]))

    def calculate(
        self,
        atoms: ase.Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        stress = self._stress_for(atoms, properties)
        if self._prepared is None or _COMPOSITION_CHANGES.intersection(system_changes):
            self._prepared = self._prepare(atoms)
        else:
            check_geometry(atoms)
        choice = self._prepared.choice
        raw = self._run([atoms], [choice], stress, self._prepared.node_index)
        self.results = self._results_of(raw, 0, choice)
        self._seen = self._revisions()
        if self.on_extrapolation != "ignore" and self._extrapolating(self.results):
            message = self._extrapolation_message(self.results, atoms.get_chemical_formula())
            if self.on_extrapolation == "error":  # not kept: asking again raises again
                self.results = {}
                raise ExtrapolationError(message)
            logger.warning("%s", message)

    def calculate_batch(
        self,
        atoms_list: Sequence[ase.Atoms],
        properties: Sequence[str] = ("energy", "forces"),
        max_atoms: int = 4096,
    ) -> list[dict[str, Any]]:
        """Evaluate many structures, each with its own adapter, in few forward passes.

        Structures are packed into batches of at most ``max_atoms`` atoms (a larger structure
        gets a batch of its own); within a batch, nodes are routed to their structure's adapter.
        Returns one result dict per structure, as :attr:`results` would hold after a single call.

        Errors name the structure by its index in ``atoms_list``. A structure that is invalid,
        has no adapter or gives NaN/inf refuses the whole call. With
        ``on_extrapolation="error"``, every structure is still computed; the
        :class:`~mmea_calc.errors.ExtrapolationError` lists the extrapolating indices and
        carries every structure's results as its ``results`` attribute.
        """
        unknown = set(properties) - set(self.implemented_properties)
        if unknown:
            raise PropertyNotImplementedError(
                f"properties {sorted(unknown)} are not implemented; valid: "
                f"{self.implemented_properties}"
            )
        choices = []
        for i, atoms in enumerate(atoms_list):
            self._stress_for(atoms, properties, where=f" (structure {i})")
            try:
                choices.append(self.choose(atoms))
            except MmeaCalcError as exc:
                raise type(exc)(f"structure {i}: {exc}") from exc
        stress = "stress" in properties  # a batch computes what it is asked for
        results: list[dict[str, Any] | None] = [None] * len(atoms_list)
        # per-atom and per-structure routing run in separate forward calls
        for per_atom in (False, True):
            indices = [i for i, c in enumerate(choices) if (c.name == PER_ATOM) == per_atom]
            for chunk in _chunks([len(atoms_list[i]) for i in indices], max_atoms):
                members = [indices[k] for k in chunk]
                group = [atoms_list[i] for i in members]
                raw = self._run(group, [choices[i] for i in members], stress, labels=members)
                for j, i in enumerate(members):
                    results[i] = self._results_of(raw, j, choices[i])
        if self.on_extrapolation != "ignore":
            outside = [i for i, r in enumerate(results) if self._extrapolating(r)]
            for i in outside:
                message = self._extrapolation_message(results[i], f"structure {i}")
                if self.on_extrapolation == "warn":
                    logger.warning("%s", message)
            if outside and self.on_extrapolation == "error":
                error = ExtrapolationError(
                    f"structures {outside} lie outside their adapters' training ranges "
                    f"(first: {self._extrapolation_message(results[outside[0]], 'it')}); "
                    "every structure's results are in this error's .results"
                )
                error.results = results
                raise error
        return results


def _check_finite(
    result: dict[str, np.ndarray],
    atoms_list: Sequence[ase.Atoms],
    choices: Sequence[Choice],
    labels: Sequence[int] | None = None,
) -> None:
    """Raise rather than hand NaN/inf to an MD or relaxation driver (``labels``: the
    structures' indices for the message, as the caller numbers them)."""
    ptr = result["ptr"]
    for i, (atoms, choice) in enumerate(zip(atoms_list, choices, strict=True)):
        values = [result["energy"][i : i + 1], result["forces"][ptr[i] : ptr[i + 1]]]
        if "stress" in result:
            values.append(result["stress"][i])
        if not all(np.isfinite(v).all() for v in values):
            distance = "" if choice.distance is None else f", router distance {choice.distance:.3g}"
            which = "" if labels is None else f"structure {labels[i]}, "
            raise NonFiniteResultError(
                "the model gave NaN/inf energy, forces or stress for "
                f"{which}{atoms.get_chemical_formula()} (adapter {choice.name!r}{distance}); the "
                "structure is probably far outside the base model's or the adapter's training "
                "data (atoms too close?)"
            )


def _stress_per_cell_volume(
    stress: torch.Tensor, cell: torch.Tensor, atoms_list: Sequence[ase.Atoms]
) -> np.ndarray:
    """mace's stress is the virial over the volume of *its* cell, which it stretches along
    non-periodic directions; ASE's is over ``atoms.cell``'s volume. Convert to ASE's."""
    stress = stress.detach().cpu().to(torch.float64).numpy()
    model_volume = np.abs(np.linalg.det(cell.detach().cpu().to(torch.float64).view(-1, 3, 3)))
    volume = np.array([a.cell.volume for a in atoms_list])
    return stress * (model_volume / volume)[:, None, None]


def _chunks(sizes: Sequence[int], max_atoms: int) -> list[list[int]]:
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if current and total + size > max_atoms:
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        chunks.append(current)
    return chunks
