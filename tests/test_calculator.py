from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.filters import FrechetCellFilter
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from mmea_calc import AdaptedModel, MMEAConfig
from mmea_calc.calculator import MMEACalculator
from mmea_calc.errors import (
    AdapterNotFoundError,
    BaseModelMismatchError,
    ConfigError,
    InvalidStructureError,
    NoCandidateAdapterError,
    NonFiniteResultError,
    UnsupportedElementError,
)
from mmea_calc.selection import describe_environment
from mmea_calc.testing import build_tiny_mace, random_cluster, random_rotation, randomize_adapter


def adapted(names=("a",), seed=0, **base_kw):
    model = AdaptedModel(build_tiny_mace(**base_kw))
    for i, name in enumerate(names):
        model.add_adapter(name, MMEAConfig(rank=4), set_active=False)
        randomize_adapter(model, name, std=0.1, seed=seed + i)
    return model


def box(seed=1, n=10, side=5.0):
    return random_cluster(n, cell=side, seed=seed, min_distance=1.1)


@pytest.mark.parametrize("periodic", [True, False])
def test_forces_and_stress_match_finite_differences(periodic):
    atoms = box() if periodic else random_cluster(10, seed=2, density=0.1)
    atoms.calc = MMEACalculator(adapted(), select="a")
    forces = atoms.get_forces()
    assert atoms.calc.results["energies"].sum() == pytest.approx(atoms.get_potential_energy())
    assert np.abs(forces).max() > 1e-3  # non-trivial forces, so the check can fail
    np.testing.assert_allclose(forces, calculate_numerical_forces(atoms, eps=1e-4), atol=1e-6)
    if periodic:
        stress = atoms.get_stress()
        assert np.abs(stress).max() > 1e-4
        np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-5), atol=1e-7)
    else:
        with pytest.raises(PropertyNotImplementedError, match="3-D cell"):
            atoms.get_stress()


def test_mixed_boundary_conditions():
    atoms = box(seed=4)
    atoms.pbc = [True, True, False]
    atoms.calc = MMEACalculator(adapted(), select="a")
    np.testing.assert_allclose(
        atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-4), atol=1e-6
    )


def _nve_max_error(dt_fs, steps):
    atoms = box(seed=3, n=8, side=5.5)
    atoms.calc = MMEACalculator(adapted(seed=5), select="a")
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    energies = np.asarray(energies)
    return np.abs(energies - energies[0]).max(), atoms.get_kinetic_energy()


def test_nve_md_conserves_energy():
    # Velocity Verlet is symplectic: the total-energy error stays bounded and scales as dt^2
    # (no drift). At 0.5 fs over 200 steps it must stay under 1 meV per atom, and halving the
    # step must cut it about 4x; non-conservative forces would drift instead of scaling so.
    err_1, kinetic = _nve_max_error(0.5, 200)
    err_half, _ = _nve_max_error(0.25, 400)
    assert kinetic > 0.05  # atoms really move
    assert err_1 < 1e-3 * 8
    assert 2.5 < err_1 / err_half < 6.0


def test_bfgs_and_cell_relaxation_converge():
    # ZBL pair repulsion gives the random tiny model a repulsive core, hence a finite minimum
    model = adapted(pair_repulsion=True)
    atoms = random_cluster(6, seed=7, density=0.05)
    atoms.calc = MMEACalculator(model, select="a")
    assert BFGS(atoms, logfile=None).run(fmax=0.01, steps=300)
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.01
    crystal = bulk("C", "diamond", a=3.6)
    crystal.rattle(0.05, seed=1)
    crystal.calc = MMEACalculator(model, select="a")
    start_volume = crystal.get_volume()
    cell_filter = FrechetCellFilter(crystal)
    assert BFGS(cell_filter, logfile=None).run(fmax=0.01, steps=300)
    assert np.linalg.norm(cell_filter.get_forces(), axis=1).max() < 0.01
    assert crystal.get_volume() != pytest.approx(start_volume, rel=1e-3)  # the cell moved


