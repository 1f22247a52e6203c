"""Every interaction block mace-torch ships, and the readout/embedding options foundation models
use: adapters go on node-wise linears only, start as the identity, keep E(3) equivariance, train,
serve, freeze and export. Anything else is refused when the adapter is added."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from mmea_calc import AdaptedModel, MMEAConfig
from mmea_calc._deps import LAMMPS_MACE, e3nn_jit, lora, mace, o3
from mmea_calc.calculator import MMEACalculator
from mmea_calc.data import atoms_to_graph, collate
from mmea_calc.errors import TargetError
from mmea_calc.export import export_mliap
from mmea_calc.mace_model import node_wise_linears
from mmea_calc.testing import (
    build_mace_variant,
    build_tiny_mace,
    evaluate,
    mliap_batch,
    pair_mace_inputs,
    random_cluster,
    random_rotation,
    randomize_adapter,
)
from mmea_calc.train import TrainConfig, fit_adapter

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated")

#: one small model per block / option (arguments of build_mace_variant)
VARIANTS = {name: {"interaction": name} for name in mace.modules.interaction_classes}
VARIANTS.update(
    {
        "first-RealAgnosticInteractionBlock": {"interaction_first": "RealAgnosticInteractionBlock"},
        "NonLinearBiasReadoutBlock": {"readout": "NonLinearBiasReadoutBlock"},
        "use_agnostic_product": {"use_agnostic_product": True},
        "use_last_readout_only": {"use_last_readout_only": True},
        "edge_irreps": {"edge_irreps": "4x0e+4x1o", "use_edge_irreps_first": True},
        "keep_last_layer_irreps": {"keep_last_layer_irreps": True},
        "charge-spin-embedding": {"charge_spin_embedding": True},
        "combined": {
            "interaction": "RealAgnosticResidualNonLinearInteractionBlock",
            "readout": "NonLinearBiasReadoutBlock",
            "use_agnostic_product": True,
            "edge_irreps": "4x0e+4x1o",
            "charge_spin_embedding": True,
        },
    }
)
#: variants whose *bare base* mace-torch 0.3.16 cannot TorchScript-compile (mace's own code):
#: RealAgnosticAttResidualInteractionBlock.forward is annotated Tuple[Tensor, None] but returns
#: the skip connection; the NonLinear block's GatedEquivariantBlock annotates ``o3.Irreps``;
#: GenericJointEmbedding keeps its specs in a dict of mixed types.
NOT_SCRIPTABLE = {
    "RealAgnosticAttResidualInteractionBlock",
    "RealAgnosticResidualNonLinearInteractionBlock",
    "charge-spin-embedding",
    "combined",
}
#: the o3.Linear attributes each interaction block holds (all node-wise)
BLOCK_LINEARS = {
    "RealAgnosticInteractionBlock": {"linear_up", "linear"},
    "RealAgnosticResidualInteractionBlock": {"linear_up", "linear"},
    "RealAgnosticDensityInteractionBlock": {"linear_up", "linear"},
    "RealAgnosticDensityResidualInteractionBlock": {"linear_up", "linear"},
    "RealAgnosticAttResidualInteractionBlock": {
        "linear_up",
        "linear_down",
        "linear",
        "skip_linear",
    },
    "RealAgnosticResidualNonLinearInteractionBlock": {
        "source_embedding",
        "target_embedding",
        "linear_up",
        "skip_tp",
        "linear_res",
        "linear_1",
        "linear_2",
    },
}
KEYS = ("energy", "forces", "stress")
#: the keys LAMMPS' pair_mace puts in the dict it hands the model


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param


def adapted(variant, rank=4, seed=1):
    """The variant with adapter ``a`` (randomised) and ``fresh`` (identity, not active)."""
    model = AdaptedModel(build_mace_variant(**VARIANTS[variant]))
    model.add_adapter("fresh", MMEAConfig(rank=rank), set_active=False)
    model.add_adapter("a", MMEAConfig(rank=rank))
    randomize_adapter(model, "a", std=0.1, seed=seed)
    return model


def box(seed=1):
    return random_cluster(10, cell=5.0, seed=seed, min_distance=1.1)


def outputs(model, atoms, adapter="a"):
    if isinstance(model, AdaptedModel):
        model.set_adapter(adapter)
    out = evaluate(model, [atoms], compute_stress=True)
    return {k: out[k].detach() for k in (*KEYS, "node_energy")}


def max_diff(a, b, keys=KEYS):
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


# ---------------------------------------------------------------------------- targets
def test_every_linear_of_mace_blocks_runs_per_node_and_is_targeted(variant):
    base = build_mace_variant(**VARIANTS[variant])
    gateable, other = node_wise_linears(base)
    assert other == {}
    linears = {n: m for n, m in base.named_modules() if isinstance(m, o3.Linear)}
    assert list(gateable) == list(linears)
    rows: dict[str, int] = {}

    def record(name):
        def hook(module, args, output):  # returns None: the output is left as it is
            rows[name] = args[0].shape[0]

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in linears.items()]
    try:
        graph = collate([atoms_to_graph(box(), AdaptedModel(base).base_info)], torch.float64)
        base(graph)
    finally:
        for handle in handles:
            handle.remove()
    num_nodes, num_edges = graph["node_attrs"].shape[0], graph["edge_index"].shape[1]
    assert num_edges != num_nodes
    assert rows == dict.fromkeys(linears, num_nodes)  # every one ran, on the nodes
    model = AdaptedModel(base)
    model.add_adapter("a", MMEAConfig(rank=2))
    scalar_in = [n for n, m in linears.items() if o3.Irreps(str(m.irreps_in)).count("0e") > 0]
    assert model.adapter_targets("a") == scalar_in
    for index, interaction in enumerate(base.interactions):
        expected = BLOCK_LINEARS[type(interaction).__name__]
        prefix = f"interactions.{index}."
        held = {n[len(prefix) :] for n in linears if n.startswith(prefix)}
        assert held == expected


class _EdgeLinearTP(torch.nn.Module):
    """A convolution followed by an o3.Linear on its per-edge output: a block mace does not
    ship, whose linear's rows are edges."""

    def __init__(self, tp):
        super().__init__()
        self.tp = tp
        self.edge_linear = o3.Linear(tp.irreps_out, tp.irreps_out).to(torch.float64)

    def forward(self, x, y, w):
        return self.edge_linear(self.tp(x, y, w))


