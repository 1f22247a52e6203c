"""mmea_calc.torchsim: TorchSim's ModelInterface over adapters, against MMEACalculator.

These need torch-sim-atomistic >= 0.6 (Python >= 3.12): `.ci/run` runs this file in a 3.12
environment as well; in the 3.11 one only the import-error test runs.
"""

from __future__ import annotations

import importlib
import math
import sys

import ase.build
import ase.io
import numpy as np
import pytest
import torch

from mmea_calc import AdaptedModel, MMEACalculator, MMEAConfig
from mmea_calc.base_format import embedded_base_dir
from mmea_calc.errors import ConfigError, NonFiniteResultError, UnsupportedElementError
from mmea_calc.testing import build_tiny_mace, randomize_adapter

try:
    import torch_sim as ts
except ImportError:
    ts = None
HAVE_TORCHSIM = ts is not None and hasattr(ts, "Integrator")
needs_torchsim = pytest.mark.skipif(
    not HAVE_TORCHSIM,
    reason="torch-sim-atomistic >= 0.6 not installed (Python >= 3.12; .ci/run runs these in a "
    "3.12 environment)",
)
if HAVE_TORCHSIM:
    from mace.calculators.mace_torchsim import MaceTorchSimModel

    from mmea_calc.torchsim import PER_ATOM_INDEX, TAG_EXTRA, MMEAModel

DATA = embedded_base_dir().parent / "data"
E_TOL, F_TOL, S_TOL = 1e-9, 1e-8, 1e-10  # eV, eV/Å, eV/Å^3 (float64)


def test_import_names_the_requirement():
    if HAVE_TORCHSIM:
        pytest.skip("torch-sim-atomistic >= 0.6 is installed: the module imports")
    sys.modules.pop("mmea_calc.torchsim", None)
    with pytest.raises(ImportError, match=r"torch-sim-atomistic >= 0\.6.*Python >= 3\.12"):
        importlib.import_module("mmea_calc.torchsim")


@pytest.fixture(scope="module")
def adapted():
    """The embedded base with its calibrated water and aspirin adapters (float64)."""
    from mmea_calc.serving import served_model

    return served_model("embedded", "embedded")


def _systems() -> list[ase.Atoms]:
    """Two 96-atom water boxes and two aspirin frames in 20 Å periodic boxes, interleaved
    (TorchSim's pbc is one setting for the whole state)."""
    water = ase.io.read(DATA / "water_test.xyz", ":2")
    aspirin = ase.io.read(DATA / "aspirin_test.xyz", ":2")
    for atoms in aspirin:
        atoms.cell = [20.0, 20.0, 20.0]
        atoms.pbc = True
        atoms.center()
    return [water[0], aspirin[0], water[1], aspirin[1]]


def _reference(calc: MMEACalculator, systems: list[ase.Atoms]) -> list[dict]:
    results = []
    for atoms in systems:
        atoms = atoms.copy()
        atoms.calc = calc
        results.append(
            {
                "energy": atoms.get_potential_energy(),
                "forces": atoms.get_forces(),
                "stress": atoms.get_stress(voigt=False),
                "adapter": calc.results["adapter"],
                "grade": calc.results["adapter_extrapolation"],
                "distance": calc.results["adapter_distance"],
            }
        )
    return results


def _compare(
    out: dict, systems: list[ase.Atoms], reference: list[dict], model=None, check_distance=True
) -> None:
    """``check_distance=False``: the router's score is remembered per composition from the first
    structure of it seen, which another order changes (the choice it led to stays)."""
    ptr = np.cumsum([0] + [len(a) for a in systems])
    served = model.served(out) if model is not None else None
    for i, ref in enumerate(reference):
        assert abs(out["energy"][i].item() - ref["energy"]) < E_TOL
        forces = out["forces"][ptr[i] : ptr[i + 1]].numpy()
        assert np.abs(forces - ref["forces"]).max() < F_TOL
        assert np.abs(out["stress"][i].numpy() - ref["stress"]).max() < S_TOL
        if served is not None:
            assert served[i] == ref["adapter"]
        grade = out["adapter_extrapolation"][i].item()
        if ref["grade"] is None:
            assert math.isnan(grade)
        else:
            assert grade == pytest.approx(ref["grade"], rel=1e-9, abs=1e-12)
        distance = out["adapter_distance"][i].item() if check_distance else ref["distance"]
        if ref["distance"] is None:
            assert math.isnan(distance)
        else:
            assert distance == pytest.approx(ref["distance"], rel=1e-9)