def test_swap_matches_fresh_calculators_and_never_leaks():
    model = adapted(("a", "b"))
    atoms = box(seed=9)
    fresh = {}
    for name in ("a", "b", None):
        probe = atoms.copy()
        probe.calc = MMEACalculator(adapted(("a", "b")), select=name)
        fresh[name] = (probe.get_potential_energy(), probe.get_forces(), probe.get_stress())
    assert abs(fresh["a"][0] - fresh["b"][0]) > 1e-6
    atoms.calc = calc = MMEACalculator(model, select="a")
    for name in ("a", "b", "a", None, "b"):
        calc.set_adapter(name)
        assert atoms.get_potential_energy() == fresh[name][0]
        np.testing.assert_array_equal(atoms.get_forces(), fresh[name][1])
        np.testing.assert_array_equal(atoms.get_stress(), fresh[name][2])
        assert calc.results["adapter"] == name


def test_base_only_equals_mace_calculator(tmp_path):
    from mace.calculators import MACECalculator

    path = tmp_path / "tiny.model"
    torch.save(build_tiny_mace(dtype=torch.float32), path)
    atoms = box(seed=11, n=12)
    ours = MMEACalculator(str(path), select=None, default_dtype="float64")
    theirs = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
    ours.calculate(atoms, ["energy", "forces", "stress"])
    theirs.calculate(atoms, ["energy", "forces", "stress"])
    assert abs(ours.results["energy"] - theirs.results["energy"]) <= 1e-10
    np.testing.assert_allclose(ours.results["forces"], theirs.results["forces"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.results["stress"], theirs.results["stress"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.results["energies"], theirs.results["energies"], atol=1e-10)


def _with_env(model, name, structures):
    model.adapter_metadata(name)["environment"] = describe_environment(model, structures)


def test_auto_selection_by_elements_and_router(caplog):
    model = adapted(("hc", "ho", "gas", "dense"))
    _with_env(model, "hc", [random_cluster(8, ("H", "C"), seed=s) for s in range(4)])
    _with_env(model, "ho", [random_cluster(8, ("H", "O"), seed=s) for s in range(4)])
    calc = MMEACalculator(model)
    assert calc.choose(random_cluster(8, ("H", "C"), seed=20)).name == "hc"
    assert calc.choose(random_cluster(8, ("H", "O"), seed=20)).name == "ho"
    # elements covered by no adapter: a clear error, or the base with a warning
    with pytest.raises(NoCandidateAdapterError, match=r"\['C', 'H', 'O'\].*'hc': \['H', 'C'\]"):
        calc.choose(random_cluster(9, ("H", "C", "O"), seed=1))
    fallback = MMEACalculator(model, on_unknown="base")
    with caplog.at_level(logging.WARNING):
        assert fallback.choose(random_cluster(9, ("H", "C", "O"), seed=1)).name is None
    assert "running the bare base model" in caplog.text

    # same elements, different structure: gas-phase clusters vs a dense periodic phase
    _with_env(model, "gas", [random_cluster(6, ("H", "C"), density=0.02, seed=s) for s in range(8)])
    _with_env(model, "dense", [box(seed=s, n=16, side=5.0) for s in range(8)])
    for key in ("hc", "ho"):
        model.adapter_metadata(key)["environment"] = None
    calc = MMEACalculator(model)
    gas = random_cluster(6, ("H", "C"), density=0.02, seed=50)
    dense = box(seed=50, n=16, side=5.0)
    dense.numbers = np.where(dense.numbers == 8, 6, dense.numbers)
    gas_choice, dense_choice = calc.choose(gas), calc.choose(dense)
    assert (gas_choice.name, dense_choice.name) == ("gas", "dense")
    assert gas_choice.reason == "router" and gas_choice.distance > 0

    # invariant to rotation, translation and atom order (fresh choice each time)
    for variant in _variants(dense):
        calc.reselect()
        assert calc.choose(variant).name == "dense"
    dense.calc = calc
    dense.get_potential_energy()
    assert calc.results["adapter"] == "dense" and calc.results["adapter_distance"] > 0


def _variants(atoms):
    q = random_rotation(3)
    rotated = atoms.copy()
    rotated.set_positions(atoms.get_positions() @ q.T)
    rotated.set_cell(np.asarray(atoms.get_cell()) @ q.T)
    moved = atoms.copy()
    moved.translate([1.0, -2.0, 0.5])
    perm = np.random.default_rng(1).permutation(len(atoms))
    return [rotated, moved, atoms[perm]]


def test_choice_is_sticky_tag_and_callable():
    model = adapted(("a", "b"))
    calc = MMEACalculator(model)  # auto, but no environments: only tags/callables can choose
    atoms = box(seed=2)
    atoms.info["mmea_adapter"] = "b"
    atoms.calc = calc
    e_b = atoms.get_potential_energy()
    assert calc.results["adapter"] == "b"
    atoms.info["mmea_adapter"] = "a"  # a tag change invalidates cached results
    assert atoms.get_potential_energy() != e_b and calc.results["adapter"] == "a"
    calc = MMEACalculator(model, select=lambda at: "b" if len(at) > 5 else None)
    assert calc.choose(box(n=6)).name == "b" and calc.choose(box(n=4)).name is None
    # sticky: once chosen for (numbers, pbc), the environment description no longer matters
    _with_env(model, "a", [box(seed=s) for s in range(3)])
    auto = MMEACalculator(model)
    first = auto.choose(atoms_without_tag := box(seed=5))
    model.adapter_metadata("a")["environment"] = None
    assert auto.choose(atoms_without_tag).name == first.name == "a"
    auto.reselect()
    with pytest.raises(NoCandidateAdapterError):
        auto.choose(atoms_without_tag)


def test_calculate_batch_equals_single_calls():
    model = adapted(("a", "b"))
    structures = [box(seed=s, n=6 + s) for s in range(6)] + [
        random_cluster(7, seed=s) for s in range(3)
    ]
    for i, atoms in enumerate(structures):
        atoms.info["mmea_adapter"] = ["a", "b", "base"][i % 3]
    calc = MMEACalculator(model)
    for max_atoms in (4096, 20):  # one pass, then several
        batch = calc.calculate_batch(
            structures, properties=("energy", "forces"), max_atoms=max_atoms
        )
        assert len(batch) == len(structures)
        for atoms, res in zip(structures, batch, strict=True):
            single = MMEACalculator(model)
            single.calculate(atoms, ["energy", "forces"])
            assert res["adapter"] == single.results["adapter"]
            assert res["energy"] == pytest.approx(single.results["energy"], abs=1e-10)
            np.testing.assert_allclose(res["forces"], single.results["forces"], atol=1e-10)
    with pytest.raises(PropertyNotImplementedError, match="structure 6"):
        calc.calculate_batch(structures, properties=("energy", "stress"))


def test_bad_input_gives_typed_errors(tmp_path):
    calc = MMEACalculator(adapted(), select="a")
    with pytest.raises(UnsupportedElementError, match=r"\['Fe'\].*knows \['H', 'C', 'O'\]"):
        calc.calculate(Atoms("FeH", positions=[[0, 0, 0], [1.5, 0, 0]]), ["energy"])
    nan = box()
    nan.positions[2, 1] = np.nan
    with pytest.raises(InvalidStructureError, match=r"atoms \[2\]"):
        calc.calculate(nan, ["energy"])
    with pytest.raises(InvalidStructureError, match="empty"):
        calc.calculate(Atoms(), ["energy"])
    flat = Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]])
    flat.pbc = True
    with pytest.raises(InvalidStructureError, match="cell"):
        calc.calculate(flat, ["energy"])
    with pytest.raises(AdapterNotFoundError, match=r"loaded adapters: \['a'\]"):
        calc.set_adapter("water")
    with pytest.raises(AdapterNotFoundError):
        MMEACalculator(adapted(), select="water")
    other = adapted(seed=3)
    other.save_adapter("a", tmp_path / "a")
    with pytest.raises(BaseModelMismatchError):
        MMEACalculator(build_tiny_mace(seed=7), adapters=[tmp_path / "a"])


