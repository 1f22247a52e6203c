"""Per-element tables: gated linears that see only each atom's element, computed once.

In a MACE model the first gated linears depend on the element alone: ``node_embedding.linear``
takes the one-hot ``node_attrs``, and the first interaction's ``linear_up`` takes the node
embedding's output. With frozen gates, their modulated outputs (and, for calibrated gates, the
nodes' squared distances outside the gate ranges) are tables with one row per element of the
base. :class:`CallTables` serves such linears from tables kept in a cache and gathers one row per
node, instead of running the gate MLP on every node at every MD step.

Which linears qualify is found per call by tensor identity, not by module name (no knowledge of
mace's forward here): a linear whose input *is* the call's ``node_attrs`` (checked to be
one-hot, once per call), or *is* the output this call's tables gave another linear. Anything else
takes the eager path, and so does every call whose result must carry gradients: in training (the
gates' parameters require grad) and wherever the linear's input or output requires grad. Forces
need gradients with respect to positions only, which these linears do not see. Hooks on a gate's
layers (calibration records every node's bottleneck through them) also force the eager path.

A cached table is reused only while everything it was computed from is the same: the same
tensor objects (the linear's weight, every parameter and recorded range of the gate, the source
table) at the same in-place version (``Tensor._version``: optimizer steps, ``load_state_dict``,
``torch.no_grad`` edits) and storage, the same dtype, device, gate options and inference mode.
:class:`~mmea_calc.AdaptedModel` also drops its tables whenever its revision changes and on
``.to()``. Values equal the eager path's to float rounding (a matmul over a few rows instead of
many may sum in another order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmea_calc.adapter import MMEAGate, MMEALayer

__all__ = ["CallTables", "TableEntry"]


@dataclass(frozen=True)
class TableEntry:
    """One linear's per-element table for one adapter, and what it was computed from."""

    refs: tuple[torch.Tensor, ...]  # compared by identity
    stamp: tuple[Any, ...]  # versions, storages and options, compared by value
    out: torch.Tensor  # [n_elements, irreps_out.dim]: the modulated output per element
    excess: torch.Tensor | None  # [n_elements]: squared distance outside the ranges, or None

    def valid(self, refs: tuple[torch.Tensor, ...], stamp: tuple[Any, ...]) -> bool:
        return (
            len(refs) == len(self.refs)
            and all(a is b for a, b in zip(refs, self.refs, strict=True))
            and stamp == self.stamp
        )


def _observed(gate: MMEAGate) -> bool:
    """Whether hooks watch the gate's layers (calibration does): they must see every node."""
    return any(
        module._forward_hooks or module._forward_pre_hooks
        for module in (gate.down, gate.gate, gate.shift)
        if module is not None
    )


def _stamp(tensors: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


class CallTables:
    """Per-element tables for one forward call served by one adapter on every node.

    Args:
        node_attrs: the call's one-hot element encoding, ``[n_nodes, n_elements]``.
        name: the adapter serving every node.
        cache: ``{key: TableEntry}``, kept by the caller between calls (an
            :class:`~mmea_calc.AdaptedModel` clears it whenever its revision changes).

    Example:
        >>> from mmea_calc._deps import o3
        >>> from mmea_calc.adapter import Route
        >>> linear = o3.Linear("3x0e", "4x0e+2x1o")
        >>> layer = MMEALayer(linear)
        >>> gate = layer.add_gate("a", rank=2, like=linear.weight)
        >>> _ = torch.nn.init.normal_(gate.gate.weight)
        >>> _ = layer.requires_grad_(False), linear.requires_grad_(False)  # inference
        >>> attrs = torch.eye(3)[[0, 2, 2, 1]]
        >>> tables = CallTables(attrs, "a", cache={})
        >>> served = tables.serve("lin", layer, linear, attrs, linear(attrs), None)
        >>> eager = layer(attrs, linear(attrs), Route(4, (("a", None),)))
        >>> torch.allclose(served, eager), len(tables.cache)
        (True, 1)
    """

    def __init__(self, node_attrs: torch.Tensor, name: str, cache: dict[Any, TableEntry]):
        self.node_attrs = node_attrs
        self.name = name
        self.cache = cache
        self._element: torch.Tensor | None = None  # per node, once node_attrs is checked
        self._one_hot: bool | None = None
        self._eye: torch.Tensor | None = None
        self._served: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(output): table

    def _elements(self) -> torch.Tensor | None:
        """Each node's element (column of ``node_attrs``), or ``None`` unless one-hot."""
        if self._one_hot is None:
            attrs = self.node_attrs
            if attrs.dim() != 2:
                self._one_hot = False
                return None
            self._eye = torch.eye(attrs.shape[1], dtype=attrs.dtype, device=attrs.device)
            element = attrs.argmax(dim=1)
            self._one_hot = torch.equal(attrs, self._eye.index_select(0, element))
            self._element = element if self._one_hot else None
        return self._element

    def serve(
        self,
        key: Any,
        layer: MMEALayer,
        linear: torch.nn.Module,
        x: torch.Tensor,
        out: torch.Tensor,
        excess_sink: list[torch.Tensor] | None,
    ) -> torch.Tensor | None:
        """``layer``'s modulated output from a table (``None``: take the eager path).

        ``key`` names the linear in :attr:`cache`; ``x`` and ``out`` are the linear's input and
        output in this call; the nodes' squared distances outside the gate's ranges go to
        ``excess_sink`` as the eager path puts them there.
        """
        if x is self.node_attrs:
            source = None
        else:
            served = self._served.get(id(x))
            if served is None or served[0] is not x:
                return None
            source = served[1]
        if self.name not in layer.gates:
            return None
        gate = layer.gates[self.name]
        if _observed(gate):
            return None
        tensors = gate.tensors()
        if torch.is_grad_enabled() and (
            x.requires_grad or out.requires_grad or any(t.requires_grad for t in tensors)
        ):
            return None
        element = self._elements()
        if element is None:
            return None
        entry = self._entry(key, layer, gate, linear, tensors, source)
        result = entry.out.index_select(0, element)
        if excess_sink is not None and entry.excess is not None:
            excess_sink.append(entry.excess.index_select(0, element))
        self._served[id(result)] = (result, entry.out)
        return result

    def _entry(
        self,
        key: Any,
        layer: MMEALayer,
        gate: MMEAGate,
        linear: torch.nn.Module,
        tensors: tuple[torch.Tensor, ...],
        source: torch.Tensor | None,
    ) -> TableEntry:
        rows = self._eye if source is None else source
        refs = (linear.weight, *tensors) + (() if source is None else (source,))
        stamp = (
            _stamp(refs),
            tuple(rows.shape),
            rows.dtype,
            rows.device,
            torch.is_inference_mode_enabled(),
            gate.phi,
            gate.logit_bound,
            gate.fade_scale,
        )
        cache_key = (key, self.name)
        entry = self.cache.get(cache_key)
        if entry is not None and entry.valid(refs, stamp):
            return entry
        with torch.no_grad():
            sink: list[torch.Tensor] = []
            # .forward: the linear's own computation, without the hooks of this call
            out = layer.single(rows, linear.forward(rows), self.name, sink)
        entry = TableEntry(refs, stamp, out, sink[0] if sink else None)
        self.cache[cache_key] = entry
        return entry
