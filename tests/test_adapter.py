from __future__ import annotations

import pytest
import torch

from mmea_calc._deps import o3
from mmea_calc.adapter import MMEAGate, MMEALinear, _RoutingSource, gate_layout
from mmea_calc.errors import TargetError


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


def test_wrapped_linear_gates_whole_irreps():
    irreps_in, irreps_out = o3.Irreps("4x0e+2x1o"), o3.Irreps("3x0e+2x1o+1x0o")
    linear = o3.Linear(irreps_in, irreps_out).double()
    src = _RoutingSource()
    wrapped = MMEALinear(linear, src)
    wrapped.mmea_adapters["a"] = MMEAGate(4, 2, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        for p in wrapped.mmea_adapters["a"].parameters():
            p.normal_()
    from mmea_calc.adapter import Routing

    x = torch.randn(5, irreps_in.dim, dtype=torch.float64)
    base = linear(x)
    assert torch.equal(wrapped(x), base)  # no routing -> base, bit for bit
    src.routing = Routing(names=("a",))
    y = wrapped(x)
    scale, shift = wrapped.mmea_adapters["a"](x[:, :4])
    assert torch.allclose(y[:, :3], base[:, :3] + shift)
    assert torch.allclose(y[:, 3:6], base[:, 3:6] * scale[:, :1])
    assert torch.allclose(y[:, 6:9], base[:, 6:9] * scale[:, 1:2])
    assert torch.equal(y[:, 9], base[:, 9])  # 0o untouched


def test_linear_without_scalar_input_is_refused():
    linear = o3.Linear(o3.Irreps("2x1o"), o3.Irreps("2x1o"))
    with pytest.raises(TargetError, match="no 0e input"):
        MMEALinear(linear, _RoutingSource())


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