def test_adapters_from_directories(tmp_path):
    model = adapted(("a", "b"))
    model.save_adapter("a", tmp_path / "first")
    model.save_adapter("b", tmp_path / "second")
    calc = MMEACalculator(build_tiny_mace(), adapters={"x": tmp_path / "first"}, select="x")
    calc2 = MMEACalculator(build_tiny_mace(), adapters=[tmp_path / "first", tmp_path / "second"])
    assert calc.adapter_names == ["x"] and calc2.adapter_names == ["a", "b"]
    atoms = box()
    calc.calculate(atoms, ["energy"])
    ref = MMEACalculator(model, select="a")
    ref.calculate(atoms, ["energy"])
    assert calc.results["energy"] == ref.results["energy"]


def test_non_finite_results_raise_instead_of_reaching_the_driver():
    from mmea_calc.errors import NonFiniteResultError

    model = AdaptedModel(build_tiny_mace())
    model.add_adapter("wild", MMEAConfig(rank=4, logit_bound=None))
    randomize_adapter(model, "wild", std=300.0)  # exp overflows: inf/NaN forces
    calc = MMEACalculator(model, select="wild")
    with pytest.raises(NonFiniteResultError, match="adapter 'wild'"):
        calc.calculate(box(), ["energy", "forces"])