def test_a_linear_on_edges_is_never_targeted_and_refused_by_name(caplog):
    base = build_tiny_mace()
    base.interactions[0].conv_tp = _EdgeLinearTP(base.interactions[0].conv_tp)
    name = "interactions.0.conv_tp.edge_linear"
    rows = []
    handle = base.get_submodule(name).register_forward_hook(
        lambda mod, args, out: rows.append(args[0].shape[0])  # append returns None
    )
    atoms = box()
    graph = collate([atoms_to_graph(atoms, AdaptedModel(base).base_info)], torch.float64)
    base(graph)
    handle.remove()
    assert rows == [graph["edge_index"].shape[1]] and rows[0] != len(atoms)
    model = AdaptedModel(base)
    assert name not in model.adaptable_modules()
    with caplog.at_level(logging.WARNING, logger="mmea_calc.model"):
        model.add_adapter("a", MMEAConfig(rank=2))
    assert name in caplog.text and "ungated" in caplog.text
    assert name not in model.adapter_targets("a")
    assert "interactions.0.linear" in model.adapter_targets("a")
    for pattern in (name, "edge_linear", "interactions.0.conv_tp.*"):
        with pytest.raises(TargetError, match=r"edge_linear.*once per node") as info:
            model.add_adapter("bad", MMEAConfig(rank=2, targets=[pattern]))
        assert "_EdgeLinearTP" in str(info.value)
    assert model.adapter_names == ["a"]
    randomize_adapter(model, "a", std=0.1)
    out = evaluate(model, [atoms])  # the gates run on node rows only: no error
    assert torch.isfinite(out["forces"]).all()


def test_unmerged_mace_lora_is_refused_until_merged():
    base = lora.inject_LoRAs(build_tiny_mace(), rank=2, alpha=2)
    model = AdaptedModel(base)
    with pytest.raises(TargetError, match=r"LoRAO3Linear.*merge_lora_weights"):
        model.add_adapter("a", MMEAConfig(rank=2))
    with pytest.raises(TargetError, match=r"'interactions\.0\.linear\.base'.*LoRAO3Linear"):
        model.add_adapter("a", MMEAConfig(rank=2, targets=["interactions.0.linear.base"]))
    assert model.adapter_names == []
    merged = AdaptedModel(lora.merge_lora_weights(base))
    merged.add_adapter("a", MMEAConfig(rank=2))
    assert "interactions.0.linear" in merged.adapter_targets("a")


def test_general_nonlinear_bias_readout_does_not_build_in_mace():
    # mace's MACE passes (irreps, MLP, gate, irrep_out, num_heads, cueq, oeq) positionally,
    # which GeneralNonLinearBiasReadoutBlock (field-MACE's readout) does not take
    with pytest.raises(TypeError, match="GeneralNonLinearBiasReadoutBlock"):
        build_mace_variant(readout="GeneralNonLinearBiasReadoutBlock")


# ---------------------------------------------------------------------------- physics
def test_fresh_adapter_is_the_identity(variant):
    model = adapted(variant)
    atoms = box()
    with model.disable_adapters():
        ref = outputs(model, atoms)
    got = outputs(model, atoms, "fresh")
    assert max_diff(got, ref, (*KEYS, "node_energy")) <= 1e-12
    assert abs(float(outputs(model, atoms)["energy"] - ref["energy"])) > 1e-3  # can fail


