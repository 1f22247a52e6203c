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
E(3)-equivariant.

The base model is never modified. An :class:`MMEALayer` holds every adapter's gates for one
targeted linear and computes the modulated output from the linear's input and output; which
adapter each node uses (a :class:`Route`) is handed to it per call by
:class:`~mmea_calc.AdaptedModel`, which builds the route from the graph dict of that forward
call. Nothing about routing is stored between calls, and any number of models may share one
frozen base module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.nn.utils import skip_init

from mmea_calc._deps import e3nn_jit, o3
from mmea_calc.errors import ConfigError, TargetError

__all__ = [
    "PHI_CHOICES",
    "RANGE_MARGIN",
    "FrozenMMEALinear",
    "GateLayout",
    "MMEAGate",
    "MMEALayer",
    "Mixture",
    "Route",
    "gate_layout",
    "saturate",
]

PHI_CHOICES = ("exp", "1+x")
Phi = Literal["exp", "1+x"]


@dataclass
class Mixture:
    """Per-node weights over several adapters for one forward call (per-atom routing).

    ``compute`` returns the ``[num_nodes, len(names)]`` weights; it runs once, on first use
    (inside the base's forward, after mace has prepared positions and shifts), and its result
    is kept for the rest of the call. A row's remainder ``1 - sum`` goes to the bare base.
    """

    names: tuple[str, ...]
    compute: Callable[[], torch.Tensor]
    _weights: list[torch.Tensor] = field(default_factory=list)

    def weights(self) -> torch.Tensor:
        if not self._weights:
            self._weights.append(self.compute())
        return self._weights[0]


@dataclass(frozen=True)
class Route:
    """Which adapter serves which nodes during one forward call.

    Attributes:
        num_nodes: rows of every node-feature tensor in the call.
        slots: ``(adapter name, node indices)`` pairs; indices ``None`` mean every node.
            Nodes in no slot run the bare base (multiplier exactly 1, shift exactly 0).
        extrapolation: a list that collects, per gated linear, every node's squared distance
            outside the gate's range (:meth:`MMEAGate.extrapolation` is its square root) for
            calibrated gates; ``None``: not collected. It lives as long as the call.
        mixture: per-atom routing: every node mixes the outputs (multipliers and additive
            terms) of the adapters in ``mixture.names`` with its own weights; ``slots`` then
            lists those adapters, each with indices ``None``.
    """

    num_nodes: int
    slots: tuple[tuple[str, torch.Tensor | None], ...]
    extrapolation: list[torch.Tensor] | None = None
    mixture: Mixture | None = None


#: Kinds of output irrep blocks in :attr:`GateLayout.blocks` (ints: TorchScript reads them).
BLOCK_NONE, BLOCK_GATE, BLOCK_SHIFT = 0, 1, 2


@dataclass(frozen=True)
class GateLayout:
    """Where gates and additive terms act in one linear's input and output."""

    scalar_in: tuple[tuple[int, int], ...]  # (start, stop) of each 0e block of the input
    num_scalar_in: int
    num_gates: int  # channels of l > 0 output blocks
    num_shifts: int  # channels of 0e output blocks
    mult_index: tuple[int, ...]  # per output feature: column of [gates | 1]
    add_index: tuple[int, ...]  # per output feature: column of [shifts | 0]
    # per output irrep block: (start, stop, mul, ir_dim, kind, first gate/shift column), kind
    # BLOCK_GATE (l > 0), BLOCK_SHIFT (0e) or BLOCK_NONE (0o: a shift would break parity)
    blocks: tuple[tuple[int, int, int, int, int, int], ...] = ()


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
    blocks = []
    gate, shift = 0, 0
    for (mul, ir), sl in zip(irreps_out, irreps_out.slices(), strict=True):
        if mul == 0:
            continue
        kind = BLOCK_GATE if ir.l > 0 else BLOCK_SHIFT if ir == o3.Irrep("0e") else BLOCK_NONE
        blocks.append((sl.start, sl.stop, mul, ir.dim, kind, gate if ir.l > 0 else shift))
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
        blocks=tuple(blocks),
    )


# Words used for the range rule, here and in every doc: a recorded range's *span* is
# ``high - low``; distances outside a range, the fade and the extrapolation grade are counted
# in spans. The *saturation width* (the ``range_width``/``logit_width`` tensors) is
# ``RANGE_MARGIN`` times the span: how far beyond the range a value may still move.