@needs_torchsim
def test_auto_matches_calculator_whatever_the_grouping(adapted):
    """Every system equals MMEACalculator (energy 1e-9 eV, forces 1e-8 eV/Å, stress, adapter,
    grade, router distance) in one batch, in reverse order and one at a time."""
    systems = _systems()
    reference = _reference(MMEACalculator(adapted), systems)
    assert [r["adapter"] for r in reference] == ["water", "aspirin", "water", "aspirin"]
    model = MMEAModel(adapted, select="auto")
    out = model(ts.io.atoms_to_state(systems, dtype=model.dtype))
    _compare(out, systems, reference, model)
    assert out["adapter_index"].tolist() == [1, 0, 1, 0]  # positions in model.adapter_names
    order = [3, 2, 1, 0]
    fresh = MMEAModel(adapted, select="auto")  # nothing remembered from the first grouping
    out = fresh(ts.io.atoms_to_state([systems[i] for i in order], dtype=fresh.dtype))
    _compare(out, [systems[i] for i in order], [reference[i] for i in order], fresh, False)
    single = MMEAModel(adapted, select="auto")
    for i in (2, 1):
        out = single(ts.io.atoms_to_state([systems[i]], dtype=single.dtype))
        _compare(out, [systems[i]], [reference[i]], single, False)


@needs_torchsim
def test_select_name_base_list_callable(adapted):
    systems = _systems()
    for select in ("water", None, "base"):
        reference = _reference(MMEACalculator(adapted, select=select), systems)
        model = MMEAModel(adapted, select=select)
        out = model(ts.io.atoms_to_state(systems, dtype=model.dtype))
        _compare(out, systems, reference, model)
    names = ["water", None, "aspirin", "water"]
    listed = MMEAModel(adapted, select=names)
    out = listed(ts.io.atoms_to_state(systems, dtype=listed.dtype))
    assert listed.served(out) == names
    ptr = np.cumsum([0] + [len(a) for a in systems])
    for i, name in enumerate(names):
        ref = _reference(MMEACalculator(adapted, select=name), [systems[i]])[0]
        assert abs(out["energy"][i].item() - ref["energy"]) < E_TOL
        forces = out["forces"][ptr[i] : ptr[i + 1]].numpy()
        assert np.abs(forces - ref["forces"]).max() < F_TOL
    with pytest.raises(ConfigError, match=r"4 systems.*model\.tag\(state, names\)"):
        MMEAModel(adapted, select=names[:2] + names)(ts.io.atoms_to_state(systems))
    with pytest.raises(Exception, match="no adapter named 'ice'"):
        MMEAModel(adapted, select=["water", "ice"])
    asked = []

    def by_size(atoms):
        asked.append(len(atoms))
        return "water" if len(atoms) > 50 else None

    model = MMEAModel(adapted, select=by_size)
    state = ts.io.atoms_to_state(systems, dtype=model.dtype)
    assert model.served(model(state)) == ["water", None, "water", None]
    model(state)
    assert asked == [96, 21]  # once per composition, then kept


@needs_torchsim
def test_tags_travel_with_their_systems(adapted):
    """A tagged state's systems keep their adapters through split and concatenation in another
    order (what the autobatchers and ts.optimize's swaps do); tags win over ``select``."""
    systems = _systems()
    model = MMEAModel(adapted, select="auto")
    state = model.tag(
        ts.io.atoms_to_state(systems, dtype=model.dtype), [None, "water", "aspirin", "base"]
    )
    assert model.served(model(state)) == [None, "water", "aspirin", None]
    parts = state.split()
    regrouped = ts.concatenate_states([parts[2], parts[0], parts[1]])
    out = model(regrouped)
    assert model.served(out) == ["aspirin", None, "water"]
    reference = _reference(MMEACalculator(adapted, select="water"), [systems[1]])
    start = len(systems[2]) + len(systems[0])
    assert abs(out["energy"][2].item() - reference[0]["energy"]) < E_TOL
    assert np.abs(out["forces"][start:].numpy() - reference[0]["forces"]).max() < F_TOL
    with pytest.raises(ConfigError, match="one adapter name per system"):
        model.tag(state, ["water"])
    state.system_extras[TAG_EXTRA] = torch.tensor([0, 1, 7, -1])
    with pytest.raises(ConfigError, match=r"system 2.*holds 7"):
        model(state)


@needs_torchsim
def test_per_atom_matches_calculator(adapted):
    systems = _systems()[:2]
    reference = _reference(MMEACalculator(adapted, select="per-atom"), systems)
    model = MMEAModel(adapted, select="per-atom")
    out = model(ts.io.atoms_to_state(systems, dtype=model.dtype))
    _compare(out, systems, reference)
    assert out["adapter_index"].tolist() == [PER_ATOM_INDEX] * 2
    assert model.served(out) == ["per-atom"] * 2
    weights = out["adapter_weights"]
    assert weights.shape == (96 + 21, 2)
    assert torch.allclose(weights.sum(dim=1), torch.ones(117, dtype=weights.dtype))
    assert weights[:96, 1].mean() > 0.5 and weights[96:, 0].mean() > 0.5  # water / aspirin