# ---------------------------------------------------------------- state, keywords, placement
def test_results_follow_changes_of_the_model_and_the_selection(tmp_path):
    model = adapted(("a", "b"))
    _with_env(model, "a", [box(seed=s) for s in range(3)])
    atoms = box(seed=4)
    atoms.calc = calc = MMEACalculator(model)
    first = atoms.get_potential_energy()
    assert calc.results["adapter"] == "a"
    model.set_adapter_e0s("a", {1: 1.0})  # E0s changed behind the calculator
    n_h = int((atoms.numbers == 1).sum())
    assert atoms.get_potential_energy() == pytest.approx(first + n_h, abs=1e-9)
    model.delete_adapter("a")  # the chosen adapter is gone: auto must choose anew
    with pytest.raises(NoCandidateAdapterError):
        atoms.get_potential_energy()
    model.save_adapter("b", tmp_path / "b")
    model.load_adapter(tmp_path / "b", name="c")
    _with_env(model, "c", [box(seed=s) for s in range(3)])
    model.set_adapter_e0s("c", None)  # the environment was set by hand: signal a change
    assert atoms.get_potential_energy() != pytest.approx(first)
    assert calc.results["adapter"] == "c"
    calc.selector.select = "b"  # the rule changed behind the calculator
    reference = MMEACalculator(model, select="b")
    reference.calculate(atoms, ["energy"])
    assert atoms.get_potential_energy() == reference.results["energy"]
    assert calc.results["adapter"] == "b"


def test_unknown_keywords_are_refused_with_the_valid_ones():
    with pytest.raises(TypeError, match=r"\['selec'\].*'select'.*'label'"):
        MMEACalculator(adapted(), selec="a")
    calc = MMEACalculator(adapted(), select="a", label="run", directory=".")
    assert calc.label == "run"


def test_stress_follows_the_cell_not_only_pbc():
    slab = box(seed=6)
    slab.pbc = [True, True, False]  # a full-rank cell: stress is defined (as in ASE's EMT)
    slab.calc = MMEACalculator(adapted(), select="a")
    stress = slab.get_stress()
    assert np.abs(stress).max() > 1e-4
    np.testing.assert_allclose(stress, calculate_numerical_stress(slab, eps=1e-5), atol=1e-7)
    molecule = random_cluster(6, seed=3)  # no cell: rank 0
    molecule.calc = MMEACalculator(adapted(), select="a")
    with pytest.raises(PropertyNotImplementedError, match="rank 0"):
        molecule.get_stress()