def test_randomised_adapter_is_e3_equivariant(variant):
    model = adapted(variant)
    atoms = box()
    ref = outputs(model, atoms)
    for seed, inversion in [(0, False), (1, False), (2, True)]:
        q = random_rotation(seed, inversion=inversion)
        moved = atoms.copy()
        moved.set_positions(atoms.get_positions() @ q.T)
        moved.set_cell(np.asarray(atoms.get_cell()) @ q.T)
        got = outputs(model, moved)
        qt = torch.tensor(q)
        rotated = {
            "energy": ref["energy"],
            "forces": ref["forces"] @ qt.T,
            "stress": qt @ ref["stress"] @ qt.T,
        }
        scale = max(float(ref[k].abs().max()) for k in KEYS)
        assert max_diff(got, rotated) <= 1e-9 * scale, (seed, inversion)


def test_adapter_trains_on_emt_data(variant):
    model = AdaptedModel(build_mace_variant(**VARIANTS[variant]))
    data = [random_cluster(5, seed=s) for s in range(4)]
    for atoms in data:
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
    result = fit_adapter(model, data, config=TrainConfig(rank=2, epochs=2), name="fit")
    assert result.epochs_completed == 2 and result.trainable_parameters > 0
    heads = [t for k, t in model.adapter_state_dict("fit").items() if ".gate." in k]
    assert heads and any(float(t.abs().max()) > 0 for t in heads)  # they start at zero
    atoms = data[0]
    trained = outputs(model, atoms, "fit")
    with model.disable_adapters():
        base = outputs(model, atoms, "fit")
    assert torch.isfinite(trained["forces"]).all()
    assert float((trained["forces"] - base["forces"]).abs().max()) > 0


def test_calculator_serves_the_adapter_per_node(variant):
    model = adapted(variant)
    atoms = box()
    atoms.calc = MMEACalculator(model, select="a")
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    assert atoms.calc.results["adapter"] == "a"
    assert np.isfinite(energy) and np.isfinite(forces).all()
    with model.disable_adapters():
        base = outputs(model, atoms)
    assert abs(energy - float(base["energy"])) > 1e-3
    assert np.abs(forces - base["forces"].numpy()).max() > 1e-4
    # a mixed batch routes per node: each structure as if alone
    other = box(seed=2)
    mixed = evaluate(model, [atoms, other], adapters=["a", None])
    model.set_adapter("a")
    alone = evaluate(model, [atoms])
    model.set_adapter(None)
    alone_other = evaluate(model, [other])
    torch.testing.assert_close(mixed["energy"][0], alone["energy"][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(mixed["energy"][1], alone_other["energy"][0], rtol=0, atol=1e-10)
    n = len(atoms)
    torch.testing.assert_close(mixed["forces"][:n], alone["forces"], rtol=0, atol=1e-10)


def test_freeze_and_mliap_export_equal_the_adapted_model(variant, tmp_path):
    model = adapted(variant)
    atoms = box()
    want = outputs(model, atoms)
    assert max_diff(outputs(model.freeze("a"), atoms), want, (*KEYS, "node_energy")) <= 1e-10
    path = tmp_path / "a-mliap.pt"  # ML-IAP object (torch.save, no TorchScript): every variant
    export_mliap(model, "a", path)
    loaded = torch.load(path, weights_only=False)
    batch = mliap_batch(atoms, model.base_info)
    edges = batch["edge_index"]
    energy, node_energy, pair_forces = loaded.model(batch)
    assert abs(float(energy.detach()) - float(want["energy"])) <= 1e-8
    torch.testing.assert_close(node_energy.detach(), want["node_energy"], rtol=0, atol=1e-8)
    forces = torch.zeros(len(atoms), 3, dtype=torch.float64)
    forces.index_add_(0, edges[1], -pair_forces).index_add_(0, edges[0], pair_forces)
    torch.testing.assert_close(forces.detach(), want["forces"], rtol=0, atol=1e-8)


@pytest.mark.slow
def test_torchscript_export_equals_the_adapted_model(variant):
    """``pair_style mace``'s file: ``e3nn.util.jit.compile(LAMMPS_MACE(frozen))``, where mace
    can compile the bare base at all."""
    model = adapted(variant)
    if variant in NOT_SCRIPTABLE:
        with pytest.raises(RuntimeError):
            e3nn_jit.compile(LAMMPS_MACE(copy.deepcopy(model.base_model)))
        return
    atoms = box()
    want = outputs(model, atoms)
    compiled = e3nn_jit.compile(LAMMPS_MACE(model.freeze("a")))
    data = pair_mace_inputs(atoms, model.base_info)
    got = compiled(data, torch.ones(len(atoms), dtype=torch.bool), True)
    assert abs(float(got["total_energy_local"][0].detach()) - float(want["energy"])) <= 1e-8
    torch.testing.assert_close(got["forces"], want["forces"], rtol=0, atol=1e-8)
