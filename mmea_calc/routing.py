"""Per-atom routing: every atom weighs the loaded adapters by its own neighbourhood, smoothly.

The descriptor of atom ``i`` is the base's radial embedding of its edges, summed per neighbour
element: ``D_i[z, k] = sum_{j in N(i), Z_j = z} R_k(r_ij)`` (``R`` the Bessel basis times the
cutoff envelope that MACE computes anyway, so it is smooth, goes to zero at the cutoff, and is
invariant to rotation, translation and permutation). Adapters never change it, it costs one
scatter over the edges, and inside a forward call it carries the gradients of forces and stress.

Each adapter stores, per element of its training data, the mean and variance of ``D`` over its
training atoms (``environment["neighbourhood"]`` in ``adapter_config.json``, written by
:func:`~mmea_calc.describe_environment` at the end of every fit and by ``mmea-calc
calibrate``). The score of atom ``i`` under adapter ``a`` is its mean squared z-score

    ``s_ia = mean_k (D_ik - mu_{a,Z_i,k})^2 / (var_{a,Z_i,k} + STD_FLOOR^2)``

(about 1 for an atom like the adapter's training atoms, much larger otherwise), and its weights
are ``w_ia = softmax_a(-sharpness * log(1 + s_ia))``, i.e. ``w_ia`` proportional to
``(1 + s_ia)^-sharpness``, over the adapters whose training data held element ``Z_i`` (others get
exactly 0). ``sharpness`` (default :data:`DEFAULT_SHARPNESS`) sets how decisively the closer
environment wins: an atom twice as far (in ``1 + s``) from one adapter as from the other gives
it ``2^-4 = 6 %`` of the weight at the default. Weights are smooth in the positions, so energies
are one smooth function and forces stay exactly ``-dE/dx``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmea_calc.errors import ConfigError
from mmea_calc.mace_model import radial_features

__all__ = [
    "ADAPTER_INDEX_KEY",
    "DEFAULT_SHARPNESS",
    "DESCRIPTOR_NAME",
    "PER_ATOM_KEY",
    "SHARPNESS_KEY",
    "STD_FLOOR",
    "NeighbourhoodStatistics",
    "mixture_weights",
    "neighbourhood_descriptor",
]

#: Graph-dict key of the per-node adapter index (into ``AdaptedModel.adapter_names``; -1 = base).
ADAPTER_INDEX_KEY = "mmea_adapter_index"
#: Graph-dict key of per-atom routing: the indices (into ``adapter_names``) of the adapters every
#: node mixes with its own weights; see :meth:`~mmea_calc.AdaptedModel.route_per_atom`.
PER_ATOM_KEY = "mmea_per_atom_adapters"
#: Graph-dict key of per-atom routing's sharpness (a 0-d tensor; default ``DEFAULT_SHARPNESS``).
SHARPNESS_KEY = "mmea_routing_sharpness"
#: Default exponent of the per-atom weights, ``w ~ (1 + s)^-sharpness``.
DEFAULT_SHARPNESS = 4.0
#: Floor of each descriptor channel's spread (descriptor units: a fraction of one neighbour's
#: radial contribution), so a channel that never varied in training (no C neighbours in water)
#: measures deviations against this instead of zero.
STD_FLOOR = 0.05
#: Name of the descriptor, stored with the statistics (a different descriptor is not comparable).
DESCRIPTOR_NAME = "radial_species_sum"


def neighbourhood_descriptor(base: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[n_nodes, n_elements * n_radial]``: every node's radial embedding summed per neighbour
    element (see the module docstring), from graph dict ``data``."""
    radial = radial_features(base, data)
    sender, receiver = data["edge_index"][0], data["edge_index"][1]
    species = data["node_attrs"].to(radial.dtype)
    per_edge = (species.index_select(0, sender).unsqueeze(2) * radial.unsqueeze(1)).flatten(1)
    out = per_edge.new_zeros(species.shape[0], per_edge.shape[1])
    return out.index_add(0, receiver, per_edge)


