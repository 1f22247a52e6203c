"""The MMEA layer: input-dependent scalar gates around one frozen ``e3nn.o3.Linear``.

For a targeted linear with input ``h`` and frozen output ``h0 = W h`` (arXiv 2511.06696):

* ``u = SiLU(W_down h[0e] + b_down)`` from the ``0e`` block(s) of the input, rank ``r``;
* every output block with ``l > 0`` is scaled per channel,
  ``h'[l][c, :] = phi(g[l, c]) h0[l][c, :]``
  with ``g = W_g u + b_g`` and ``phi = exp`` (or ``1 + x``);
* every ``0e`` output block gets an additive term ``W_s u + b_s``; ``0o`` blocks are left alone.

All of ``W_g, b_g, b_down, b_s`` (and ``W_s`` by default) start at zero, so a fresh adapter is the
identity. By default the gate logit is softly bounded, ``g -> c tanh(g / c)`` with ``c = 10``
(``logit_bound``): indistinguishable from the paper's plain ``exp`` for trained logits (|g| < 2
changes by < 1 %), but a structure far outside the training data (whose unnormalised ``0e``
messages can reach 1e5) can no longer overflow ``exp`` into inf/NaN forces. ``None`` gives the
plain, unbounded map.

Gates come from invariants only and multiply whole irreps, so the layer is exactly
E(3)-equivariant. Several adapters can live in one :class:`MMEALinear`; which one a node uses is
set per forward pass through a shared :class:`Routing` (per-node indices), which is what lets one
batch mix structures served by different adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mmea_calc._deps import o3
from mmea_calc.errors import TargetError

__all__ = ["PHI_CHOICES", "MMEAGate", "MMEALinear", "Routing", "gate_layout"]

PHI_CHOICES = ("exp", "1+x")
Phi = Literal["exp", "1+x"]


@dataclass
class Routing:
    """Which adapter each node uses during one forward pass.

    Attributes:
        names: slot -> adapter name (``None`` is the bare base).
        node_slot: per-node slot index (int64, ``[n_nodes]``), or ``None`` when every node uses
            slot 0.
    """

    names: tuple[str | None, ...] = ()
    node_slot: torch.Tensor | None = None
    _node_index: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def nodes_of(self, slot: int) -> torch.Tensor:
        """Indices of the nodes routed to ``slot`` (computed once per forward pass)."""
        if slot not in self._node_index:
            assert self.node_slot is not None
            self._node_index[slot] = torch.nonzero(self.node_slot == slot).squeeze(1)
        return self._node_index[slot]


@dataclass(frozen=True)
class GateLayout:
    """Where gates and additive terms act in one linear's input and output."""

    scalar_in: tuple[tuple[int, int], ...]  # (start, stop) of each 0e block of the input
    num_scalar_in: int
    num_gates: int  # channels of l > 0 output blocks
    num_shifts: int  # channels of 0e output blocks
    mult_index: tuple[int, ...]  # per output feature: column of [gates | 1]
    add_index: tuple[int, ...]  # per output feature: column of [shifts | 0]


def gate_layout(irreps_in: o3.Irreps, irreps_out: o3.Irreps) -> GateLayout:
    """Compute the gate layout of a linear from its irreps (selected by irrep, not position)."""
    irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
    scalar_in = tuple(
        (sl.start, sl.stop)
        for (mul, ir), sl in zip(irreps_in, irreps_in.slices(), strict=True)
        if ir == o3.Irrep("0e") and mul > 0
    )
    num_gates = sum(mul for mul, ir in irreps_out if ir.l > 0)
    num_shifts = sum(mul for mul, ir in irreps_out if ir == o3.Irrep("0e"))
    mult_index: list[int] = []
    add_index: list[int] = []
    gate, shift = 0, 0
    for mul, ir in irreps_out:
        for _ in range(mul):
            if ir.l > 0:
                mult_index += [gate] * ir.dim
                add_index += [num_shifts] * ir.dim
                gate += 1
            elif ir == o3.Irrep("0e"):
                mult_index.append(num_gates)
                add_index.append(shift)
                shift += 1
            else:  # odd scalars: neither gated nor shifted (a shift would break parity)
                mult_index.append(num_gates)
                add_index.append(num_shifts)
    return GateLayout(
        scalar_in=scalar_in,
        num_scalar_in=sum(b - a for a, b in scalar_in),
        num_gates=num_gates,
        num_shifts=num_shifts,
        mult_index=tuple(mult_index),
        add_index=tuple(add_index),
    )