@needs_torchsim
def test_float32_matches_calculator_in_float32():
    systems = _systems()
    calc = MMEACalculator("embedded", "embedded", default_dtype="float32")
    reference = _reference(calc, systems)
    model = MMEAModel("embedded", "embedded", dtype="float32")
    assert model.dtype == torch.float32
    out = model(ts.io.atoms_to_state(systems, dtype=model.dtype))
    assert out["energy"].dtype == torch.float32
    ptr = np.cumsum([0] + [len(a) for a in systems])
    assert model.served(out) == [r["adapter"] for r in reference]
    for i, ref in enumerate(reference):
        assert abs(out["energy"][i].item() - ref["energy"]) < 2e-3 * len(systems[i]) ** 0.5
        forces = out["forces"][ptr[i] : ptr[i + 1]].double().numpy()
        assert np.abs(forces - ref["forces"]).max() < 1e-4
    with pytest.raises(ConfigError, match=r"build states with dtype=model\.dtype"):
        model(ts.io.atoms_to_state(systems, dtype=torch.float64))
    model.double()  # .to()/.double() follow: dtype, device and per-composition tensors
    assert model.dtype == torch.float64
    out64 = model(ts.io.atoms_to_state(systems, dtype=torch.float64))
    assert out64["energy"].dtype == torch.float64
    assert abs(out64["energy"][0].item() - reference[0]["energy"]) < 2e-3 * len(systems[0]) ** 0.5
    model.float()
    final = ts.integrate(system=systems[:2], model=model, integrator=ts.Integrator.nvt_langevin,
                         n_steps=3, temperature=300.0, timestep=0.0005)  # fmt: skip
    assert final.positions.dtype == torch.float32 and torch.isfinite(final.positions).all()


@needs_torchsim
def test_integrate_and_optimize_with_autobatching_and_reporter(adapted, tmp_path):
    """NVE conserves energy; autobatched NVE (batches regrouped) gives the same trajectories;
    NVT Langevin and NPT run; FIRE with a cell filter lowers energies; the reporter writes the
    per-system adapter report."""
    systems = _systems()
    model = MMEAModel(adapted, select="auto")
    state = ts.io.atoms_to_state(systems, dtype=model.dtype)
    # from rest (TorchSim draws initial momenta per batch: another grouping, other draws)
    kwargs = {"n_steps": 8, "temperature": 0.0, "timestep": 0.0005}
    nve = ts.integrate(system=state, model=model, integrator=ts.Integrator.nve, **kwargs)
    assert model.served(nve.adapter_index) == ["water", "aspirin", "water", "aspirin"]
    batcher = ts.BinningAutoBatcher(model, max_memory_scaler=1.0, memory_scales_with="n_atoms")
    batcher.max_memory_scaler = 120  # at most one water box + one aspirin per batch
    batched = ts.integrate(system=state, model=model, integrator=ts.Integrator.nve,
                           autobatcher=batcher, **kwargs)  # fmt: skip
    assert torch.allclose(batched.positions, nve.positions, atol=1e-10, rtol=0)
    assert model.served(batched.adapter_index) == model.served(nve.adapter_index)
    for integrator, extra in (
        (ts.Integrator.nvt_langevin, {}),
        (ts.Integrator.npt_langevin_isotropic, {"external_pressure": 0.0}),
    ):
        final = ts.integrate(system=state, model=model, integrator=integrator, n_steps=4,
                             temperature=300.0, timestep=0.0005, **extra)  # fmt: skip
        assert torch.isfinite(final.positions).all()
    # FIRE with a cell filter on the two water boxes, autobatched in flight, with a reporter
    water = ts.io.atoms_to_state([systems[0], systems[2]], dtype=model.dtype)
    before = model(water)["energy"]
    files = [tmp_path / f"relax_{i}.h5" for i in range(2)]
    reporter = ts.TrajectoryReporter(
        files,
        state_frequency=2,
        prop_calculators={2: {"grade": lambda state, _: state.adapter_extrapolation}},
    )
    relaxed = ts.optimize(
        system=water,
        model=model,
        optimizer=ts.Optimizer.fire,
        init_kwargs={"cell_filter": ts.CellFilter.frechet},
        max_steps=10,
        autobatcher=ts.InFlightAutoBatcher(model, max_memory_scaler=200,
                                           memory_scales_with="n_atoms"),
        trajectory_reporter=reporter,
    )  # fmt: skip
    after = model(relaxed)["energy"]
    assert (after < before).all()
    for path in files:
        with ts.TorchSimTrajectory(path, mode="r") as trajectory:
            grades = trajectory.get_array("grade")
            assert grades.shape[0] >= 2 and np.isfinite(grades).all()


