from __future__ import annotations

import pytest
import torch

from mmea_calc._deps import o3
from mmea_calc.adapter import MMEAGate, MMEALayer, Route, gate_layout
from mmea_calc.errors import ConfigError, TargetError


def test_layout_selects_scalars_by_irrep_not_position():
    lay = gate_layout(o3.Irreps("2x1o+3x0e+1x2e+4x0e"), o3.Irreps("2x0e+3x1o+1x0o+2x2e"))
    # input 0e blocks sit at [6, 9) and [14, 18)
    assert lay.scalar_in == ((6, 9), (14, 18))
    assert lay.num_scalar_in == 7
    assert lay.num_gates == 5  # 3 (1o) + 2 (2e)
    assert lay.num_shifts == 2  # 0e only; 0o is never shifted
    out_dim = o3.Irreps("2x0e+3x1o+1x0o+2x2e").dim
    assert len(lay.mult_index) == out_dim == len(lay.add_index)
    # the 0o channel (feature 11) is neither gated nor shifted
    assert lay.mult_index[11] == lay.num_gates and lay.add_index[11] == lay.num_shifts
    # each 1o channel shares one gate over its 3 components
    assert lay.mult_index[2:5] == (0, 0, 0) and lay.mult_index[5:8] == (1, 1, 1)


@pytest.mark.parametrize("phi", ["exp", "1+x"])
def test_fresh_gate_is_identity(phi):
    gate = MMEAGate(4, 3, num_gates=5, num_shifts=2, phi=phi, dtype=torch.float64)
    scale, shift = gate(torch.randn(7, 4, dtype=torch.float64))
    assert torch.equal(scale, torch.ones(7, 5, dtype=torch.float64))
    assert torch.equal(shift, torch.zeros(7, 2, dtype=torch.float64))


def _random_layer():
    irreps_in, irreps_out = o3.Irreps("4x0e+2x1o"), o3.Irreps("3x0e+2x1o+1x0o")
    linear = o3.Linear(irreps_in, irreps_out).double()
    layer = MMEALayer(linear)
    for name in ("a", "b"):
        gate = layer.add_gate(name, 2, like=linear.weight)
        with torch.no_grad():
            for p in gate.parameters():
                p.normal_()
    return linear, layer


def test_layer_gates_whole_irreps():
    linear, layer = _random_layer()
    x = torch.randn(5, linear.irreps_in.dim, dtype=torch.float64)
    base = linear(x)
    assert torch.equal(layer(x, base, Route(5, ())), base)  # no slot -> base, bit for bit
    assert torch.equal(layer(x, base, Route(5, (("other", None),))), base)  # not targeted here
    y = layer(x, base, Route(5, (("a", None),)))
    scale, shift = layer.gates["a"](x[:, :4])
    assert torch.allclose(y[:, :3], base[:, :3] + shift)
    assert torch.allclose(y[:, 3:6], base[:, 3:6] * scale[:, :1])
    assert torch.allclose(y[:, 6:9], base[:, 6:9] * scale[:, 1:2])
    assert torch.equal(y[:, 9], base[:, 9])  # 0o untouched


def test_layer_routes_nodes_to_their_adapter():
    linear, layer = _random_layer()
    x = torch.randn(6, linear.irreps_in.dim, dtype=torch.float64)
    base = linear(x)
    a, b = torch.tensor([0, 3]), torch.tensor([1, 4, 5])
    y = layer(x, base, Route(6, (("a", a), ("b", b))))
    only_a = layer(x, base, Route(6, (("a", None),)))
    only_b = layer(x, base, Route(6, (("b", None),)))
    assert torch.equal(y[a], only_a[a]) and torch.equal(y[b], only_b[b])
    assert torch.equal(y[2], base[2])  # node 2 is in no slot: the base, exactly
    with pytest.raises(RuntimeError, match="covers 5 nodes"):
        layer(x, base, Route(5, (("a", None),)))


def test_gate_is_created_on_the_device_and_dtype_of_its_linear():
    linear = o3.Linear("4x0e+2x1o", "3x0e+2x1o").to("meta")
    layer = MMEALayer(linear)
    gate = layer.add_gate("a", 2, like=linear.weight.float())
    assert {p.device.type for p in gate.parameters()} == {"meta"}
    assert {p.dtype for p in gate.parameters()} == {torch.float32}
    assert layer.mult_index.device.type == "meta"


def test_linear_without_scalar_input_is_refused():
    linear = o3.Linear(o3.Irreps("2x1o"), o3.Irreps("2x1o"))
    with pytest.raises(TargetError, match="no 0e input"):
        MMEALayer(linear)


def test_logit_bound_keeps_gates_finite_and_near_exp_for_small_logits():
    bounded = MMEAGate(2, 2, num_gates=3, num_shifts=0, logit_bound=10.0, dtype=torch.float64)
    plain = MMEAGate(2, 2, num_gates=3, num_shifts=0, logit_bound=None, dtype=torch.float64)
    plain.load_state_dict(bounded.state_dict())
    with torch.no_grad():
        for gate in (bounded, plain):  # deterministic: positive bottleneck, positive logits
            gate.down.weight.fill_(0.5)
            gate.gate.weight.fill_(1.0)
    huge = torch.full((1, 2), 1e4, dtype=torch.float64)  # unnormalised 0e messages can be this big
    assert torch.isinf(plain(huge)[0]).all()
    scale = bounded(huge)[0]
    assert torch.isfinite(scale).all() and scale.max() <= torch.exp(
        torch.tensor(10.0, dtype=torch.float64)
    ) * (1 + 1e-12)
    small = torch.full((1, 2), 0.3, dtype=torch.float64)
    assert torch.allclose(bounded(small)[0], plain(small)[0], rtol=1e-3)
    with pytest.raises(ValueError, match="logit_bound"):
        MMEAGate(2, 2, 1, 1, logit_bound=0.0)


