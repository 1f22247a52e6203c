"""Per-atom routing: every atom mixes the adapters by its own neighbourhood, smoothly."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from mmea_calc import AdaptedModel, MMEAConfig
from mmea_calc.build import water_box
from mmea_calc.calculator import MMEACalculator
from mmea_calc.errors import ConfigError, NoCandidateAdapterError
from mmea_calc.selection import describe_environment
from mmea_calc.testing import build_tiny_mace, random_cluster, random_rotation, randomize_adapter
from mmea_calc.train import calibrate_adapter


def _water(seed):
    return water_box(4, seed=seed)


def _organic(seed):
    return random_cluster(8, ("H", "C", "O"), seed=seed, min_distance=1.1)


def routed(e0s=True) -> AdaptedModel:
    """Two adapters: ``water`` (H, O; water boxes) and ``organic`` (H, C, O; clusters)."""
    model = AdaptedModel(build_tiny_mace())
    for i, (name, make) in enumerate((("water", _water), ("organic", _organic))):
        frames = [make(seed) for seed in range(3)]
        model.add_adapter(name, MMEAConfig(rank=4), set_active=False)
        randomize_adapter(model, name, std=0.2, seed=10 + i)
        calibrate_adapter(model, name, frames)
        model.set_adapter_environment(name, describe_environment(model, frames))
    if e0s:
        model.set_adapter_e0s("water", {1: 0.3, 8: -0.2})
        model.set_adapter_e0s("organic", {1: -0.1, 6: 0.4, 8: 0.5})
    return model


def mixed(seed=0) -> Atoms:
    """Two waters next to an organic cluster in a periodic box: atoms of both kinds."""
    atoms = _organic(seed).copy()
    atoms.center(vacuum=0.0)
    waters = _water(seed + 5)[:6].copy()
    waters.positions += atoms.positions.max(axis=0) + 1.3
    atoms += waters
    atoms.set_cell(atoms.positions.max(axis=0) + 2.5)
    atoms.pbc = True
    return atoms


def test_weights_cover_elements_sum_to_one_and_separate_environments():
    model = routed()
    calc = MMEACalculator(model, select="per-atom")
    atoms = mixed()
    atoms.calc = calc
    atoms.get_potential_energy()
    weights = calc.results["adapter_weights"]
    assert calc.results["adapter"] == "per-atom"
    assert weights.shape == (len(atoms), 2) and model.adapter_names == ["water", "organic"]
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    carbon = atoms.numbers == 6
    assert carbon.any() and np.all(weights[carbon, 0] == 0.0)  # water never saw C: exactly 0
    # in their own environments each adapter wins clearly
    for frame, column in ((_water(9), 0), (_organic(9), 1)):
        frame.calc = calc
        frame.get_potential_energy()
        assert calc.results["adapter_weights"][:, column].mean() > 0.8
    # a single adapter covering every element is that adapter exactly
    one = AdaptedModel(model.base_model)
    one.add_adapter("organic", MMEAConfig(rank=4), set_active=False)
    pairs = zip(one.adapter_parameters("organic"), model.adapter_parameters("organic"), strict=True)
    for p_one, p_ref in pairs:
        p_one.data.copy_(p_ref.data)
    one.set_adapter_environment("organic", model.adapter_metadata("organic")["environment"])
    per_atom = MMEACalculator(one, select="per-atom").get_forces(mixed())
    single = MMEACalculator(one, select="organic").get_forces(mixed())
    np.testing.assert_allclose(per_atom, single, atol=1e-12)


def test_per_atom_forces_and_stress_are_exact_gradients():
    model = routed()
    atoms = mixed(seed=1)
    atoms.calc = MMEACalculator(model, select="per-atom", routing_sharpness=1.0)
    forces = atoms.get_forces()
    weights = atoms.calc.results["adapter_weights"]
    assert ((weights[:, 0] > 0.05) & (weights[:, 0] < 0.95)).any()  # really mixed atoms
    np.testing.assert_allclose(forces, calculate_numerical_forces(atoms, eps=1e-4), atol=1e-6)
    stress = atoms.get_stress()
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-5), atol=1e-7)
    assert atoms.calc.results["energies"].sum() == pytest.approx(atoms.get_potential_energy())


def test_per_atom_routing_is_invariant_and_equivariant():
    model = routed()
    calc = MMEACalculator(model, select="per-atom")
    atoms = mixed(seed=2)
    atoms.pbc = False
    atoms.cell = None
    energy = calc.get_potential_energy(atoms)
    forces, weights = calc.results["forces"].copy(), calc.results["adapter_weights"].copy()
    rotation = random_rotation(seed=3, inversion=True)
    order = np.random.default_rng(0).permutation(len(atoms))
    moved = Atoms(atoms.numbers[order], atoms.positions[order] @ rotation.T + [1.0, -2.0, 0.5])
    assert calc.get_potential_energy(moved) == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(calc.results["forces"], forces[order] @ rotation.T, atol=1e-9)
    np.testing.assert_allclose(calc.results["adapter_weights"], weights[order], atol=1e-12)


def test_batch_with_per_atom_and_single_adapter_structures_equals_one_by_one():
    model = routed()
    calc = MMEACalculator(model, select="per-atom")
    tagged = _water(7)
    tagged.info["mmea_adapter"] = "water"
    structures = [mixed(seed=3), tagged, _organic(5)]
    batch = calc.calculate_batch(structures, ["energy", "forces"])
    for atoms, result in zip(structures, batch, strict=True):
        calc.calculate(atoms, ["energy", "forces"])
        assert result["adapter"] == calc.results["adapter"]
        assert result["energy"] == pytest.approx(calc.results["energy"], abs=1e-10)
        np.testing.assert_allclose(result["forces"], calc.results["forces"], atol=1e-10)
        if result["adapter"] == "per-atom":
            np.testing.assert_allclose(
                result["adapter_weights"], calc.results["adapter_weights"], atol=1e-12
            )
        else:
            assert "adapter_weights" not in result


def test_uncovered_elements_raise_or_run_on_the_base():
    model = routed()
    model.delete_adapter("organic")  # left: water (H, O)
    atoms = mixed(seed=4)
    with pytest.raises(NoCandidateAdapterError, match=r"per-atom routing.*\['C'\]"):
        MMEACalculator(model, select="per-atom").get_potential_energy(atoms)
    calc = MMEACalculator(model, select="per-atom", on_unknown="base")
    calc.get_potential_energy(atoms)
    weights = calc.results["adapter_weights"]
    carbon = atoms.numbers == 6
    assert np.all(weights[carbon] == 0.0) and np.allclose(weights[~carbon].sum(axis=1), 1.0)


def test_adapters_without_statistics_and_bad_settings_give_clear_errors():
    model = routed()
    environment = dict(model.adapter_metadata("water")["environment"])
    environment.pop("neighbourhood")
    model.set_adapter_environment("water", environment)
    with pytest.raises(ConfigError, match="mmea-calc calibrate"):
        MMEACalculator(model, select="per-atom")
    with pytest.raises(ConfigError, match="routing_sharpness"):
        MMEACalculator(routed(), select="per-atom", routing_sharpness=0.0)


def test_statistics_travel_with_the_adapter_file(tmp_path):
    model = routed()
    for name in model.adapter_names:
        model.save_adapter(name, tmp_path / name)
    loaded = AdaptedModel(build_tiny_mace())
    for name in model.adapter_names:
        loaded.load_adapter(tmp_path / name, set_active=False)
    atoms = mixed(seed=5)
    ref = MMEACalculator(model, select="per-atom")
    got = MMEACalculator(loaded, select="per-atom")
    assert got.get_potential_energy(atoms) == pytest.approx(ref.get_potential_energy(atoms))
    np.testing.assert_allclose(got.results["adapter_weights"], ref.results["adapter_weights"])


def test_sharpness_moves_towards_a_hard_split():
    model = routed()
    atoms = mixed(seed=6)
    spread = {}
    for sharpness in (0.5, 20.0):
        calc = MMEACalculator(model, select="per-atom", routing_sharpness=sharpness)
        calc.get_potential_energy(atoms)
        weights = calc.results["adapter_weights"]
        spread[sharpness] = np.minimum(weights, 1 - weights).mean()  # 0 for one-hot rows
    assert spread[20.0] < 0.5 * spread[0.5]


def _nve_error(select, dt_fs, steps):
    atoms = mixed(seed=7)
    atoms.calc = MMEACalculator(routed(), select=select, routing_sharpness=1.0)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    return np.abs(np.asarray(energies) - energies[0]).max()


def test_nve_with_per_atom_routing_conserves_energy_like_a_single_adapter():
    # Velocity Verlet: a bounded error that scales as dt^2 (no drift), as for one adapter; the
    # size lies within the range of the two single adapters' errors on the same structure
    per_atom = _nve_error("per-atom", 0.5, 100)
    per_atom_half = _nve_error("per-atom", 0.25, 200)
    singles = [_nve_error(name, 0.5, 100) for name in ("water", "organic")]
    assert min(singles) < per_atom < max(singles)
    assert 2.5 < per_atom / per_atom_half < 6.0
