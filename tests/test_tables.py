"""Per-element tables (mmea_calc.tables): equal to the eager path, never stale, never on the
training path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmea_calc import AdaptedModel, MMEAConfig
from mmea_calc.data import atoms_to_graph, collate
from mmea_calc.testing import build_tiny_mace, random_cluster, randomize_adapter
from mmea_calc.train import calibrate_adapter

KEYS = ("energy", "node_energy", "forces", "stress", "adapter_extrapolation")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _frozen(model, name):
    for param in model.adapter_parameters(name):
        param.requires_grad_(False)


def _model(kind, dtype=torch.float64, seed=0):
    hidden, residual, scale_shift = kind
    base = build_tiny_mace(hidden, residual=residual, scale_shift=scale_shift, dtype=dtype)
    model = AdaptedModel(base)
    model.add_adapter("a", MMEAConfig(rank=4))
    randomize_adapter(model, "a", std=0.3, seed=seed)
    calibrate_adapter(model, "a", [random_cluster(8, seed=s, min_distance=1.2) for s in range(3)])
    _frozen(model, "a")
    return model


def _data(model, atoms_list):
    graphs = [atoms_to_graph(a, model.base_info) for a in atoms_list]
    return collate(graphs, dtype=model.dtype)


def _run(model, data, tables=True, **kwargs):
    model.element_tables = tables
    try:
        out = model(dict(data), compute_stress=True, training=False, **kwargs)
    finally:
        model.element_tables = True
    return {k: out[k].detach().clone() for k in KEYS if out.get(k) is not None}


def _close(got, want, tol):
    assert set(got) == set(want)
    for key in want:
        scale = max(want[key].abs().max().item(), 1.0)
        assert (got[key] - want[key]).abs().max().item() <= tol * scale, key


def _structures():
    inside = random_cluster(8, cell=6.0, seed=1, min_distance=1.2)
    outside = inside.copy()
    outside.positions *= 0.6  # compressed: far outside the calibrated ranges
    return inside, outside


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tables_equal_the_eager_path_inside_and_outside_the_ranges(tiny_kind, dtype):
    model = _model(tiny_kind, dtype)
    inside, outside = _structures()
    for atoms in (inside, outside, [inside, outside]):
        data = _data(model, atoms if isinstance(atoms, list) else [atoms])
        model._element_tables.clear()
        eager = _run(model, data, tables=False)
        assert not model._element_tables  # the eager run built no table
        served = _run(model, data)
        # the node embedding and the first interaction's linear_up came from tables
        assert sorted(k for k, _ in model._element_tables) == [
            "interactions.0.linear_up",
            "node_embedding.linear",
        ]
        _close(served, eager, TOL[dtype])
        again = _run(model, data)  # from the cached tables
        _close(again, eager, TOL[dtype])
    assert _run(model, _data(model, [outside]))["adapter_extrapolation"].item() > 1.0


def test_tables_follow_every_change_of_the_adapter(tmp_path):
    model = _model(("8x0e+8x1o", True, True))
    data = _data(model, [_structures()[1]])
    first = _run(model, data)
    table = model._element_tables[("node_embedding.linear", "a")].out

    # an in-place edit (as an optimizer step or load_state_dict makes), no revision bump
    gate = model.layer("node_embedding.linear").gates["a"]
    with torch.no_grad():
        gate.down.bias.add_(0.5)
    changed = _run(model, data)
    assert (changed["energy"] - first["energy"]).abs().item() > 1e-6
    assert model._element_tables[("node_embedding.linear", "a")].out is not table
    _close(changed, _run(model, data, tables=False), 1e-12)

    # the downstream table (first interaction's linear_up) follows its source's table
    gate = model.layer("interactions.0.linear_up").gates["a"]
    with torch.no_grad():
        gate.shift.weight.mul_(2.0)
    _close(_run(model, data), _run(model, data, tables=False), 1e-12)

    # new ranges (calibration), then a saved adapter reloaded under the same name
    calibrate_adapter(model, "a", [random_cluster(8, seed=9, min_distance=1.0)])
    _close(_run(model, data), _run(model, data, tables=False), 1e-12)
    model.save_adapter("a", tmp_path / "a")
    before = _run(model, data)
    model.delete_adapter("a")
    model.add_adapter("a", MMEAConfig(rank=4))  # identity: the base
    _frozen(model, "a")
    fresh = _run(model, data)
    with model.disable_adapters():
        _close(fresh, _run(model, data), 1e-12)
    model.delete_adapter("a")
    model.load_adapter(tmp_path / "a", "a")
    _close(_run(model, _data(model, [_structures()[1]])), before, 1e-12)

    # another dtype: tables are rebuilt in it
    model.float()
    data32 = _data(model, [_structures()[1]])
    served = _run(model, data32)
    assert model._element_tables[("node_embedding.linear", "a")].out.dtype == torch.float32
    _close(served, _run(model, data32, tables=False), 1e-5)


def test_training_keeps_the_eager_path_and_its_gradients():
    model = _model(("8x0e+8x1o", True, True))
    gate = model.layer("node_embedding.linear").gates["a"]
    for param in model.adapter_parameters("a"):
        param.requires_grad_(True)
    data = _data(model, [_structures()[0]])
    out = model(dict(data), training=True, compute_stress=True)
    assert not model._element_tables
    loss = out["energy"].sum() + (out["forces"] ** 2).sum() + out["stress"].pow(2).sum()
    loss.backward()  # double backward through the forces
    assert gate.down.weight.grad is not None and gate.down.weight.grad.abs().sum() > 0
    assert gate.shift.weight.grad.abs().sum() > 0
    # grad disabled (evaluation while training): tables may serve, and follow the optimiser
    with torch.no_grad():
        before = model(dict(data), compute_force=False)["energy"]
        assert model._element_tables
        gate.shift.weight.sub_(0.1 * gate.shift.weight.grad)
        after = model(dict(data), compute_force=False)["energy"]
        model.element_tables = False
        eager = model(dict(data), compute_force=False)["energy"]
    assert (after - before).abs().item() > 1e-9
    assert torch.allclose(after, eager, rtol=0, atol=1e-12)


def test_tables_decline_inputs_that_are_not_one_hot():
    model = _model(("8x0e+8x1o", True, True))
    data = _data(model, [_structures()[0]])
    data["node_attrs"] = data["node_attrs"] * 0.5  # not one-hot: tables must not serve it
    served = _run(model, data)
    assert not model._element_tables
    _close(served, _run(model, data, tables=False), 1e-12)


def test_calibration_sees_every_node_of_a_frozen_adapter():
    model = _model(("8x0e+8x1o", True, True))
    _run(model, _data(model, [_structures()[0]]))  # tables built and cached
    assert model._element_tables
    # no oxygen: a table over every element of the base would widen the ranges with it
    frames = [random_cluster(8, ("H", "C"), seed=s, min_distance=1.2) for s in range(3)]
    ranges = calibrate_adapter(model, "a", frames)
    model.element_tables = False
    for param in model.adapter_parameters("a"):
        param.requires_grad_(True)  # the eager path for sure
    eager = calibrate_adapter(model, "a", frames)
    assert ranges == eager


def test_a_calculator_trajectory_equals_the_eager_path_and_finite_differences():
    from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

    from mmea_calc.calculator import MMEACalculator

    model = _model(("8x0e+8x1o", True, True))
    atoms = random_cluster(10, cell=5.0, seed=1, min_distance=1.1)
    atoms.calc = MMEACalculator(model, select="a")
    rng = np.random.default_rng(0)
    for _ in range(4):  # steps of a trajectory: same composition, new positions
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        served = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
        assert model._element_tables
        model.element_tables = False
        atoms.calc.reset()
        eager = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
        model.element_tables = True
        atoms.calc.reset()
        for got, want in zip(served, eager, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    forces = atoms.get_forces()
    np.testing.assert_allclose(forces, calculate_numerical_forces(atoms, eps=1e-4), atol=1e-6)
    stress = atoms.get_stress()
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-5), atol=1e-7)