class MMEAGate(torch.nn.Module):
    """One adapter's parameters for one linear: a rank-``r`` SiLU bottleneck and two heads.

    Tensors: ``down.weight [r, n0_in]``, ``down.bias [r]``, ``gate.weight [n_gates, r]``,
    ``gate.bias [n_gates]``, ``shift.weight [n_shifts, r]``, ``shift.bias [n_shifts]`` (the
    heads exist only when the output has such blocks).

    Example:
        >>> g = MMEAGate(num_scalar_in=8, rank=4, num_gates=6, num_shifts=8)
        >>> scale, shift = g(torch.randn(3, 8))
        >>> bool((scale == 1).all()), bool((shift == 0).all())
        (True, True)
    """

    def __init__(
        self,
        num_scalar_in: int,
        rank: int,
        num_gates: int,
        num_shifts: int,
        phi: Phi = "exp",
        shift_init_std: float = 0.0,
        logit_bound: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if phi not in PHI_CHOICES:
            raise ValueError(f"phi={phi!r} is not supported; valid: {PHI_CHOICES}")
        if logit_bound is not None and not logit_bound > 0:
            raise ValueError(f"logit_bound must be > 0 or None, got {logit_bound!r}")
        kw = {"dtype": dtype, "device": device}
        self.phi = phi
        self.logit_bound = logit_bound
        self.down = torch.nn.Linear(num_scalar_in, rank, **kw)
        self.gate = torch.nn.Linear(rank, num_gates, **kw) if num_gates else None
        self.shift = torch.nn.Linear(rank, num_shifts, **kw) if num_shifts else None
        with torch.no_grad():
            # W_down keeps torch's default init so gradients reach W_g/W_s from step one.
            self.down.bias.zero_()
            for head in (self.gate, self.shift):
                if head is not None:
                    head.weight.zero_()
                    head.bias.zero_()
            if self.shift is not None and shift_init_std > 0:
                self.shift.weight.normal_(0.0, shift_init_std)

    def forward(self, scalars: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-node multipliers for ``l > 0`` channels and additive terms for ``0e`` channels."""
        u = torch.nn.functional.silu(self.down(scalars))
        scale = None
        if self.gate is not None:
            logits = self.gate(u)
            if self.logit_bound is not None:
                logits = self.logit_bound * torch.tanh(logits / self.logit_bound)
            scale = torch.exp(logits) if self.phi == "exp" else 1.0 + logits
        shift = self.shift(u) if self.shift is not None else None
        return scale, shift


class MMEALinear(torch.nn.Module):
    """A frozen ``o3.Linear`` (``base_layer``) with any number of named MMEA gates beside it.

    The routing object is shared by every wrapped linear of one model and set by
    :class:`~mmea_calc.AdaptedModel` around each forward pass; with no routing (or a base route)
    the output is the base layer's output, bit for bit.
    """

    def __init__(self, base_layer: torch.nn.Module, routing_source: _RoutingSource) -> None:
        super().__init__()
        if not isinstance(base_layer, o3.Linear) or not base_layer.internal_weights:
            raise TargetError(
                f"{type(base_layer).__name__} cannot be adapted: MMEA wraps e3nn o3.Linear "
                "modules with internal weights"
            )
        self.base_layer = base_layer
        self.irreps_in = base_layer.irreps_in
        self.irreps_out = base_layer.irreps_out
        self.layout = gate_layout(self.irreps_in, self.irreps_out)
        if self.layout.num_scalar_in == 0:
            raise TargetError(
                f"o3.Linear {self.irreps_in} -> {self.irreps_out} has no 0e input block to "
                "drive MMEA gates"
            )
        self.mmea_adapters = torch.nn.ModuleDict()
        self._routing_source = routing_source
        self.register_buffer(
            "_mult_index", torch.tensor(self.layout.mult_index, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "_add_index", torch.tensor(self.layout.add_index, dtype=torch.long), persistent=False
        )

    def _scalars(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.layout.scalar_in
        if len(blocks) == 1:
            return x[:, blocks[0][0] : blocks[0][1]]
        return torch.cat([x[:, a:b] for a, b in blocks], dim=1)

    def _modulate(
        self, out: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
    ) -> torch.Tensor:
        n = out.shape[0]
        if scale is not None:
            ones = torch.ones(n, 1, dtype=out.dtype, device=out.device)
            out = out * torch.cat([scale, ones], dim=1).index_select(1, self._mult_index)
        if shift is not None:
            zeros = torch.zeros(n, 1, dtype=out.dtype, device=out.device)
            out = out + torch.cat([shift, zeros], dim=1).index_select(1, self._add_index)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self._routing_source.routing
        if routing is None or not self.mmea_adapters:
            return out
        scalars = self._scalars(x)
        if routing.node_slot is None:
            gate = (
                self.mmea_adapters[routing.names[0]]
                if routing.names[0] in self.mmea_adapters
                else None
            )
            if gate is None:
                return out
            return self._modulate(out, *gate(scalars))
        if routing.node_slot.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"routing holds {routing.node_slot.shape[0]} nodes but the layer got "
                f"{x.shape[0]} rows; MMEA routes per node"
            )
        lay = self.layout
        scale = torch.ones(x.shape[0], lay.num_gates, dtype=out.dtype, device=out.device)
        shift = torch.zeros(x.shape[0], lay.num_shifts, dtype=out.dtype, device=out.device)
        for slot, name in enumerate(routing.names):
            if name is None or name not in self.mmea_adapters:
                continue
            idx = routing.nodes_of(slot)
            if idx.numel() == 0:
                continue
            s, a = self.mmea_adapters[name](scalars.index_select(0, idx))
            if s is not None:
                scale = scale.index_put((idx,), s)
            if a is not None:
                shift = shift.index_put((idx,), a)
        return self._modulate(
            out, scale if lay.num_gates else None, shift if lay.num_shifts else None
        )


class _RoutingSource:
    """Holder of the current :class:`Routing`, shared by every wrapped linear of a model."""

    def __init__(self) -> None:
        self.routing: Routing | None = None
