from __future__ import annotations

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from mmea_calc.data import (
    LABEL_KEYS,
    DataKeys,
    data_hash,
    fit_e0_correction,
    label_structures,
    labelled_graphs,
    read_structures,
    reference_values,
    split_structures,
)
from mmea_calc.errors import DataError, UnsupportedElementError
from mmea_calc.testing import random_cluster

INFO = {"atomic_numbers": [1, 6, 8], "r_max": 4.0, "heads": ["Default"]}


def _structures(n=4, **kw):
    out = []
    for s in range(n):
        atoms = random_cluster(5, seed=s, **kw)
        atoms.info["REF_energy"] = -1.5 * s
        atoms.arrays["REF_forces"] = np.full((5, 3), 0.1 * s)
        out.append(atoms)
    return out


def test_plain_keys_are_read_from_atoms_calc(tmp_path):
    # ASE >= 3.23 puts plain energy/forces/stress of an extxyz file on atoms.calc
    atoms = random_cluster(4, cell=5.0, seed=1)
    stress = np.array([1.0, 2.0, 3.0, 0.4, 0.5, 0.6])
    forces = np.arange(12.0).reshape(4, 3)
    atoms.calc = SinglePointCalculator(atoms, energy=-3.25, forces=forces, stress=stress)
    ase.io.write(tmp_path / "plain.xyz", [atoms])
    (read,) = read_structures(tmp_path / "plain.xyz")  # default REF_* keys fall back
    assert read.info[LABEL_KEYS["energy"]] == -3.25
    assert np.allclose(read.arrays[LABEL_KEYS["forces"]], forces)
    voigt = read.info[LABEL_KEYS["stress"]]
    assert np.allclose(voigt, [[1.0, 0.6, 0.5], [0.6, 2.0, 0.4], [0.5, 0.4, 3.0]])
    (same,) = read_structures(tmp_path / "plain.xyz", DataKeys("energy", "forces", "stress"))
    assert same.info[LABEL_KEYS["energy"]] == -3.25
    # a custom key that is absent is an error, never a silent fallback to atoms.calc
    with pytest.raises(DataError, match="no energy under key 'DFT_energy'"):
        read_structures(tmp_path / "plain.xyz", DataKeys(energy="DFT_energy"))


def test_custom_keys_and_graph_labels():
    structures = _structures()
    for atoms in structures:
        atoms.info["E_dft"] = atoms.info.pop("REF_energy") + 1.0
        atoms.arrays["F_dft"] = atoms.arrays.pop("REF_forces") * 2
    labelled = label_structures(structures, DataKeys(energy="E_dft", forces="F_dft"))
    ref = reference_values(labelled)
    assert np.allclose(ref["energy"], [1.0, -0.5, -2.0, -3.5])
    assert ref["forces"].shape == (20, 3) and not ref["stress_mask"].any()
    graph = labelled_graphs(labelled, INFO)[3]
    assert float(graph.energy) == pytest.approx(-3.5)
    assert np.allclose(graph.forces.numpy(), 0.6)
    assert float(graph.stress_weight) == 0.0  # no stress: it does not enter the loss


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda a: a.arrays.pop("REF_forces"), DataError, "no forces under key 'REF_forces'"),
        (lambda a: a.info.pop("REF_energy"), DataError, "no energy"),
        (lambda a: a.info.update(REF_energy=float("nan")), DataError, "NaN"),
        (lambda a: a.set_atomic_numbers([14] * 5), UnsupportedElementError, r"\['Si'\]"),
    ],
    ids=["no-forces", "no-energy", "nan", "unknown-element"],
)
def test_bad_structures_are_named(damage, error, match):
    structures = _structures()
    damage(structures[2])
    with pytest.raises(error, match=match) as info:
        label_structures(structures, atomic_numbers=[1, 6, 8])
    assert "structure 2" in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_structures(tmp_path / "missing.xyz")
    (tmp_path / "empty.xyz").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_structures(tmp_path / "empty.xyz")
    (tmp_path / "junk.xyz").write_text("not\nan xyz file\n")
    with pytest.raises(DataError, match="could not read"):
        read_structures(tmp_path / "junk.xyz")
    with pytest.raises(DataError, match="no structures"):
        label_structures([])


def test_split_is_seeded_disjoint_and_complete():
    labelled = label_structures(_structures(10))
    train, valid = split_structures(labelled, 0.3, seed=4)
    again, _ = split_structures(labelled, 0.3, seed=4)
    other, _ = split_structures(labelled, 0.3, seed=5)
    ids = {id(a) for a in train} | {id(a) for a in valid}
    assert len(valid) == 3 and len(train) == 7 and len(ids) == 10
    assert [id(a) for a in again] == [id(a) for a in train]
    assert [id(a) for a in other] != [id(a) for a in train]
    with pytest.raises(DataError, match="at least 2"):
        split_structures(labelled[:1])


def test_data_hash_follows_positions_and_labels():
    labelled = label_structures(_structures())
    digest = data_hash(labelled)
    assert digest == data_hash(label_structures(_structures()))
    labelled[1].arrays[LABEL_KEYS["forces"]][0, 0] += 1e-9
    assert data_hash(labelled) != digest