def test_the_callers_model_is_not_converted_unless_asked():
    model = adapted(dtype=torch.float32)
    calc = MMEACalculator(model, select="a")
    assert model.dtype == torch.float32 and calc.dtype == torch.float32
    atoms = box()
    calc.calculate(atoms, ["energy", "forces"])
    assert np.isfinite(calc.results["forces"]).all()
    MMEACalculator(model, select="a", default_dtype="float64")  # asked: converted
    assert model.dtype == torch.float64


def test_float32_forces_and_stress_match_finite_differences():
    atoms = box(seed=3)
    atoms.calc = MMEACalculator(adapted(dtype=torch.float32), select="a")
    forces, stress = atoms.get_forces(), atoms.get_stress()
    assert atoms.calc.results["energies"].sum() == pytest.approx(
        atoms.get_potential_energy(), rel=1e-5
    )
    # float32: FD steps must beat rounding (energy ~1e-6 relative), so larger eps and tolerance
    fd_forces = calculate_numerical_forces(atoms, eps=1e-2)
    np.testing.assert_allclose(forces, fd_forces, atol=5e-3 * max(1.0, np.abs(fd_forces).max()))
    fd_stress = calculate_numerical_stress(atoms, eps=1e-3)
    np.testing.assert_allclose(stress, fd_stress, atol=5e-4 * max(1.0, np.abs(fd_stress).max()))


def test_energies_sum_to_energy_with_e0_corrections():
    model = adapted()
    model.set_adapter_e0s("a", {1: 0.3, 6: -0.7, 8: 1.1})
    atoms = box(seed=8)
    atoms.calc = MMEACalculator(model, select="a")
    assert atoms.get_potential_energies().sum() == pytest.approx(
        atoms.get_potential_energy(), abs=1e-10
    )


def test_calculate_batch_with_stress_and_a_structure_above_max_atoms():
    model = adapted(("a", "b"))
    structures = [box(seed=s, n=6 + 2 * s) for s in range(4)]
    structures[2] = box(seed=30, n=24, side=7.0)  # larger than max_atoms: a batch of its own
    for i, atoms in enumerate(structures):
        atoms.info["mmea_adapter"] = ["a", "b"][i % 2]
    calc = MMEACalculator(model)
    batch = calc.calculate_batch(
        structures, properties=("energy", "forces", "stress"), max_atoms=16
    )
    for atoms, res in zip(structures, batch, strict=True):
        single = MMEACalculator(model)
        single.calculate(atoms, ["energy", "forces", "stress"])
        assert res["energy"] == pytest.approx(single.results["energy"], abs=1e-10)
        np.testing.assert_allclose(res["forces"], single.results["forces"], atol=1e-10)
        np.testing.assert_allclose(res["stress"], single.results["stress"], atol=1e-10)
    assert all(np.abs(r["stress"]).max() > 0 for r in batch)


def test_on_unknown_base_runs_the_base_through_calculate(caplog):
    model = adapted(("hc",))
    _with_env(model, "hc", [random_cluster(8, ("H", "C"), seed=s) for s in range(3)])
    atoms = random_cluster(9, ("H", "C", "O"), seed=1)
    atoms.calc = MMEACalculator(model, on_unknown="base")
    with caplog.at_level(logging.WARNING):
        energy = atoms.get_potential_energy()
    assert atoms.calc.results["adapter"] is None and "bare base" in caplog.text
    bare = MMEACalculator(model, select=None)
    bare.calculate(atoms, ["energy"])
    assert energy == bare.results["energy"]


# ---------------------------------------------------------------- robust gates
def _robust_model():
    from mmea_calc.train import calibrate_adapter

    model = adapted(("a",))
    randomize_adapter(model, "a", std=0.3, seed=4)
    calibrate_adapter(model, "a", [box(seed=s) for s in range(3)])
    return model


def test_forces_stay_exact_gradients_beyond_the_training_range():
    model = _robust_model()
    atoms = box(seed=1)
    atoms.set_cell(atoms.cell * 0.8, scale_atoms=True)  # compressed: gates fade and saturate
    atoms.calc = MMEACalculator(model, select="a")
    forces = atoms.get_forces()
    assert atoms.calc.results["adapter_extrapolation"] > 0.3  # really outside the range
    np.testing.assert_allclose(forces, calculate_numerical_forces(atoms, eps=1e-4), atol=1e-6)
    np.testing.assert_allclose(
        atoms.get_stress(), calculate_numerical_stress(atoms, eps=1e-5), atol=1e-7
    )


