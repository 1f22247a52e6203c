"""The ``paper`` preset: the MMEA authors' extra trainable parts, held by the adapter."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from _synthetic import teacher_data

from mmea_calc import AdaptedModel, MMEAConfig, fingerprint
from mmea_calc._deps import LAMMPS_MACE, e3nn_jit
from mmea_calc.calculator import MMEACalculator
from mmea_calc.cli import main
from mmea_calc.data import atoms_to_graph, collate
from mmea_calc.errors import ConfigError
from mmea_calc.export import export_lammps
from mmea_calc.model import PER_ATOM_KEY
from mmea_calc.paper import PARTS
from mmea_calc.testing import (
    build_tiny_mace,
    evaluate,
    random_cluster,
    random_rotation,
    randomize_adapter,
)
from mmea_calc.train import TrainConfig, fit_adapter

RANK = 4


def box(seed=3):
    return random_cluster(12, cell=6.0, seed=seed)


def molecule(seed=2):
    return random_cluster(9, seed=seed, density=0.1)


def paper_model(base=None, seed=0):
    model = AdaptedModel(base if base is not None else build_tiny_mace())
    model.add_adapter("p", MMEAConfig(rank=RANK, preset="paper"))
    randomize_adapter(model, "p", std=0.05, seed=seed)
    return model


def outputs(model, atoms_list, adapters=None):
    out = evaluate(model, atoms_list, adapters=adapters, compute_stress=atoms_list[0].pbc.all())
    return {k: out[k].detach() for k in ("energy", "forces", "stress") if out.get(k) is not None}


def expected_counts(base, rank):
    """Scalars per part from MACE's layout, as the authors' code creates them."""
    counts = dict.fromkeys(PARTS, 0)
    for block in base.interactions:
        for param in block.conv_tp_weights.parameters():  # the radial MLP: A [in, r], B [r, out]
            counts["radial_lora"] += rank * (param.shape[0] + param.shape[1])
        for ins in block.skip_tp.instructions:  # per path: A [mul1 * mul2, r], B [r, mul_out]
            mul1, mul2, mul_out = ins.path_shape
            counts["skip_tp_lora"] += rank * (mul1 * mul2 + mul_out)
    for product in base.products:
        for contraction in product.symmetric_contractions.contractions:
            elements, params, channels = contraction.weights_max.shape
            counts["contraction_lora"] += elements * params * rank + rank * channels
            counts["contraction_weights"] += sum(w.numel() for w in contraction.weights)
    counts["bessel"] = base.radial_embedding.bessel_fn.bessel_weights.numel()
    return counts


def test_trainable_set_and_counts_per_part(tiny_base):
    model = AdaptedModel(tiny_base)
    model.add_adapter("p", MMEAConfig(rank=RANK, preset="paper"))
    model.add_adapter("g", MMEAConfig(rank=RANK), set_active=False)
    per_part = model.parameters_per_part("p")
    assert per_part == {"gates": model.num_trainable_parameters("g"), **expected_counts(
        tiny_base, RANK)}  # fmt: skip
    assert all(per_part[part] > 0 for part in PARTS)
    assert sum(per_part.values()) == model.num_trainable_parameters("p")
    assert model.parameters_per_part("g") == {"gates": model.num_trainable_parameters("g")}
    # the adapter's tensors are its own; the base's stay frozen (and Bessel stays a buffer)
    base_ids = {id(t) for t in [*tiny_base.parameters(), *tiny_base.buffers()]}
    tensors = dict(model.named_adapter_parameters("p"))
    assert not base_ids & {id(t) for t in tensors.values()}
    assert not any(p.requires_grad for p in tiny_base.parameters())
    assert any(k.startswith("radial_embedding.bessel_fn.bessel_weights.") for k in tensors)
    # lora_alpha scales the low-rank parts only
    assert MMEAConfig(rank=8).lora_scaling == 1.0
    assert MMEAConfig(rank=8, lora_alpha=2.0).lora_scaling == 0.25


def test_identity_at_init_and_every_part_changes_the_output(tiny_base):
    atoms = [box()]
    model = AdaptedModel(tiny_base)
    with model.disable_adapters():
        ref = outputs(model, atoms)
    model.add_adapter("p", MMEAConfig(rank=RANK, preset="paper"))
    got = outputs(model, atoms)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-12)
    specs = model.paper_parts["p"].specs
    for part in PARTS:  # each part alone moves the energy: all of them are wired in
        with torch.no_grad():
            for key, param in model.named_adapter_parameters("p"):
                owner = max((n for n in specs if key.startswith(n + ".")), key=len, default=None)
                on = owner is not None and specs[owner].part == part
                param.copy_(torch.full_like(param, 0.05) if on else torch.zeros_like(param))
        moved = outputs(model, atoms)["energy"]
        assert (moved - ref["energy"]).abs().item() > 1e-6, part


def test_randomised_paper_adapter_is_e3_equivariant(tiny_base):
    model = paper_model(tiny_base)
    atoms = box()
    ref = outputs(model, [atoms])
    for seed, inversion in [(0, False), (1, True)]:
        q = random_rotation(seed, inversion=inversion)
        moved = atoms.copy()
        moved.set_positions(atoms.get_positions() @ q.T)
        moved.set_cell(np.asarray(atoms.get_cell()) @ q.T)
        got = outputs(model, [moved])
        qt = torch.tensor(q)
        torch.testing.assert_close(got["energy"], ref["energy"], rtol=0, atol=1e-9)
        torch.testing.assert_close(got["forces"], ref["forces"] @ qt.T, rtol=0, atol=1e-9)
        stress = qt @ ref["stress"][0] @ qt.T
        torch.testing.assert_close(got["stress"][0], stress, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "pair", [("p", "q"), ("q", "p"), ("p", None), (None, "q"), ("g", "p"), ("p", "g")]
)
def test_mixed_batches_equal_separate_calls(pair):
    model = paper_model()
    model.add_adapter("q", MMEAConfig(rank=2, preset="paper", lora_alpha=4.0), set_active=False)
    randomize_adapter(model, "q", std=0.05, seed=7)
    model.add_adapter("g", MMEAConfig(rank=RANK), set_active=False)
    randomize_adapter(model, "g", std=0.05, seed=8)
    first, second = random_cluster(10, cell=5.5, seed=1), random_cluster(10, cell=6.0, seed=4)
    mixed = outputs(model, [first, second], adapters=list(pair))
    alone = [outputs(model, [a], adapters=[n]) for a, n in zip((first, second), pair, strict=True)]
    torch.testing.assert_close(mixed["energy"], torch.cat([o["energy"] for o in alone]))
    torch.testing.assert_close(mixed["forces"], torch.cat([o["forces"] for o in alone]))
    torch.testing.assert_close(mixed["stress"], torch.cat([o["stress"] for o in alone]))
    for atoms, name, out in zip(
        (first, second), pair, alone, strict=True
    ):  # the adapters really act
        if name is not None:
            assert (out["energy"] - outputs(model, [atoms], adapters=[None])["energy"]).abs() > 1e-6


def test_per_atom_routing_refuses_paper_adapters():
    model = paper_model()
    data = collate([atoms_to_graph(molecule(), model.base_info)], dtype=torch.float64)
    with pytest.raises(ConfigError, match="radial-MLP LoRA and Bessel frequencies act on edges"):
        model.route_per_atom(data, ["p"])
    data[PER_ATOM_KEY] = torch.tensor([0])  # set by hand: refused in the forward call too
    with pytest.raises(ConfigError, match=r"adapters \['p'\] \(preset 'paper'\)"):
        model(data)
    with pytest.raises(ConfigError, match="route them per structure"):
        MMEACalculator(model, select="per-atom")


@pytest.mark.filterwarnings("ignore::mmea_calc.errors.UncalibratedAdapterWarning")
def test_save_load_round_trip_and_info(tmp_path, capsys):
    model = paper_model()
    atoms = [box()]
    ref = outputs(model, atoms)
    model.save_adapter("p", tmp_path / "p")
    fresh = AdaptedModel(build_tiny_mace())
    name = fresh.load_adapter(tmp_path / "p")
    config = fresh.adapter_config(name)
    assert (config.preset, config.rank, config.lora_alpha) == ("paper", RANK, None)
    got = outputs(fresh, atoms)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-12)
    assert main(["info", str(tmp_path / "p"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "paper"
    assert info["trainable_parameters_per_part"] == model.parameters_per_part("p")
    assert info["trainable_parameters"] == model.num_trainable_parameters("p")
    # a gates-only file written before presets existed still loads as "gates"
    plain = AdaptedModel(build_tiny_mace())
    plain.add_adapter("g", MMEAConfig(rank=2))
    plain.save_adapter("g", tmp_path / "g")
    document = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    for key in ("preset", "lora_alpha", "paper_tensors"):
        document.pop(key)
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps(document))
    assert fresh.adapter_config(fresh.load_adapter(tmp_path / "g")).preset == "gates"


@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated")
def test_export_bakes_the_paper_parts_in(tmp_path):
    model = paper_model()
    atoms = box()
    calc = MMEACalculator(model, select="p")
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    frozen = model.freeze("p")
    got = outputs(frozen, [atoms])
    np.testing.assert_allclose(got["energy"].numpy()[0], energy, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got["forces"].numpy(), forces, rtol=0, atol=1e-10)
    with model.disable_adapters():  # the model's own base is untouched
        base_energy = outputs(model, [atoms])["energy"].item()
    assert abs(base_energy - energy) > 1e-6
    # the LAMMPS file (TorchScript, through mace's LAMMPS_MACE) gives the same energy
    export_lammps(model, "p", tmp_path / "p.pt")
    loaded = torch.jit.load(str(tmp_path / "p.pt"))
    assert isinstance(e3nn_jit.compile(LAMMPS_MACE(frozen)), torch.jit.ScriptModule)
    graph = collate([atoms_to_graph(atoms, model.base_info)], dtype=torch.float64)
    keys = ("batch", "cell", "edge_index", "node_attrs", "positions", "ptr", "shifts")
    data = {k: graph[k] for k in keys}
    data["unit_shifts"] = graph["unit_shifts"]
    data["cell"] = data["cell"].reshape(3, 3)  # pair_mace passes a [3, 3] cell
    out = loaded(data, torch.ones(len(atoms), dtype=torch.bool), True)
    np.testing.assert_allclose(out["total_energy_local"].item(), energy, rtol=0, atol=1e-8)
    np.testing.assert_allclose(out["forces"].detach().numpy(), forces, rtol=0, atol=1e-8)


def test_fit_trains_every_part_and_leaves_the_base_alone():
    data = teacher_data(n=16)
    model = AdaptedModel(build_tiny_mace())
    base_print = fingerprint(model.base_model)
    with_grad: set[str] = set()

    def callback(record, module):
        with_grad.update(n for n, p in module.named_parameters() if p.grad is not None)

    config = TrainConfig(rank=RANK, preset="paper", epochs=4, lr=1e-2, batch_size=4)
    result = fit_adapter(model, data[:12], data[12:], config, name="p", callback=callback)
    assert result.trainable_parameters == model.num_trainable_parameters("p")
    params = dict(model.named_parameters())
    assert sum(params[n].numel() for n in with_grad) == result.trainable_parameters
    trained_parts = {n.split(".")[3] for n in with_grad if n.startswith("paper_parts.p.updates.")}
    assert len(trained_parts) == len(model.paper_parts["p"].specs)  # every updated base tensor
    history = [r["valid"]["forces_mae_meV_per_A"] for r in result.history]
    assert history[-1] < history[0]
    assert fingerprint(model.base_model) == base_print
    # calibrated on its own training data: those structures are inside every range
    out = evaluate(model, data[:12], adapters=["p"] * 12)
    assert out["adapter_extrapolation"].max().item() < 1e-6


def test_cli_preset_and_lora_alpha(tmp_path, capsys):
    root = tmp_path
    torch.save(build_tiny_mace(), root / "base.model")
    data = teacher_data(n=12)
    ase.io.write(root / "train.xyz", data)
    common = ["finetune", "--base", str(root / "base.model"), "--train", str(root / "train.xyz")]
    common += ["--rank", "2", "--epochs", "1", "--batch-size", "6"]
    assert main([*common, "--out", str(root / "paper"), "--preset", "paper",
                 "--lora-alpha", "8"]) == 0  # fmt: skip
    assert main([*common, "--out", str(root / "lora"), "--method", "lora",
                 "--lora-alpha", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["info", str(root / "paper"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["preset"], info["lora_alpha"]) == ("paper", 8.0)
    assert set(info["trainable_parameters_per_part"]) == {"gates", *PARTS}
    assert sum(info["trainable_parameters_per_part"].values()) == info["trainable_parameters"]
    assert main(["info", str(root / "lora"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"], info["lora_alpha"]) == ("lora", 2.0)
    assert info["trainable_parameters_per_part"] == {"lora": info["trainable_parameters"]}
    assert main([*common, "--out", str(root / "bad"), "--method", "lora", "--preset",
                 "paper"]) != 0  # fmt: skip
    assert "preset 'paper' is for method 'mmea'" in capsys.readouterr().err
    assert main([*common, "--out", str(root / "bad"), "--lora-alpha", "4"]) != 0  # gates
    assert "lora_alpha applies to method 'lora' and preset 'paper'" in capsys.readouterr().err
    assert not (root / "bad").exists()