def test_e0_fit_recovers_per_element_energies():
    rng = np.random.default_rng(0)
    true = {1: -0.3, 6: 1.2, 8: 0.45}
    molecules = [ase.Atoms(f) for f in ["H2O", "CH4", "CO2", "C2H6O", "H2O2", "CH2O"]]
    residual = [sum(true[z] for z in m.numbers) + rng.normal(0, 1e-6) for m in molecules]
    fitted = fit_e0_correction(molecules, residual, ridge=1e-10)
    assert fitted == pytest.approx(true, abs=1e-4)


def test_e0_fit_of_one_composition_is_finite_and_absorbs_the_offset():
    molecules = [ase.Atoms("C9H8O4")] * 5  # aspirin, every frame the same composition
    offset = 0.0189 * 21  # 18.9 meV/atom
    fitted = fit_e0_correction(molecules, [offset] * 5)
    assert all(np.isfinite(v) for v in fitted.values())
    absorbed = 9 * fitted[6] + 8 * fitted[1] + 4 * fitted[8]
    assert absorbed == pytest.approx(offset, rel=1e-3)  # the ridge leaves < 0.1 % behind
    # shared in proportion to the counts (the minimum-norm answer), not dumped on one element
    assert fitted[6] / fitted[8] == pytest.approx(9 / 4, rel=1e-6)


# ---------------------------------------------------------------------------- fidelity (issue 22)
def _labelled_box(seed=0, **info):
    atoms = random_cluster(8, cell=6.0, seed=seed)
    atoms.info["REF_energy"] = -3.0
    atoms.arrays["REF_forces"] = np.zeros((8, 3))
    atoms.info.update(info)
    return atoms


def test_mace_loss_weights_are_kept_and_reach_the_graphs():
    atoms = _labelled_box(config_weight=0.5, config_forces_weight=2.0, config_energy_weight=0)
    (copy,) = label_structures([atoms])
    assert copy.info["config_weight"] == 0.5 and copy.info["config_energy_weight"] == 0.0
    (graph,) = labelled_graphs([copy], INFO)
    assert float(graph.weight) == 0.5 and float(graph.forces_weight) == 2.0
    assert float(graph.energy_weight) == 0.0 and float(graph.stress_weight) == 0.0  # no stress
    assert LABEL_KEYS["stress"] not in copy.info
    plain = label_structures([_labelled_box()])
    assert data_hash(plain) != data_hash([copy])  # weights change the run: resume sees it
    with pytest.raises(DataError, match="config_weight must be a number >= 0"):
        label_structures([_labelled_box(config_weight=-1)])


def test_virials_become_a_stress_as_mace_defines_them():
    virials = np.array([[1.0, 0.1, 0.0], [0.1, 2.0, 0.0], [0.0, 0.0, 3.0]])
    atoms = _labelled_box(REF_virials=virials, config_virials_weight=3.0)
    (copy,) = label_structures([atoms])
    np.testing.assert_allclose(copy.info[LABEL_KEYS["stress"]], -virials / atoms.get_volume())
    assert copy.info["config_stress_weight"] == 3.0
    molecule = _labelled_box(REF_virials=virials)
    molecule.pbc, molecule.cell = False, np.zeros((3, 3))
    with pytest.raises(DataError, match=r"virials .* need a 3-D cell"):
        label_structures([molecule])


def test_structures_of_another_head_are_refused():
    assert len(label_structures([_labelled_box(head="Default")], head="Default")) == 1
    with pytest.raises(DataError, match="structure 0 of dataset belongs to head 'pt_head'"):
        label_structures([_labelled_box(head="pt_head")], head="Default")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_one_graph_is_collated_as_torch_geometric_does(dtype):
    """collate([graph]) (every calculator step) skips torch_geometric's bookkeeping: it must
    give exactly what torch_geometric gives, key for key, and copies only."""
    import torch

    from mmea_calc._deps import torch_geometric
    from mmea_calc.data import _collate_one, atoms_to_graph, collate

    dtype = getattr(torch, dtype)
    labelled = label_structures(_structures(1))[0]
    info = {**INFO, "heads": ["pbe", "Default"]}
    for atoms in (labelled, random_cluster(7, seed=4)):
        for head in (None, "pbe"):
            graph = atoms_to_graph(atoms, info, head=head)
            assert _collate_one(graph, dtype, "cpu") is not None  # the direct path ran
            got = collate([graph], dtype=dtype)
            want = torch_geometric.Batch.from_data_list([graph]).to_dict()
            want = {k: v.to(dtype=dtype) if v.is_floating_point() else v for k, v in want.items()}
            assert list(got) == list(want)
            for key, value in want.items():
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
            for key, value in got.items():  # nothing aliases the graph
                if key in graph and torch.is_tensor(graph[key]) and graph[key].numel():
                    assert value.data_ptr() != graph[key].data_ptr(), key
    periodic = random_cluster(6, seed=5)
    periodic.set_cell([7.0, 7.5, 8.0])
    periodic.pbc = True
    graph = atoms_to_graph(periodic, INFO)
    got = collate([graph], dtype=dtype)
    want = collate([graph, graph], dtype=dtype)  # the general path, first graph's rows
    n, e = len(periodic), graph.edge_index.shape[1]
    for key in ("positions", "node_attrs", "shifts", "unit_shifts", "cell", "energy", "head"):
        rows = {"shifts": e, "unit_shifts": e, "cell": 3, "energy": 1, "head": 1}.get(key, n)
        assert torch.equal(got[key], want[key][:rows]), key
    assert torch.equal(got["edge_index"], want["edge_index"][:, :e])
    assert got["ptr"].tolist() == [0, n] and got["batch"].tolist() == [0] * n