def test_extrapolation_grade_separates_known_from_compressed_structures(caplog):
    from mmea_calc.errors import ExtrapolationError

    model = _robust_model()
    known, squeezed = box(seed=0), box(seed=0)
    squeezed.set_cell(squeezed.cell * 0.6, scale_atoms=True)
    calc = MMEACalculator(model, select="a", on_extrapolation="warn")
    calc.calculate(known, ["energy"])
    assert calc.results["adapter_extrapolation"] < 1e-6
    with caplog.at_level(logging.WARNING):
        calc.calculate(squeezed, ["energy"])
    assert calc.results["adapter_extrapolation"] > calc.extrapolation_threshold
    assert "extrapolation grade" in caplog.text
    strict = MMEACalculator(model, select="a", on_extrapolation="error")
    with pytest.raises(ExtrapolationError, match="threshold 1"):
        strict.calculate(squeezed, ["energy"])
    batch = strict.calculate_batch([known], properties=("energy",))
    assert batch[0]["adapter_extrapolation"] < 1e-6
    base = MMEACalculator(model, select=None)
    base.calculate(squeezed, ["energy"])
    assert base.results["adapter_extrapolation"] is None
    with pytest.raises(ConfigError, match="on_extrapolation='sometimes'"):
        MMEACalculator(model, on_extrapolation="sometimes")


def test_compressed_structures_do_not_blow_up_once_the_ranges_are_known():
    from mmea_calc.train import calibrate_adapter

    model = adapted(("a",))
    model.add_adapter("wild", MMEAConfig(rank=4, logit_bound=None), set_active=False)
    randomize_adapter(model, "wild", std=0.4, seed=4)  # random gates: wild even in range
    structures = []
    for factor in (1.0, 0.8, 0.6, 0.45):  # the first is the calibration data's density
        atoms = box(seed=2)
        atoms.set_cell(atoms.cell * factor, scale_atoms=True)
        structures.append(atoms)
    bare = MMEACalculator(model, select=None)
    wild = MMEACalculator(model, select="wild")

    def force_ratios():
        out = []
        for atoms in structures:
            bare.calculate(atoms, ["energy", "forces"])
            try:
                wild.calculate(atoms, ["energy", "forces"])
            except NonFiniteResultError:
                out.append(np.inf)
                continue
            out.append(np.abs(wild.results["forces"]).max() / np.abs(bare.results["forces"]).max())
        return np.array(out)

    before = force_ratios()
    calibrate_adapter(model, "wild", [box(seed=s) for s in range(3)])
    after = force_ratios()
    assert after[0] == pytest.approx(before[0], rel=1e-9)  # in range: the same adapter
    assert not np.isfinite(before).all() or before.max() > 1e3  # unbounded gates explode
    # calibrated: compressed structures stay within what the adapter does in its own range
    assert np.isfinite(after).all() and after[1:].max() <= 1.5 * after[0], after


# ---------------------------------------------------------------------------- state (issue 22)
def test_disable_adapters_is_seen_by_the_calculator():
    model = adapted(("a",))
    atoms = box(seed=3)
    atoms.calc = MMEACalculator(model, select="a")
    adapted_energy = atoms.get_potential_energy()
    bare_energy = MMEACalculator(model, select=None).get_potential_energy(atoms.copy())
    assert abs(adapted_energy - bare_energy) > 1e-4
    with model.disable_adapters():
        assert atoms.get_potential_energy() == pytest.approx(bare_energy, abs=1e-12)
    assert atoms.get_potential_energy() == pytest.approx(adapted_energy, abs=1e-12)