def test_saturation_is_identity_inside_smooth_at_the_edges_and_bounded_outside():
    from mmea_calc.adapter import saturate

    low, high = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    width = 0.1 * (high - low)
    z = torch.linspace(-50.0, 50.0, 20001, dtype=torch.float64).unsqueeze(1).requires_grad_(True)
    y = saturate(z, low, high, width)
    inside = (z > low) & (z < high)
    assert torch.equal(y[inside], z[inside])
    assert y.min() >= low - width and y.max() <= high + width
    (slope,) = torch.autograd.grad(y.sum(), z, create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), z)
    # continuous slope and curvature: neighbours never jump (a hard clamp jumps 1 -> 0)
    assert slope.diff(dim=0).abs().max() < 0.05
    assert curvature.diff(dim=0).abs().max() < 0.2
    assert slope[-1].item() < 1e-12 and slope[0].item() < 1e-12  # saturated far outside


def test_gate_range_saturates_and_grades_only_outside():
    gate = MMEAGate(3, 2, num_gates=4, num_shifts=2, logit_bound=None, dtype=torch.float64)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    x = torch.randn(50, 3, dtype=torch.float64)
    z = gate.bottleneck(x)
    before = gate(x)
    gate.set_range(z.amin(0), z.amax(0))
    after = gate(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # inside: same
    assert torch.equal(gate.extrapolation(z), torch.zeros(50, dtype=torch.float64))
    far = 100 * x
    grade = gate.extrapolation(gate.bottleneck(far))
    assert grade.max() > 10
    scale_far, shift_far = gate(100 * far)
    assert torch.isfinite(scale_far).all()
    # saturated: ten times further out changes nothing any more (unbounded it would be exp(10x))
    scale_farther, shift_farther = gate(1000 * far)
    assert torch.allclose(scale_farther, scale_far, rtol=1e-6)
    assert torch.allclose(shift_farther, shift_far, rtol=1e-6, atol=1e-9)
    with pytest.raises(ConfigError, match="low <= high"):
        gate.set_range(torch.ones(2), torch.zeros(2))


def test_gate_forgets_what_it_gathered_when_its_tensors_change():
    """:meth:`MMEAGate.terms` gathers its heads and ranges once per gate: setting a range,
    replacing a head or converting the dtype must be seen by the next call."""
    torch.manual_seed(3)
    gate = MMEAGate(3, 2, num_gates=4, num_shifts=2, logit_bound=None, dtype=torch.float64)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    x = 10 * torch.randn(20, 3, dtype=torch.float64)
    free = gate(x)
    z = gate.bottleneck(x)
    gate.set_range(z.amin(0) / 4, z.amax(0) / 4)  # most nodes now lie outside: saturated
    ranged = gate(x)
    assert not torch.allclose(ranged[0], free[0])
    fresh = MMEAGate(3, 2, num_gates=4, num_shifts=2, logit_bound=None, dtype=torch.float64)
    fresh.load_state_dict(gate.state_dict())
    fresh.set_range(z.amin(0) / 4, z.amax(0) / 4)
    assert all(torch.equal(a, b) for a, b in zip(ranged, fresh(x), strict=True))
    gate.set_range(None, None)
    assert all(torch.equal(a, b) for a, b in zip(gate(x), free, strict=True))
    gate.shift = torch.nn.Linear(2, 2, dtype=torch.float64)  # a new head is used at once
    assert torch.equal(gate(x)[1], gate.shift(torch.nn.functional.silu(gate.bottleneck(x))))
    gate.set_range(z.amin(0), z.amax(0))
    gate(x)
    half = gate.float()  # buffers are replaced by float32 copies: gathered again
    scale, shift = half(x.float())
    assert scale.dtype == shift.dtype == torch.float32


def test_layer_modulates_exactly_what_the_gate_computes_in_every_path():
    """One formula: the single-adapter path (additive term fused into ``addcmul``), a mixed
    route and the frozen linear all give the same numbers for the same nodes."""
    from mmea_calc.adapter import FrozenMMEALinear

    linear, layer = _random_layer()
    x = torch.randn(6, linear.irreps_in.dim, dtype=torch.float64)
    z = layer.gates["a"].bottleneck(layer.scalars(x))
    layer.gates["a"].set_range(z.amin(0) / 2, z.amax(0) / 2)  # some nodes outside
    base = linear(x)
    single = layer(x, base, Route(6, (("a", None),)))
    every = torch.arange(6)
    mixed = layer(x, base, Route(6, (("a", every[:3]), ("b", every[3:]))))
    frozen = FrozenMMEALinear(linear, layer, "a")(x)
    torch.testing.assert_close(mixed[:3], single[:3], rtol=0, atol=1e-14)
    assert torch.equal(frozen, single)
    scale, shift = layer.gates["a"](layer.scalars(x))
    torch.testing.assert_close(single[:, :3], base[:, :3] + shift, rtol=0, atol=1e-14)
    torch.testing.assert_close(single[:, 3:6], base[:, 3:6] * scale[:, :1], rtol=0, atol=1e-14)
