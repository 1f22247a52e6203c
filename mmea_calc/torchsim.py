"""TorchSim: batched MD and relaxation of many systems, each served by its own adapter.

:class:`MMEAModel` is a TorchSim ``ModelInterface`` over one :class:`~mmea_calc.AdaptedModel`:
one forward call computes energies, forces and stresses of every system in a ``SimState``,
each system through the adapter chosen for it (the same rules as
:class:`~mmea_calc.MMEACalculator`), so ``ts.integrate``, ``ts.optimize``, the autobatchers and
the trajectory reporter run mixed batches of water boxes, molecules and surfaces in one pass.

Needs ``torch-sim-atomistic >= 0.6`` (Python >= 3.12): ``pip install "mmea-calc[torchsim]"``.

Besides ``energy`` [n_systems], ``forces`` [n_atoms, 3] and ``stress`` [n_systems, 3, 3]
(eV, eV/Å, eV/Å³, as TorchSim expects), every call returns, per system, ``adapter_index``
(the position in :attr:`MMEAModel.adapter_names` of the adapter that served it; -1 the bare
base, -2 per-atom routing), ``adapter_extrapolation`` (the extrapolation grade, as
``MMEACalculator``'s ``results["adapter_extrapolation"]``; NaN where undefined) and
``adapter_distance`` (the router's out-of-domain score of ``select="auto"``; NaN where none
ran); per-atom routing adds ``adapter_weights`` [n_atoms, n_adapters]. TorchSim keeps these
as the state's extras (``state.adapter_index``...).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ase
import numpy as np
import torch

from mmea_calc import _deps  # noqa: F401  (mace before e3nn, before torch_sim imports either)
from mmea_calc.data import check_elements
from mmea_calc.errors import ConfigError, InvalidStructureError, NonFiniteResultError
from mmea_calc.mace_model import resolve_head
from mmea_calc.model import ADAPTER_INDEX_KEY
from mmea_calc.routing import DEFAULT_SHARPNESS
from mmea_calc.selection import PER_ATOM, AdapterSelector, Choice
from mmea_calc.serving import AdapterSpec, served_model

_REQUIREMENT = (
    "mmea_calc.torchsim needs torch-sim-atomistic >= 0.6, which needs Python >= 3.12: "
    'pip install "mmea-calc[torchsim]"'
)
try:
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
    from torch_sim.neighbors import torchsim_nl
except ImportError as exc:  # Python 3.11 has torch-sim 0.3 at most, with another API
    raise ImportError(f"{_REQUIREMENT} (import failed: {exc})") from exc
if not hasattr(ts, "Integrator"):  # the enum API (and SimState.system_idx) arrived in 0.4-0.6
    raise ImportError(f"{_REQUIREMENT}; found torch-sim-atomistic {ts.__version__}")

__all__ = ["BASE_INDEX", "PER_ATOM_INDEX", "TAG_EXTRA", "MMEAModel"]

logger = logging.getLogger(__name__)

#: ``adapter_index`` of a system served by the bare base.
BASE_INDEX = -1
#: ``adapter_index`` of a system under per-atom routing (its atoms' ``adapter_weights`` say more).
PER_ATOM_INDEX = -2
#: Name of the per-system extra (an integer tensor, :attr:`MMEAModel.adapter_names` positions,
#: -1 for the base) that names each system's adapter and wins over ``select``, as
#: ``atoms.info["mmea_adapter"]`` does for the calculator: it travels with its system through
#: the autobatchers and ``ts.optimize``'s swaps. :meth:`MMEAModel.tag` writes it.
TAG_EXTRA = "mmea_adapter_index"

SelectSpec = str | None | Sequence[str | None] | Callable[[ase.Atoms], "str | None"]


@dataclass
class _Prepared:
    """What depends only on a state's composition (numbers, systems, pbc, tags) and the
    model's and selector's revisions: rebuilt when any of them changes."""

    key: tuple[torch.Tensor | None, ...]
    revisions: tuple[int, int]
    ptr: torch.Tensor
    node_attrs: torch.Tensor
    head: torch.Tensor
    choices: list[Choice]
    node_index: torch.Tensor | None  # None: per-atom routing
    adapter_index: torch.Tensor
    graded: torch.Tensor  # bool [n_systems]: the extrapolation grade is defined
    distance: torch.Tensor


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


class MMEAModel(ModelInterface):
    """A TorchSim model: a frozen MACE base with MMEA adapters, one adapter per system.

    Args:
        base: a mace ``.model`` file, a safe base directory, ``"embedded"``, a MACE module or
            an :class:`~mmea_calc.AdaptedModel` (used as is, with its adapters), as for
            :class:`~mmea_calc.MMEACalculator`.
        adapters: adapter directories (a path, a list, ``{name: path}``) or ``"embedded"``.
        select: how each system's adapter is chosen: ``"auto"`` (by elements, then the
            descriptor router: the calculator's rule, asked once per composition and kept, so
            a system's adapter does not depend on which systems share its batch), an adapter
            name, ``None``/``"base"``, ``"per-atom"`` (every atom mixes the loaded adapters by
            its own neighbourhood), a callable ``atoms -> name`` (asked once per composition),
            or a list with one name (or ``None``) per system of the states this model is
            called on. A list needs every call to hold exactly those systems in that order:
            with an autobatcher or ``ts.optimize`` (which drops converged systems), tag the
            state instead (:meth:`tag`, :data:`TAG_EXTRA`).
        head: the head of a multi-head base (``None``: the single head or ``Default``).
        device, dtype: as for the calculator (files load in float64 on the CPU; a given
            module keeps its own unless these are given). TorchSim builds its states in
            :attr:`dtype` on :attr:`device`.
        compute_forces, compute_stress: what every call computes (TorchSim's MD and cell
            filters need both; stress of a system whose cell has no volume is 0).
        on_unknown: ``"error"`` or ``"base"`` when no adapter covers a system's elements.
        routing_sharpness: per-atom routing's exponent (see the calculator).
        neighbor_list_fn: TorchSim's neighbour-list signature; default
            ``torch_sim.neighbors.torchsim_nl``.

    Example:
        >>> import torch_sim as ts
        >>> from ase.build import molecule
        >>> from mmea_calc import AdaptedModel, MMEAConfig
        >>> from mmea_calc.testing import build_tiny_mace
        >>> adapted = AdaptedModel(build_tiny_mace())
        >>> adapted.add_adapter("water", MMEAConfig(rank=4))
        >>> model = MMEAModel(adapted, select="water")
        >>> state = ts.io.atoms_to_state([molecule("H2O"), molecule("H2O")], dtype=model.dtype)
        >>> out = model(state)
        >>> out["energy"].shape, out["forces"].shape, model.served(out)
        (torch.Size([2]), torch.Size([6, 3]), ['water', 'water'])
    """

    def __init__(
        self,
        base: str | os.PathLike | torch.nn.Module,
        adapters: AdapterSpec = (),
        select: SelectSpec = "auto",
        *,
        head: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        compute_forces: bool = True,
        compute_stress: bool = True,
        on_unknown: str = "error",
        routing_sharpness: float = DEFAULT_SHARPNESS,
        neighbor_list_fn: Callable | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(routing_sharpness, int | float) and routing_sharpness > 0):
            raise ConfigError(f"routing_sharpness must be a number > 0, got {routing_sharpness!r}")
        self.model = served_model(base, adapters, device=device, dtype=dtype)
        self._device = self.model.device
        self._dtype = self.model.dtype
        self._compute_forces = bool(compute_forces)
        self._compute_stress = bool(compute_stress)
        self._memory_scales_with = "n_atoms_x_density"
        self.neighbor_list_fn = neighbor_list_fn or torchsim_nl
        self.routing_sharpness = float(routing_sharpness)
        self.head = resolve_head(self.model.heads, head)
        self.r_max = float(self.model.base_model.r_max)
        self._per_system: list[str | None] | None = None
        if isinstance(select, list | tuple):
            self.selector = AdapterSelector(self.model, None, on_unknown, head=self.head)
            self._per_system = [self._checked_name(name) for name in select]
        else:
            self.selector = AdapterSelector(self.model, select, on_unknown, head=self.head)
        zs = self.model.base_info["atomic_numbers"]
        lookup = torch.full((max(zs) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(zs)] = torch.arange(len(zs))
        self._element_index = lookup.to(self._device)
        self._prepared: _Prepared | None = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> MMEAModel:
        """``.to()``/``.float()``/``.double()``: convert the model (the wrapped AdaptedModel is
        converted in place), then follow its device and dtype (TorchSim builds its states from
        :attr:`device` and :attr:`dtype`) and forget per-composition tensors."""
        module = super()._apply(fn, *args, **kwargs)
        self._device, self._dtype = self.model.device, self.model.dtype
        self._element_index = self._element_index.to(self._device)
        self._prepared = None
        return module

    # ---------------------------------------------------------------- introspection
    @property
    def adapter_names(self) -> list[str]:
        """The loaded adapters; ``adapter_index`` outputs are positions in this list."""
        return self.model.adapter_names

    def served(self, output: dict[str, torch.Tensor] | torch.Tensor | Any) -> list[str | None]:
        """The adapter name (``None``: base; ``"per-atom"``) that served each system, from a
        call's output, its ``adapter_index`` tensor, or a state holding it as an extra."""
        if isinstance(output, dict):
            index = output["adapter_index"]
        elif isinstance(output, torch.Tensor):
            index = output
        else:
            index = output.adapter_index
        names = self.adapter_names
        special = {BASE_INDEX: None, PER_ATOM_INDEX: PER_ATOM}
        return [special[i] if i < 0 else names[i] for i in index.tolist()]

    def tag(self, state: Any, names: Sequence[str | None]) -> Any:
        """Name each system's adapter (``None``/``"base"``: the bare base) in ``state``'s
        :data:`TAG_EXTRA` extra, which wins over ``select`` and travels with its system
        through autobatching; returns ``state`` (changed in place)."""
        if len(names) != state.n_systems:
            raise ConfigError(
                f"tag needs one adapter name per system: the state has {state.n_systems} "
                f"systems, got {len(names)} names"
            )
        index = []
        for name in names:
            checked = self._checked_name(name)
            if checked == PER_ATOM:
                raise ConfigError("per-atom routing is chosen for a whole model (select=...)")
            index.append(BASE_INDEX if checked is None else self.adapter_names.index(checked))
        state.system_extras[TAG_EXTRA] = torch.tensor(index, dtype=torch.long, device=state.device)
        return state

    def _checked_name(self, name: str | None) -> str | None:
        if not (name is None or isinstance(name, str)):
            raise ConfigError(f"an adapter name, 'base' or None is needed, got {name!r}")
        return self.selector.check_name(name)

    # ---------------------------------------------------------------- per composition
    def _tags(self, state: Any) -> torch.Tensor | None:
        return state.system_extras.get(TAG_EXTRA)

    def _prepare(self, state: Any) -> _Prepared:
        tags = self._tags(state)
        key = (state.atomic_numbers, state.system_idx, state.pbc, tags)
        revisions = (self.model.revision, self.selector.revision)
        old = self._prepared
        if old is not None and old.revisions == revisions:
            if all(_same(a, b) for a, b in zip(old.key, key, strict=True)):
                return old
        self._prepared = self._build(state, key, revisions)
        return self._prepared

    def _choices(self, state: Any, numbers: np.ndarray, ptr: list[int]) -> list[Choice]:
        n_systems = len(ptr) - 1
        tags = self._tags(state)
        if tags is not None:
            names = self.adapter_names
            tagged = []
            for i, t in enumerate(tags.tolist()):
                if not BASE_INDEX <= t < len(names):
                    raise ConfigError(
                        f"system {i}: {TAG_EXTRA} holds {t}; valid are -1 (base) and "
                        f"0..{len(names) - 1} (adapters {names})"
                    )
                name = None if t == BASE_INDEX else self._checked_name(names[t])
                tagged.append(Choice(name, "tag"))
            return tagged
        if self._per_system is not None:
            if len(self._per_system) != n_systems:
                raise ConfigError(
                    f"select lists {len(self._per_system)} adapters (one per system) but this "
                    f"state holds {n_systems} systems; under an autobatcher or ts.optimize, "
                    f"which regroup systems, tag the state instead: model.tag(state, names)"
                )
            return [Choice(name, "explicit") for name in self._per_system]
        select = self.selector.select
        if not callable(select) and select != "auto":  # one name (or the base) for all
            choice = Choice(self.selector.check_name(select), "explicit")
            if choice.name != PER_ATOM:
                return [choice] * n_systems
        positions = state.positions.detach().cpu().to(torch.float64).numpy()
        cells = state.row_vector_cell.detach().cpu().to(torch.float64).numpy()
        pbc = state.pbc.detach().cpu().numpy()
        choices = []
        for i in range(n_systems):
            atoms = ase.Atoms(
                numbers=numbers[ptr[i] : ptr[i + 1]],
                positions=positions[ptr[i] : ptr[i + 1]],
                cell=cells[i],
                pbc=pbc,
            )
            choices.append(self.selector.choose(atoms))
        return choices

    def _build(self, state: Any, key: tuple, revisions: tuple[int, int]) -> _Prepared:
        n_systems = int(state.n_systems)
        system_idx = state.system_idx
        counts = torch.bincount(system_idx, minlength=n_systems)
        if bool((counts == 0).any()) or bool((system_idx[1:] < system_idx[:-1]).any()):
            raise InvalidStructureError(
                "system_idx must number the systems 0..n_systems-1 in order, each with atoms"
            )
        ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        numbers = state.atomic_numbers.detach().cpu().numpy()
        check_elements(numbers, self.model.base_info["atomic_numbers"])
        element = self._element_index[state.atomic_numbers.long()]
        node_attrs = torch.nn.functional.one_hot(
            element, len(self.model.base_info["atomic_numbers"])
        )
        node_attrs = node_attrs.to(self._dtype)
        ptr_list = ptr.tolist()
        choices = self._choices(state, numbers, ptr_list)
        per_atom = [c.name == PER_ATOM for c in choices]
        if any(per_atom) and not all(per_atom):
            raise ConfigError("per-atom routing serves every system of a call or none")
        names = self.adapter_names
        if all(per_atom):
            candidates = self.selector.candidates()
            graded = any(self.model.is_calibrated(n) for n in candidates)
            index = [PER_ATOM_INDEX] * n_systems
            graded_list = [graded] * n_systems
        else:
            index = [BASE_INDEX if c.name is None else names.index(c.name) for c in choices]
            graded_list = [c.name is not None and self.model.is_calibrated(c.name) for c in choices]
        nan = math.nan
        distance = [nan if c.distance is None else float(c.distance) for c in choices]
        head = torch.full(
            (n_systems,), self.model.heads.index(self.head), dtype=torch.long, device=self._device
        )
        adapter_index = torch.tensor(index, dtype=torch.long, device=self._device)
        node_index = None if all(per_atom) else adapter_index.repeat_interleave(counts)
        return _Prepared(
            key=tuple(None if t is None else t.clone() for t in key),
            revisions=revisions,
            ptr=ptr,
            node_attrs=node_attrs,
            head=head,
            choices=choices,
            node_index=node_index,
            adapter_index=adapter_index,
            graded=torch.tensor(graded_list, dtype=torch.bool, device=self._device),
            distance=torch.tensor(distance, dtype=self._dtype, device=self._device),
        )

    # ---------------------------------------------------------------- forward
    def forward(self, state: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energies [n_systems], forces [n_atoms, 3], stresses [n_systems, 3, 3] of every
        system in ``state`` (a ``SimState``, or a dict of its fields), with the per-system
        adapter report described in the module docstring."""
        if isinstance(state, dict):
            state = ts.SimState(**state)
        if state.positions.dtype != self._dtype or state.positions.device != self._device:
            raise ConfigError(
                f"the state is {state.positions.dtype} on {state.positions.device}, the model "
                f"{self._dtype} on {self._device}: build states with dtype=model.dtype, "
                "device=model.device (ts.integrate/optimize do)"
            )
        prep = self._prepare(state)
        positions = state.positions.detach()
        if bool(state.pbc.any()):
            positions = ts.transforms.pbc_wrap_batched(
                positions, state.cell, state.system_idx, state.pbc
            )
        cell = state.row_vector_cell.detach()
        cutoff = torch.as_tensor(self.r_max, dtype=positions.dtype, device=positions.device)
        edge_index, system_of_edge, unit_shifts = self.neighbor_list_fn(
            positions, cell, state.pbc, cutoff, state.system_idx
        )
        shifts = ts.transforms.compute_cell_shifts(cell, unit_shifts, system_of_edge)
        data: dict[str, torch.Tensor] = {
            "positions": positions.clone().requires_grad_(True),
            "cell": cell,
            "edge_index": edge_index,
            "shifts": shifts,
            "unit_shifts": unit_shifts,
            "node_attrs": prep.node_attrs,
            "batch": state.system_idx,
            "ptr": prep.ptr,
            "head": prep.head,
        }
        if prep.node_index is None:
            self.model.route_per_atom(
                data, self.selector.candidates(), sharpness=self.routing_sharpness
            )
        else:
            data[ADAPTER_INDEX_KEY] = prep.node_index
        with torch.enable_grad():  # forces are gradients, whatever the caller's grad mode
            out = self.model(
                data,
                compute_force=self._compute_forces,
                compute_stress=self._compute_stress,
                training=False,
            )
        results = {"energy": out["energy"].detach()}
        if self._compute_forces:
            results["forces"] = out["forces"].detach()
        if self._compute_stress:
            results["stress"] = out["stress"].detach()
        self._check_finite(results, state, prep)
        grade = out.get("adapter_extrapolation")
        nan = torch.full_like(results["energy"], math.nan)
        if grade is None:
            results["adapter_extrapolation"] = nan
        else:
            results["adapter_extrapolation"] = torch.where(prep.graded, grade.detach(), nan)
        results["adapter_index"] = prep.adapter_index
        results["adapter_distance"] = prep.distance
        if out.get("adapter_weights") is not None:
            results["adapter_weights"] = out["adapter_weights"].detach()
        return results

    def _check_finite(self, results: dict[str, torch.Tensor], state: Any, prep: _Prepared) -> None:
        """Raise rather than hand NaN/inf to an integrator or optimizer (one host sync)."""
        finite = torch.isfinite(results["energy"])
        if "forces" in results:
            bad_atoms = (~torch.isfinite(results["forces"])).any(dim=1).to(torch.long)
            bad = torch.zeros_like(finite, dtype=torch.long).index_add(
                0, state.system_idx, bad_atoms
            )
            finite = finite & (bad == 0)
        if "stress" in results:
            finite = finite & torch.isfinite(results["stress"]).flatten(1).all(dim=1)
        if bool(finite.all()):
            return
        systems = torch.nonzero(~finite).squeeze(1).tolist()
        adapters = [prep.choices[i].name for i in systems[:10]]
        raise NonFiniteResultError(
            f"the model gave NaN/inf energy, forces or stress for systems {systems[:10]} "
            f"(adapters {adapters}); they are probably far outside the base model's or the "
            "adapters' training data (atoms too close? a time step too long?)"
        )