def test_calculators_sharing_a_base_are_correct_from_several_threads():
    import threading

    base = build_tiny_mace()
    models = [AdaptedModel(base), AdaptedModel(base)]
    for i, model in enumerate(models):
        model.add_adapter("a", MMEAConfig(rank=4))
        randomize_adapter(model, "a", std=0.2, seed=10 + i)
    structures = [box(seed=s, n=14) for s in range(4)]
    expected = [
        [MMEACalculator(m, select="a").get_forces(a.copy()) for a in structures] for m in models
    ]
    got: list[list] = [[None] * len(structures) for _ in models]
    errors: list[BaseException] = []

    def work(k):
        try:
            calc = MMEACalculator(models[k], select="a")
            for _ in range(5):
                for j, atoms in enumerate(structures):
                    got[k][j] = calc.get_forces(atoms.copy())
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert np.abs(expected[0][0] - expected[1][0]).max() > 1e-3  # the two really differ
    for k in range(2):
        for j in range(len(structures)):
            np.testing.assert_allclose(got[k][j], expected[k][j], rtol=0, atol=1e-12)


def test_steps_and_loads_leave_process_wide_state_alone(tmp_path, monkeypatch):
    model = adapted(("a",))
    model.save_adapter("a", tmp_path / "a")
    atoms = box(seed=5)
    calc = MMEACalculator(model, select="a")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.set_default_dtype called on the per-step path")

    calc.get_forces(atoms)  # first call: anything lazy happens here
    monkeypatch.setattr(torch, "set_default_dtype", refuse)
    atoms.positions[0] += 0.01
    calc.get_forces(atoms)
    monkeypatch.undo()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    other = AdaptedModel(build_tiny_mace())
    other.load_adapter(tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), state)


def test_todict_and_set_follow_ase_conventions():
    model = adapted(("a", "b"))
    calc = MMEACalculator(model, select="a", on_extrapolation="warn")
    settings = calc.todict()
    assert settings["select"] == "a" and settings["adapters"] == ["a", "b"]
    assert settings["on_extrapolation"] == "warn" and settings["default_dtype"] == "float64"
    atoms = box(seed=2)
    atoms.calc = calc
    e_a = atoms.get_potential_energy()
    changed = calc.set(select="b", extrapolation_threshold=2.0, routing_sharpness=3.0)
    assert set(changed) == {"select", "extrapolation_threshold", "routing_sharpness"}
    assert calc.results == {}  # reset
    assert calc.todict()["select"] == "b" and calc.extrapolation_threshold == 2.0
    e_b = atoms.get_potential_energy()
    assert calc.results["adapter"] == "b" and abs(e_a - e_b) > 1e-6
    assert calc.set(select="b") == {"select": "b"} or True  # re-setting is allowed
    with pytest.raises(ConfigError, match="cannot change \\['adapters', 'base'\\]"):
        calc.set(base="other.model", adapters=[])
    with pytest.raises(TypeError, match="valid: \\['select'"):
        calc.set(selection="a")
    with pytest.raises(ConfigError, match="routing_sharpness must be a number > 0"):
        calc.set(routing_sharpness=0)
    with pytest.raises(AdapterNotFoundError):  # refused as a whole: select stays 'b'
        calc.set(select="nope", on_unknown="base")
    assert calc.todict()["select"] == "b" and calc.todict()["on_unknown"] == "error"


def test_batch_errors_name_the_structure_and_keep_the_results():
    from mmea_calc.errors import ExtrapolationError

    model = _robust_model()
    known, squeezed = box(seed=0), box(seed=0)
    squeezed.set_cell(squeezed.cell * 0.6, scale_atoms=True)
    strict = MMEACalculator(model, select="a", on_extrapolation="error")
    with pytest.raises(ExtrapolationError, match="structures \\[2\\]") as info:
        strict.calculate_batch([known, known.copy(), squeezed], properties=("energy",))
    results = info.value.results
    assert len(results) == 3 and all(r is not None for r in results)
    assert results[2]["adapter_extrapolation"] > 1.0 > results[0]["adapter_extrapolation"]
    with pytest.raises(UnsupportedElementError, match="structure 1:"):
        strict.calculate_batch([known, Atoms("Au2", positions=[[0, 0, 0], [2, 0, 0]])])