#: Saturation width beyond a recorded range, as a fraction of the range's span.
RANGE_MARGIN = 0.1
#: Floor of spans and saturation widths (a channel that never varied in training still
#: saturates smoothly).
RANGE_MIN_WIDTH = 1e-3
#: Spans outside the training range at which an adapter's update has faded to 1/e (for
#: gates calibrated with logit ranges; files calibrated before them keep the 1.0 they had).
FADE_SCALE = 2.0


def saturate(
    z: torch.Tensor, low: torch.Tensor, high: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """``z`` inside ``[low, high]``; beyond, it saturates smoothly within ``width``.

    ``high + width tanh((z - high) / width)`` above the range (and the mirror image below): the
    value, the slope (1) and the curvature (0) are continuous at the range's edges, so energies
    stay smooth (forces continuous, exactly -dE/dx) and nothing beyond ``[low - width, high +
    width]`` reaches the gate heads, however far outside the training data a structure lies.

    Example:
        >>> z = torch.tensor([[-5.0, 0.5, 1.0, 9.0]], dtype=torch.float64)
        >>> lo, hi = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        >>> saturate(z, lo, hi, 0.1 * (hi - lo)).round(decimals=4).tolist()
        [[-0.1, 0.5, 1.0, 1.1]]
    """
    inside = torch.clamp(z, low, high)
    return inside + width * torch.tanh((z - inside) / width)


def range_rule(
    z: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    width: torch.Tensor,
    inv_width: torch.Tensor,
    fade_coef: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z`` ``[n, r]`` saturated as :func:`saturate` does, and the logarithm of each node's
    fade weight (:func:`fade_coefficients`), ``[n, 1]``: ``-excess² / scale²``, with
    ``excess²`` the squared distance outside ``[low, high]`` in spans.

    ``fade_coef`` (``[r, 1]``) is ``-1 / (span² scale²)`` per channel
    (:func:`fade_coefficients`), so one matrix product sums the channels' squared distances
    (no square root, whose gradient at 0 would be infinite). One clamp serves both. Shared by
    :class:`MMEAGate` and :class:`FrozenMMEALinear` through :func:`gate_terms`, so the exported
    model computes exactly the same rule.
    """
    inside = torch.clamp(z, low, high)
    delta = z - inside
    saturated = torch.addcmul(inside, width, torch.tanh(delta * inv_width))
    return saturated, torch.mm(delta * delta, fade_coef)


def fade_coefficients(inv_span: torch.Tensor, scale: float = FADE_SCALE) -> torch.Tensor:
    """``-1 / (span² scale²)`` per bottleneck channel as a ``[r, 1]`` column: what
    :func:`range_rule` multiplies the channels' squared distances outside the range with.

    The *fade*: an adapter's update at a node whose squared distance outside the training
    range is ``excess²`` (in spans) is weighted by ``exp(-excess² / scale²)``: 1 inside,
    smooth, -> 0 far outside.

    Example:
        >>> low, high = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        >>> z = torch.tensor([[1.0], [1.5], [2.0], [4.0]], dtype=torch.float64)
        >>> coef = fade_coefficients(1 / (high - low), scale=1.0)
        >>> _, log_weight = range_rule(z, low, high, 0.1 * (high - low), 10 / (high - low), coef)
        >>> log_weight.exp().squeeze(1).round(decimals=3).tolist()
        [1.0, 0.779, 0.368, 0.0]
    """
    return (inv_span * inv_span * (-1.0 / (scale * scale))).unsqueeze(1)


def gate_terms(
    z: torch.Tensor,
    gate_weight: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    shift_weight: torch.Tensor | None,
    shift_bias: torch.Tensor | None,
    ranges: list[torch.Tensor],
    logit_ranges: list[torch.Tensor],
    logit_bound: float,
    phi_exp: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """THE gate formula: multipliers and additive terms from the bottleneck pre-activation.

    Every path computes its gates here: :class:`MMEAGate` (one adapter, mixed batches,
    per-atom routing) and :class:`FrozenMMEALinear` (the exported model), so a fix or a
    speed-up lands everywhere. TorchScript compiles it.

    Args:
        z: ``W_down h[0e] + b_down``, ``[n, rank]``.
        gate_weight, gate_bias: the gate head (``[n_gates, rank]``, ``[n_gates]``; ``None``
            or 0 rows when the output has no ``l > 0`` block); shift_weight, shift_bias: the
            additive head, alike for ``0e`` outputs.
        ranges: ``[]`` (uncalibrated) or the bottleneck's ``[low, high, saturation width,
            1/saturation width, fade coefficients]`` (:meth:`MMEAGate.range_tensors`).
        logit_ranges: ``[]`` or the bounded logits' ``[low, high, saturation width]``.
        logit_bound: ``c`` of the soft bound ``c tanh(g / c)``; ``<= 0``: unbounded.
        phi_exp: ``exp`` (else ``1 + x``).

    Returns:
        ``(scale [n, n_gates], shift [n, n_shifts], weight [n, 1], log_weight [n, 1])``: the
        additive term is ``shift * weight`` (:func:`modulate` fuses the product into the
        addition), ``weight`` is the fade (:func:`fade_coefficients`) and ``log_weight`` its
        logarithm (:func:`range_rule`), both ``None`` when uncalibrated; ``scale``/``shift``
        are ``None`` without their head. Inside the ranges this is the plain MMEA gate;
        outside, ``z`` and the logits saturate and the update (logits and shifts) fades with
        the distance.
        Nothing is allocated that is not needed (this runs for every gated linear at every
        step).
    """
    weight: torch.Tensor | None = None
    log_weight: torch.Tensor | None = None
    if len(ranges) == 5:
        z, log_weight = range_rule(z, ranges[0], ranges[1], ranges[2], ranges[3], ranges[4])
        weight = torch.exp(log_weight)
    u = torch.nn.functional.silu(z)
    scale: torch.Tensor | None = None
    if gate_weight is not None and gate_weight.shape[0] > 0:
        logits = torch.nn.functional.linear(u, gate_weight, gate_bias)
        if logit_bound > 0:
            logits = logit_bound * torch.tanh(logits / logit_bound)
        if len(logit_ranges) == 3:  # the (bounded) logits' training range
            logits = saturate(logits, logit_ranges[0], logit_ranges[1], logit_ranges[2])
        if weight is not None:
            logits = logits * weight
        scale = torch.exp(logits) if phi_exp else 1.0 + logits
    shift: torch.Tensor | None = None
    if shift_weight is not None and shift_weight.shape[0] > 0:
        shift = torch.nn.functional.linear(u, shift_weight, shift_bias)
    return scale, shift, weight, log_weight


def modulate(
    out: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    weight: torch.Tensor | None,
    blocks: list[tuple[int, int, int, int, int, int]],
) -> torch.Tensor:
    """Multiply ``l > 0`` channels of ``out`` by ``scale`` and add ``shift * weight`` (``shift``
    when ``weight`` is ``None``) to ``0e`` channels (``None``: leave them), block by block
    (:attr:`GateLayout.blocks`).

    A view and a broadcast per irrep block, not a gather of a per-feature multiplier (the
    gather's backward is a scatter); one ``split`` and one ``cat`` for several blocks, nothing
    for one. Shared by every path, like :func:`gate_terms`.
    """
    if len(blocks) == 1:
        return _modulated_block(out, blocks[0], scale, shift, weight)
    sizes = [stop - start for start, stop, _, _, _, _ in blocks]
    parts = out.split(sizes, dim=1)
    return torch.cat(
        [_modulated_block(parts[i], blocks[i], scale, shift, weight) for i in range(len(sizes))],
        dim=1,
    )


def _modulated_block(
    block: torch.Tensor,
    spec: tuple[int, int, int, int, int, int],
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    _, _, mul, dim, kind, col = spec
    if kind == 1 and scale is not None:  # BLOCK_GATE (TorchScript reads no globals)
        if col != 0 or scale.shape[1] != mul:
            scale = scale[:, col : col + mul]
        return (block.reshape(-1, mul, dim) * scale.unsqueeze(-1)).reshape(-1, mul * dim)
    if kind == 2 and shift is not None:  # BLOCK_SHIFT
        if col != 0 or shift.shape[1] != mul:
            shift = shift[:, col : col + mul]
        if weight is None:
            return block + shift
        return torch.addcmul(block, shift, weight)
    return block


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
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        if phi not in PHI_CHOICES:
            raise ConfigError(f"phi={phi!r} is not supported; valid: {list(PHI_CHOICES)}")
        if logit_bound is not None and not logit_bound > 0:
            raise ConfigError(f"logit_bound must be > 0 or None, got {logit_bound!r}")
        kw = {"dtype": dtype, "device": device}
        self.phi = phi
        self.logit_bound = logit_bound
        #: spans outside the range at which the update has faded to 1/e (:func:`fade_coefficients`)
        self.fade_scale = FADE_SCALE
        # init_weights=False: no random draw at all (tensors about to be loaded start at zero)
        linear = torch.nn.Linear if init_weights else functools.partial(skip_init, torch.nn.Linear)
        self.down = linear(num_scalar_in, rank, **kw)
        self.gate = linear(rank, num_gates, **kw) if num_gates else None
        self.shift = linear(rank, num_shifts, **kw) if num_shifts else None
        # the bottleneck's training range (set_range): buffers, so they follow .to(); stored in
        # the adapter's config, not among its tensors
        for key in ("range_low", "range_high", "range_width", "_inv_width", "_fade_coef"):
            self.register_buffer(key, None, persistent=False)
        # the gate logits' training range (set_range(logits=...)): [low, high, saturation width]
        for key in ("logit_low", "logit_high", "logit_width"):
            self.register_buffer(key, None, persistent=False)
        with torch.no_grad():
            if not init_weights:
                self.down.weight.zero_()
            # W_down keeps torch's default init so gradients reach W_g/W_s from step one.
            self.down.bias.zero_()
            for head in (self.gate, self.shift):
                if head is not None:
                    head.weight.zero_()
                    head.bias.zero_()
            if self.shift is not None and shift_init_std > 0 and init_weights:
                self.shift.weight.normal_(0.0, shift_init_std)

    @property
    def calibrated(self) -> bool:
        """Whether the bottleneck's training range is recorded (see :meth:`set_range`)."""
        return self.range_low is not None

    # What :meth:`terms` hands :func:`gate_terms` besides tensors of the heads, gathered once
    # (attribute lookups on a module cost more than the gate's small tensor ops): dropped
    # whenever an attribute of this module is set (heads, ranges, bound) or its tensors are
    # converted (``.to()``), so it never outlives what it was gathered from.
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self.__dict__.pop("_plan", None)

    def _apply(self, *args: Any, **kwargs: Any) -> MMEAGate:
        module = super()._apply(*args, **kwargs)
        self.__dict__.pop("_plan", None)
        return module

    def _terms_plan(self) -> tuple:
        plan = self.__dict__.get("_plan")
        if plan is None:
            bound = self.logit_bound if self.logit_bound is not None else 0.0
            plan = (self.gate, self.shift, self.range_tensors(), self.logit_range_tensors(),
                    bound, self.phi == "exp")  # fmt: skip
            self.__dict__["_plan"] = plan
        return plan

    def set_range(
        self,
        low: torch.Tensor | None,
        high: torch.Tensor | None,
        margin: float = RANGE_MARGIN,
        *,
        logits: tuple[torch.Tensor, torch.Tensor] | None = None,
        fade_scale: float = FADE_SCALE,
    ) -> None:
        """Record the range ``[low, high]`` (``[rank]`` each) the bottleneck's pre-activation
        spanned on the training data; outside it the pre-activation saturates smoothly
        (:func:`saturate`, width ``margin`` times the range) and the update fades
        (:func:`fade_coefficients`, ``fade_scale``). ``logits``: the ``(low, high)`` range of
        the gate logits (after ``logit_bound``) on the same data (``[n_gates]`` each); the
        logits then saturate to it as well. ``None`` forgets the ranges."""
        if low is None or high is None:
            self.range_low = self.range_high = self.range_width = None
            self._inv_width = self._fade_coef = None
            self.logit_low = self.logit_high = self.logit_width = None
            return
        if not margin > 0:
            raise ConfigError(f"the range margin must be > 0, got {margin!r}")
        if not fade_scale > 0:
            raise ConfigError(f"the fade scale must be > 0, got {fade_scale!r}")
        low, high = self._checked_range(low, high, self.down.bias.shape[0], "gate")
        if logits is not None:
            if self.gate is None:
                raise ConfigError("logit ranges given for a gate without l > 0 outputs")
            logit_low, logit_high = self._checked_range(*logits, self.gate.bias.shape[0], "logit")
            self.logit_low, self.logit_high = logit_low, logit_high
            self.logit_width = (margin * (logit_high - logit_low)).clamp_min(RANGE_MIN_WIDTH)
        else:
            self.logit_low = self.logit_high = self.logit_width = None
        self.fade_scale = float(fade_scale)
        self.range_low, self.range_high = low, high
        self.range_width = (margin * (high - low)).clamp_min(RANGE_MIN_WIDTH)
        self._inv_width = 1.0 / self.range_width
        inv_span = 1.0 / (high - low).clamp_min(RANGE_MIN_WIDTH)
        self._fade_coef = fade_coefficients(inv_span, self.fade_scale)

    def _checked_range(
        self, low: Any, high: Any, size: int, what: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        like = self.down.bias
        low = torch.as_tensor(low, dtype=like.dtype, device=like.device).reshape(-1)
        high = torch.as_tensor(high, dtype=like.dtype, device=like.device).reshape(-1)
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise ConfigError(
                f"a {what} range must be finite; the adapter gave NaN/inf activations on the "
                "calibration data (calibrate on the data it was trained on)"
            )
        if low.shape != (size,) or high.shape != (size,) or not bool((high >= low).all()):
            raise ConfigError(
                f"a {what} range needs low <= high with {size} values each, got shapes "
                f"{tuple(low.shape)} and {tuple(high.shape)}"
            )
        return low, high

    def bottleneck(self, scalars: torch.Tensor) -> torch.Tensor:
        """The pre-activation ``W_down h[0e] + b_down`` (``[n, rank]``), before saturation."""
        return self.down(scalars)

    def extrapolation(self, z: torch.Tensor) -> torch.Tensor:
        """Per-node distance of the pre-activation outside its range, ``[n]``: the norm over
        the ``rank`` channels of each channel's excess in units of its range's span (0
        inside). The fade (:func:`fade_coefficients`) turns it into the weight of the
        adapter's update."""
        if self.range_low is None:
            return z.new_zeros(z.shape[0])
        return self.excess_squared(range_rule(z, *self.range_tensors())[1]).sqrt()

    def excess_squared(self, log_weight: torch.Tensor) -> torch.Tensor:
        """The nodes' squared distances outside the range (in spans, ``[n]``, detached) from
        the logarithm of their fade weight (:func:`range_rule`)."""
        return log_weight.detach().squeeze(1) * -(self.fade_scale * self.fade_scale)

    def terms(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """:func:`gate_terms` of this gate on the pre-activation ``z``: ``(scale, shift,
        weight, log_weight)``, the additive term being ``shift * weight``."""
        gate, shift_head, ranges, logit_ranges, bound, phi_exp = self._terms_plan()
        return gate_terms(
            z,
            None if gate is None else gate.weight,
            None if gate is None else gate.bias,
            None if shift_head is None else shift_head.weight,
            None if shift_head is None else shift_head.bias,
            ranges,
            logit_ranges,
            bound,
            phi_exp,
        )

    def heads(
        self, z: torch.Tensor, excess_sink: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Multipliers and additive terms from the pre-activation ``z``.

        With a recorded range, the update fades out with the node's distance outside it
        (logits and shifts times the fade, :func:`fade_coefficients`), ``z`` saturates
        (:func:`saturate`) and so do the logits, to their own training range when it is
        recorded: inside the ranges the adapter is exactly what was trained; far outside, the
        bare base. The nodes' squared distances (detached) are appended to ``excess_sink``
        when given.
        """
        scale, shift, weight, log_weight = self.terms(z)
        if excess_sink is not None and log_weight is not None:
            excess_sink.append(self.excess_squared(log_weight))
        if shift is not None and weight is not None:
            shift = shift * weight
        return scale, shift

    def range_tensors(self) -> list[torch.Tensor]:
        """The bottleneck's range as :func:`gate_terms` takes it (``[]``: uncalibrated)."""
        if self.range_low is None:
            return []
        return [self.range_low, self.range_high, self.range_width, self._inv_width,
                self._fade_coef]  # fmt: skip

    def logit_range_tensors(self) -> list[torch.Tensor]:
        """The logits' range as :func:`gate_terms` takes it (``[]``: none recorded)."""
        if self.logit_low is None:
            return []
        return [self.logit_low, self.logit_high, self.logit_width]

    def forward(self, scalars: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-node multipliers for ``l > 0`` channels and additive terms for ``0e`` channels."""
        return self.heads(self.bottleneck(scalars))


class MMEALayer(torch.nn.Module):
    """The gates of every adapter for one targeted ``o3.Linear`` (which it does not hold).

    :meth:`forward` takes the linear's input ``x``, its output ``out`` and the call's
    :class:`Route`, and returns the modulated output; :class:`~mmea_calc.AdaptedModel` calls it
    from a forward hook registered on the linear for the duration of one call.

    Example:
        >>> linear = o3.Linear("4x0e+2x1o", "3x0e+2x1o")
        >>> layer = MMEALayer(linear)
        >>> _ = layer.add_gate("a", rank=2, like=linear.weight)
        >>> x = torch.randn(5, linear.irreps_in.dim)
        >>> bool((layer(x, linear(x), Route(5, (("a", None),))) == linear(x)).all())
        True
    """

    def __init__(self, linear: torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(linear, o3.Linear) or not linear.internal_weights:
            raise TargetError(
                f"{type(linear).__name__} cannot be adapted: MMEA targets e3nn o3.Linear "
                "modules with internal weights"
            )
        self.irreps_in = o3.Irreps(str(linear.irreps_in))
        self.irreps_out = o3.Irreps(str(linear.irreps_out))
        self.layout = gate_layout(self.irreps_in, self.irreps_out)
        self._blocks = list(self.layout.blocks)
        if self.layout.num_scalar_in == 0:
            raise TargetError(
                f"o3.Linear {self.irreps_in} -> {self.irreps_out} has no 0e input block to "
                "drive MMEA gates"
            )
        device = linear.weight.device
        self.gates = torch.nn.ModuleDict()
        for key, values in (
            ("mult_index", self.layout.mult_index),
            ("add_index", self.layout.add_index),
        ):
            self.register_buffer(
                key, torch.tensor(values, dtype=torch.long, device=device), persistent=False
            )

    def add_gate(
        self,
        name: str,
        rank: int,
        like: torch.Tensor,
        phi: Phi = "exp",
        shift_init_std: float = 0.0,
        logit_bound: float | None = None,
        init_weights: bool = True,
    ) -> MMEAGate:
        """Create adapter ``name``'s gate on ``like``'s device and dtype (the linear's weight);
        ``init_weights=False`` draws no random numbers (every tensor zero, to be loaded)."""
        lay = self.layout
        gate = MMEAGate(
            lay.num_scalar_in,
            rank,
            lay.num_gates,
            lay.num_shifts,
            phi=phi,
            shift_init_std=shift_init_std,
            logit_bound=logit_bound,
            dtype=like.dtype,
            device=like.device,
            init_weights=init_weights,
        )
        self.gates[name] = gate
        return gate

    def scalars(self, x: torch.Tensor) -> torch.Tensor:
        """The ``0e`` input blocks that drive the gates, ``[n, num_scalar_in]``."""
        blocks = self.layout.scalar_in
        if len(blocks) == 1:
            start, stop = blocks[0]
            return x if start == 0 and stop == x.shape[1] else x[:, start:stop]
        return torch.cat([x[:, a:b] for a, b in blocks], dim=1)

    def modulate(
        self, out: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
    ) -> torch.Tensor:
        """Multiply ``l > 0`` channels by ``scale`` and add ``shift`` to ``0e`` channels
        (:func:`modulate` with this linear's blocks)."""
        return modulate(out, scale, shift, None, self._blocks)

    def single(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        name: str,
        excess_sink: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``out`` modulated by adapter ``name``'s gates on every row of ``x`` (the nodes'
        squared distances outside its ranges go to ``excess_sink``, see
        :meth:`MMEAGate.heads`)."""
        gate = self.gates[name]
        scale, shift, weight, log_weight = gate.terms(gate.bottleneck(self.scalars(x)))
        if excess_sink is not None and log_weight is not None:
            excess_sink.append(gate.excess_squared(log_weight))
        return modulate(out, scale, shift, weight, self._blocks)

    def forward(self, x: torch.Tensor, out: torch.Tensor, route: Route) -> torch.Tensor:
        if x.shape[0] != route.num_nodes:
            raise RuntimeError(
                f"the route covers {route.num_nodes} nodes but the linear got {x.shape[0]} "
                "rows; MMEA gates act per node"
            )
        if route.mixture is not None:
            return self._mix(x, out, route)
        if len(route.slots) == 1 and route.slots[0][1] is None:  # every node, one adapter
            name = route.slots[0][0]
            if name not in self.gates:
                return out
            return self.single(x, out, name, route.extrapolation)
        slots = [(name, idx) for name, idx in route.slots if name in self.gates]
        if not slots:
            return out
        lay = self.layout
        scalars = self.scalars(x)
        scale = torch.ones(x.shape[0], lay.num_gates, dtype=out.dtype, device=out.device)
        shift = torch.zeros(x.shape[0], lay.num_shifts, dtype=out.dtype, device=out.device)
        for name, idx in slots:
            if idx is None:
                raise RuntimeError(f"adapter {name!r} is routed to every node beside others")
            gate = self.gates[name]
            sink: list[torch.Tensor] | None = [] if route.extrapolation is not None else None
            s, a = gate.heads(gate.bottleneck(scalars.index_select(0, idx)), sink)
            if sink:  # per node of the whole batch, 0 where another adapter serves
                whole = sink[0].new_zeros(route.num_nodes).index_put((idx,), sink[0])
                route.extrapolation.append(whole)
            if s is not None:
                scale = scale.index_put((idx,), s)
            if a is not None:
                shift = shift.index_put((idx,), a)
        return self.modulate(
            out, scale if lay.num_gates else None, shift if lay.num_shifts else None
        )

    def _mix(self, x: torch.Tensor, out: torch.Tensor, route: Route) -> torch.Tensor:
        """Per-atom routing: each node's multipliers and additive terms are the weighted mix of
        every adapter's (an adapter without a gate here contributes 1 and 0, as the base)."""
        mixture = route.mixture
        weights = mixture.weights()
        lay = self.layout
        # the base's share (rows no adapter covers, and adapters not gating this linear)
        rest = 1.0 - weights.sum(dim=1, keepdim=True)
        scale = rest.expand(-1, lay.num_gates) if lay.num_gates else None
        shift = None
        scalars = self.scalars(x)
        grades = []
        for k, name in enumerate(mixture.names):
            w = weights[:, k : k + 1]
            if name not in self.gates:
                scale = None if scale is None else scale + w
                continue
            gate = self.gates[name]
            sink: list[torch.Tensor] | None = [] if route.extrapolation is not None else None
            s, a = gate.heads(gate.bottleneck(scalars), sink)
            if sink:
                grades.append(sink[0] * w.detach().squeeze(1))
            if s is not None:
                scale = scale + w * s
            if a is not None:
                shift = w * a if shift is None else shift + w * a
        if grades and route.extrapolation is not None:
            route.extrapolation.append(torch.stack(grades).sum(dim=0))
        return self.modulate(out, scale, shift)


def _head(head: torch.nn.Linear | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a gate head, or empty ``[0, rank]``/``[0]`` tensors when it is
    absent (what :func:`gate_terms` takes)."""
    if head is None:
        return like.new_zeros(0, like.shape[-1]), like.new_zeros(0)
    return head.weight, head.bias


@e3nn_jit.compile_mode("script")
class FrozenMMEALinear(torch.nn.Module):
    """A targeted ``o3.Linear`` with ONE adapter's gates baked in: a plain, scriptable module.

    It computes exactly what :class:`MMEALayer` computes for that adapter on every node, with
    typed attributes and buffers only (no routing, no ``Optional`` submodules), so a model
    holding it compiles with ``e3nn.util.jit.compile`` and runs under LAMMPS
    (:meth:`mmea_calc.AdaptedModel.freeze` builds such models). Its tensors are buffers: nothing
    in it trains. The wrapped linear sits under ``.linear``, so state-dict keys change (one more
    reason never to give a frozen model to converters that match weights by key name).

    Example:
        >>> linear = o3.Linear("4x0e+2x1o", "3x0e+2x1o")
        >>> layer = MMEALayer(linear)
        >>> gate = layer.add_gate("a", rank=2, like=linear.weight, logit_bound=10.0)
        >>> for head in (gate.gate, gate.shift):
        ...     _ = torch.nn.init.normal_(head.weight)
        >>> frozen = FrozenMMEALinear(linear, layer, "a")
        >>> x = torch.randn(5, linear.irreps_in.dim)
        >>> expected = layer(x, linear(x), Route(5, (("a", None),)))
        >>> torch.allclose(frozen(x), expected), torch.allclose(expected, linear(x))
        (True, False)
        >>> _ = torch.jit.script(frozen)
    """

    def __init__(self, linear: torch.nn.Module, layer: MMEALayer, name: str) -> None:
        super().__init__()
        if name not in layer.gates:
            raise TargetError(f"no gate named {name!r} on this layer; gates: {list(layer.gates)}")
        gate = layer.gates[name]
        self.linear = linear
        # The linear's weight, also under this module's own name: LAMMPS' pair_mace reads the
        # model's dtype from ``model.node_embedding.linear.weight`` (no copy: same storage).
        self.register_buffer("weight", linear.weight.detach(), persistent=False)
        self.irreps_in = layer.irreps_in
        self.irreps_out = layer.irreps_out
        self.phi_exp: bool = gate.phi == "exp"
        self.bounded: bool = gate.logit_bound is not None
        self.logit_bound: float = float(gate.logit_bound) if gate.logit_bound is not None else 1.0
        lay = layer.layout
        self.blocks: list[tuple[int, int, int, int, int, int]] = list(lay.blocks)
        device = gate.down.weight.device
        scalar_index = [i for a, b in lay.scalar_in for i in range(a, b)]
        # one block of scalars (the usual case): a view, not an index_select (whose backward
        # is a scatter); -1: several blocks
        one = len(lay.scalar_in) == 1
        self.scalar_start: int = lay.scalar_in[0][0] if one else -1
        self.scalar_stop: int = lay.scalar_in[0][1] if one else -1
        self.register_buffer(
            "scalar_index", torch.tensor(scalar_index, dtype=torch.long, device=device)
        )
        weight = gate.down.weight
        tensors = {
            "down_weight": weight.detach().clone(),
            "down_bias": gate.down.bias.detach().clone(),
        }
        for key, head in (("gate", gate.gate), ("shift", gate.shift)):
            head_weight, head_bias = _head(head, weight)
            tensors[f"{key}_weight"] = head_weight.detach().clone()
            tensors[f"{key}_bias"] = head_bias.detach().clone()
        self.has_range: bool = gate.calibrated
        self.has_logit_range: bool = gate.logit_low is not None
        self.fade_scale: float = float(gate.fade_scale)
        keys = ("range_low", "range_high", "range_width", "_inv_width", "_fade_coef")
        keys += ("logit_low", "logit_high", "logit_width")
        for key in keys:  # empty when not calibrated
            value = getattr(gate, key)
            name = key if not key.startswith("_") else "range" + key
            tensors[name] = value.detach().clone() if value is not None else weight.new_zeros(0)
        for key, value in tensors.items():
            self.register_buffer(key, value)

    def _apply(self, *args: Any, **kwargs: Any) -> FrozenMMEALinear:
        """``.to()``/``.double()``...: convert, then tie ``weight`` to the linear's weight again."""
        module = super()._apply(*args, **kwargs)
        self.weight = self.linear.weight.detach()
        return module

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling and ``copy.deepcopy``: tie ``weight`` to the linear's weight again (and
        give modules pickled before ``range_fade_coef`` and ``scalar_start`` existed both: they
        hold ``range_inv_span``, 1/span, instead)."""
        super().__setstate__(state)
        self.weight = self.linear.weight.detach()
        if "range_fade_coef" not in self._buffers:
            inv_span = self.range_inv_span
            coef = fade_coefficients(inv_span, self.fade_scale) if self.has_range else inv_span
            self.register_buffer("range_fade_coef", coef)
        if "scalar_start" not in self.__dict__:
            self.scalar_start = self.scalar_stop = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear's output on ``x`` ``[n, irreps_in.dim]``, modulated by the baked gates
        (:func:`gate_terms` and :func:`modulate`, as the eager model computes them)."""
        out = self.linear(x)
        start, stop = self.scalar_start, self.scalar_stop
        if start >= 0:
            scalars = x if start == 0 and stop == x.shape[1] else x[:, start:stop]
        else:
            scalars = x.index_select(1, self.scalar_index)
        z = torch.nn.functional.linear(scalars, self.down_weight, self.down_bias)
        ranges: list[torch.Tensor] = []
        if self.has_range:
            ranges = [self.range_low, self.range_high, self.range_width, self.range_inv_width,
                      self.range_fade_coef]  # fmt: skip
        logit_ranges: list[torch.Tensor] = []
        if self.has_logit_range:
            logit_ranges = [self.logit_low, self.logit_high, self.logit_width]
        scale, shift, weight, _ = gate_terms(
            z,
            self.gate_weight,
            self.gate_bias,
            self.shift_weight,
            self.shift_bias,
            ranges,
            logit_ranges,
            self.logit_bound if self.bounded else 0.0,
            self.phi_exp,
        )
        return modulate(out, scale, shift, weight, self.blocks)