@needs_torchsim
def test_mace_torchsim_model_serves_the_frozen_adapter_and_refuses_the_adapted_model(adapted):
    """mace's own TorchSim model never runs the bare base in an adapter's place: given an
    AdaptedModel it is refused (also when asked for cuEquivariance); given the frozen adapter
    (AdaptedModel.freeze) it serves that adapter, equal to MMEAModel."""
    systems = _systems()
    state = ts.io.atoms_to_state(systems, dtype=torch.float64)
    ours = MMEAModel(adapted, select="water")(state)
    mace_model = MaceTorchSimModel(adapted.freeze("water"), dtype=torch.float64)
    theirs = mace_model(state)
    assert torch.allclose(theirs["energy"], ours["energy"], atol=E_TOL, rtol=0)
    assert torch.allclose(theirs["forces"], ours["forces"], atol=F_TOL, rtol=0)
    assert torch.allclose(theirs["stress"], ours["stress"], atol=S_TOL, rtol=0)
    copy = AdaptedModel(build_tiny_mace())
    copy.add_adapter("a", MMEAConfig(rank=2))
    with pytest.raises(AttributeError, match=r"not a MACE module.*MMEAModel"):
        MaceTorchSimModel(copy, dtype=torch.float64)
    with pytest.raises((AttributeError, KeyError, ImportError, RuntimeError)):
        MaceTorchSimModel(copy, dtype=torch.float64, enable_cueq=True)


@needs_torchsim
def test_follows_torchsim_interface_and_model_changes():
    """TorchSim's own conformance check (Si, Mg, Fe systems); results follow adapters' E0
    corrections and newly loaded adapters (the per-composition cache is keyed on revisions)."""
    from torch_sim.models.interface import validate_model_outputs

    base = build_tiny_mace(atomic_numbers=(1, 6, 12, 14, 26), r_max=4.0)
    adapted = AdaptedModel(base)
    adapted.add_adapter("metal", MMEAConfig(rank=2))
    randomize_adapter(adapted, "metal", std=0.05)
    model = MMEAModel(adapted, select="metal")
    validate_model_outputs(model, torch.device("cpu"), torch.float64)
    state = ts.io.atoms_to_state([ase.build.bulk("Fe", "bcc", a=2.87)], dtype=torch.float64)
    first = model(state)["energy"].item()
    adapted.set_adapter_e0s("metal", {26: 0.5})
    assert model(state)["energy"].item() == pytest.approx(first + 0.5, abs=1e-12)
    with pytest.raises(UnsupportedElementError, match="not known to the base"):
        model(ts.io.atoms_to_state([ase.build.molecule("H2O")], dtype=torch.float64))


@needs_torchsim
def test_heads_of_a_multi_head_base():
    """Each head serves as MMEACalculator(head=...) does; a name or list from another head is
    refused."""
    adapted = AdaptedModel(build_tiny_mace(heads=["dft", "xtb"]))
    adapted.add_adapter("x", MMEAConfig(rank=2), head="xtb")
    randomize_adapter(adapted, "x", std=0.05)
    atoms = ase.build.molecule("CH3OH")
    atoms.cell, atoms.pbc = [9.0, 9.0, 9.0], True
    for head, select in (("dft", None), ("xtb", None), ("xtb", "x")):
        reference = _reference(MMEACalculator(adapted, select=select, head=head), [atoms])
        model = MMEAModel(adapted, select=select, head=head)
        _compare(model(ts.io.atoms_to_state([atoms], dtype=torch.float64)), [atoms], reference)
    with pytest.raises(ConfigError, match="head"):
        MMEAModel(adapted, select=["x"], head="dft")


@needs_torchsim
def test_non_finite_results_are_refused(adapted):
    systems = _systems()[:2]
    systems[1] = systems[1].copy()
    systems[1].positions[1] = systems[1].positions[0]  # two atoms on one spot
    model = MMEAModel(adapted, select="auto", compute_stress=False)
    with pytest.raises(NonFiniteResultError, match=r"systems \[1\] \(adapters \['aspirin'\]\)"):
        model(ts.io.atoms_to_state(systems, dtype=model.dtype))
    # with stress, the NaN also reaches the other systems' forces (mace's stress path;
    # MMEACalculator.calculate_batch sees the same): every bad system is named
    model = MMEAModel(adapted, select="auto")
    with pytest.raises(NonFiniteResultError, match=r"systems \[0, 1\]"):
        model(ts.io.atoms_to_state(systems, dtype=model.dtype))