class NeighbourhoodStatistics:
    """Per-element mean and variance of :func:`neighbourhood_descriptor` over many atoms.

    Accumulate with :meth:`add` (``float64`` sums), then :meth:`to_dict` for the adapter's
    config; :meth:`from_dict` validates what a file holds.

    Example:
        >>> stats = NeighbourhoodStatistics(dim=2)
        >>> stats.add(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([8, 8]))
        >>> doc = stats.to_dict()
        >>> doc["per_element"]["8"]["mean"], doc["per_element"]["8"]["std"]
        ([2.0, 0.0], [1.0, 0.0])
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self._sums: dict[int, list[Any]] = {}  # z -> [count, sum, sum of squares]

    def add(self, descriptors: torch.Tensor, numbers: torch.Tensor) -> None:
        """Add ``descriptors`` ``[n, dim]`` of atoms with atomic numbers ``numbers`` ``[n]``."""
        descriptors = descriptors.detach().to(torch.float64).cpu()
        numbers = numbers.detach().cpu()
        if descriptors.shape[1] != self.dim:
            raise ConfigError(f"descriptors have {descriptors.shape[1]} columns, not {self.dim}")
        for z in torch.unique(numbers).tolist():
            rows = descriptors[numbers == z]
            zeros = torch.zeros(self.dim, dtype=torch.float64)
            entry = self._sums.setdefault(int(z), [0, zeros, zeros.clone()])
            entry[0] += rows.shape[0]
            entry[1] += rows.sum(dim=0)
            entry[2] += (rows * rows).sum(dim=0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"descriptor", "dim", "per_element": {z: {mean, std, count}}}``."""
        per_element = {}
        for z, (count, total, squares) in sorted(self._sums.items()):
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0.0)
            per_element[str(z)] = {
                "mean": mean.tolist(),
                "std": var.sqrt().tolist(),
                "count": int(count),
            }
        return {"descriptor": DESCRIPTOR_NAME, "dim": self.dim, "per_element": per_element}

    @staticmethod
    def check(document: Any, dim: int, where: str) -> dict[int, tuple[list[float], list[float]]]:
        """``{z: (mean, std)}`` from a stored document, or a :class:`ConfigError` naming what is
        wrong (``where`` says whose statistics they are)."""
        if not isinstance(document, Mapping) or document.get("descriptor") != DESCRIPTOR_NAME:
            raise ConfigError(
                f"{where}: neighbourhood statistics must be a {DESCRIPTOR_NAME!r} description"
            )
        if document.get("dim") != dim:
            raise ConfigError(
                f"{where}: neighbourhood statistics have dim {document.get('dim')}, this base's "
                f"descriptor has {dim} (were they recorded on another base?)"
            )
        out = {}
        for key, entry in (document.get("per_element") or {}).items():
            mean, std = entry.get("mean"), entry.get("std")
            if not (isinstance(mean, list) and isinstance(std, list)):
                raise ConfigError(f"{where}: element {key} lacks mean/std lists")
            if len(mean) != dim or len(std) != dim:
                raise ConfigError(f"{where}: element {key} has {len(mean)} values, not {dim}")
            out[int(key)] = (mean, std)
        if not out:
            raise ConfigError(f"{where}: neighbourhood statistics hold no element")
        return out


def mixture_tables(
    stats: Sequence[Mapping[int, tuple[Sequence[float], Sequence[float]]]],
    atomic_numbers: Sequence[int],
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mean [K, n_el, dim]``, ``inverse variance [K, n_el, dim]`` and ``covered [K, n_el]``
    (bool) of ``K`` adapters' statistics, indexed like the base's elements."""
    n_el = len(atomic_numbers)
    mean = torch.zeros(len(stats), n_el, dim, dtype=torch.float64)
    inv_var = torch.ones(len(stats), n_el, dim, dtype=torch.float64)
    covered = torch.zeros(len(stats), n_el, dtype=torch.bool)
    for a, per_element in enumerate(stats):
        for e, z in enumerate(atomic_numbers):
            if int(z) in per_element:
                mu, std = per_element[int(z)]
                mean[a, e] = torch.tensor(mu, dtype=torch.float64)
                std_t = torch.tensor(std, dtype=torch.float64)
                inv_var[a, e] = 1.0 / (std_t * std_t + STD_FLOOR * STD_FLOOR)
                covered[a, e] = True
    kw = {"dtype": dtype, "device": device}
    return mean.to(**kw), inv_var.to(**kw), covered.to(device=device)


def mixture_weights(
    descriptors: torch.Tensor,
    element: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sharpness: float | torch.Tensor = DEFAULT_SHARPNESS,
) -> torch.Tensor:
    """Per-node weights ``[n, K]`` over ``K`` adapters (see the module docstring).

    Args:
        descriptors: ``[n, dim]`` from :func:`neighbourhood_descriptor`.
        element: ``[n]`` index of each node's element in the base's element list.
        tables: :func:`mixture_tables` of the ``K`` adapters.
        sharpness: exponent ``w ~ (1 + s)^-sharpness``.

    Rows of nodes whose element no adapter covers are all zero (those nodes run the base);
    every other row sums to 1.

    Example:
        >>> stats = [{1: ([0.0], [1.0])}, {1: ([1.0], [1.0]), 8: ([0.0], [1.0])}]
        >>> tables = mixture_tables(stats, [1, 8], 1, torch.float64, None)
        >>> d = torch.tensor([[0.0], [0.5], [0.0]], dtype=torch.float64)  # H, H, O
        >>> mixture_weights(d, torch.tensor([0, 0, 1]), tables).round(decimals=3).tolist()
        [[0.941, 0.059], [0.5, 0.5], [0.0, 1.0]]
    """
    mean, inv_var, covered = tables
    mu = mean[:, element]  # [K, n, dim]
    diff = descriptors.unsqueeze(0) - mu
    score = (diff * diff * inv_var[:, element]).mean(dim=2)  # [K, n]
    mask = covered[:, element]  # [K, n]
    logits = -sharpness * torch.log1p(score)
    logits = logits.masked_fill(~mask, float("-inf"))
    any_covered = mask.any(dim=0)
    # rows no adapter covers: softmax of all -inf is NaN; give them finite logits, then zero
    logits = torch.where(any_covered.unsqueeze(0), logits, torch.zeros_like(logits))
    weights = torch.softmax(logits, dim=0) * any_covered.unsqueeze(0)
    return weights.transpose(0, 1)
