"""Multi-head bases (issue 22): one head per adapter, chosen as mace's calculator chooses it."""

from __future__ import annotations

import numpy as np
import pytest

from mmea_calc import AdaptedModel, MMEACalculator, MMEAConfig, TrainConfig, fit_adapter
from mmea_calc.errors import ConfigError, DataError
from mmea_calc.testing import build_tiny_mace, random_cluster, randomize_adapter

HEADS = ("pbe", "spice", "Default")


def _base(heads=HEADS):
    return build_tiny_mace(heads=heads)


def _labelled(n=6, seed=0):
    from ase.calculators.emt import EMT

    data = []
    for s in range(n):
        atoms = random_cluster(6, ("C", "O"), seed=seed + s)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        data.append(atoms)
    return data


@pytest.mark.parametrize("head", HEADS)
def test_bare_multi_head_base_equals_mace_calculator_on_every_head(head):
    from mace.calculators import MACECalculator

    base = _base()
    atoms = random_cluster(9, cell=6.0, seed=2)
    ours = MMEACalculator(base, head=head, select=None)
    mace_calc = MACECalculator(models=base, head=head, default_dtype="float64")
    atoms.calc = ours
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    atoms.calc = mace_calc
    assert energy == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(forces, atoms.get_forces(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(stress, atoms.get_stress(), rtol=0, atol=1e-10)


def test_heads_give_different_energies_and_default_head_is_found():
    base = _base()
    atoms = random_cluster(9, cell=6.0, seed=2)
    energies = {
        h: MMEACalculator(base, head=h, select=None).get_potential_energy(atoms) for h in HEADS
    }
    assert len({round(e, 6) for e in energies.values()}) == 3
    assert MMEACalculator(base).head == "Default"
    no_default = _base(("pbe", "spice"))
    with pytest.raises(ConfigError, match=r"several heads \['pbe', 'spice'\]"):
        MMEACalculator(no_default)
    with pytest.raises(ConfigError, match="head 'r2scan' is not a head"):
        MMEACalculator(no_default, head="r2scan")


def test_adapter_trains_serves_saves_and_freezes_on_its_head(tmp_path):
    base = _base()
    model = AdaptedModel(base)
    data = _labelled()
    config = TrainConfig(rank=2, epochs=2, head="spice", batch_size=3)
    result = fit_adapter(model, data, config=config, name="a", out_dir=tmp_path / "a")
    assert model.adapter_head("a") == "spice" and result.e0s
    # served on its head; refused on another
    atoms = data[0].copy()
    calc = MMEACalculator(model, select="a", head="spice")
    energy = calc.get_potential_energy(atoms)
    with pytest.raises(ConfigError, match="belong to heads \\['spice'\\], not to head 'pbe'"):
        MMEACalculator(model, select="a", head="pbe")
    # the E0 corrections act on its head only: the bare base on other heads is untouched
    bare = MMEACalculator(base, select=None, head="spice").get_potential_energy(atoms)
    assert abs(energy - bare) > 1e-6
    # saved and loaded with its head
    fresh = AdaptedModel(_base())
    assert fresh.adapter_head(fresh.load_adapter(tmp_path / "a")) == "spice"
    again = MMEACalculator(fresh, select="a", head="spice").get_potential_energy(atoms)
    assert again == pytest.approx(energy, abs=1e-10)
    # auto selection only sees adapters of the calculator's head
    auto = MMEACalculator(fresh, head="pbe", select="auto", on_unknown="base")
    assert auto.get_potential_energy(atoms) == pytest.approx(
        MMEACalculator(base, select=None, head="pbe").get_potential_energy(atoms), abs=1e-10
    )
    assert auto.results["adapter"] is None
    # frozen: the E0 corrections in the spice row only
    frozen = model.freeze("a")
    e0_frozen, e0_base = frozen.atomic_energies_fn.atomic_energies, base.atomic_energies_fn
    changed = (e0_frozen - e0_base.atomic_energies).abs().sum(dim=1) > 0
    assert changed.tolist() == [False, True, False]


def test_nodes_on_another_head_are_refused_in_the_forward_call():
    from mmea_calc.testing import evaluate

    model = AdaptedModel(_base())
    model.add_adapter("a", MMEAConfig(rank=2), head="pbe")
    randomize_adapter(model, "a")
    atoms = random_cluster(6, seed=1)
    evaluate(model, [atoms], head="pbe")
    with pytest.raises(ConfigError, match="belongs to head 'pbe' but serves nodes on heads"):
        evaluate(model, [atoms], head="spice")


def test_training_data_of_another_head_is_refused():
    data = _labelled(4)
    data[2].info["head"] = "pbe"
    with pytest.raises(DataError, match="structure 2 of the training data belongs to head 'pbe'"):
        fit_adapter(_base(), data, config=TrainConfig(rank=2, epochs=1, head="spice"))


def test_cli_info_lists_a_bases_heads(tmp_path, capsys):
    import torch

    from mmea_calc.cli import main

    torch.save(_base(), tmp_path / "multi.model")
    assert main(["info", str(tmp_path / "multi.model")]) == 0
    assert "pbe spice Default" in capsys.readouterr().out
