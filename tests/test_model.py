from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmea_calc import AdaptedModel, MMEAConfig
from mmea_calc._deps import o3
from mmea_calc.data import atoms_to_graph, collate
from mmea_calc.errors import AdapterExistsError, AdapterNotFoundError, TargetError
from mmea_calc.routing import ADAPTER_INDEX_KEY
from mmea_calc.testing import (
    build_tiny_mace,
    evaluate,
    random_cluster,
    random_rotation,
    randomize_adapter,
)

TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def periodic_box(seed=3):
    return random_cluster(14, cell=6.5, seed=seed)


def _outputs(model, atoms, stress=True):
    out = evaluate(model, [atoms], compute_stress=stress)
    res = {"energy": out["energy"].detach(), "forces": out["forces"].detach()}
    if stress:
        res["stress"] = out["stress"].detach()[0]
    return res


def test_fresh_adapter_reproduces_base_exactly(tiny_base):
    model = AdaptedModel(tiny_base)
    atoms = periodic_box()
    with model.disable_adapters():
        ref = _outputs(model, atoms)
    model.add_adapter("fresh", MMEAConfig(rank=8))
    got = _outputs(model, atoms)
    for key in ref:
        assert torch.allclose(got[key], ref[key], rtol=0, atol=1e-12), key
    # and randomising the adapter really changes the answer (the comparison above can fail)
    randomize_adapter(model, "fresh", std=0.1)
    assert (_outputs(model, atoms)["energy"] - ref["energy"]).abs().item() > 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_randomised_adapter_is_e3_equivariant(tiny_kind, dtype):
    hidden, residual, scale_shift = tiny_kind
    model = AdaptedModel(
        build_tiny_mace(hidden, residual=residual, scale_shift=scale_shift, dtype=dtype)
    )
    model.add_adapter("a", MMEAConfig(rank=8))
    randomize_adapter(model, "a", std=0.1, seed=1)
    atoms = periodic_box()
    ref = _outputs(model, atoms)
    tol = TOL[dtype]

    def close(a, b):
        scale = max(b.abs().max().item(), 1e-3)
        return (a - b).abs().max().item() / scale <= tol

    for seed, inversion in [(0, False), (1, False), (2, True)]:
        q = random_rotation(seed, inversion=inversion)
        moved = atoms.copy()
        moved.set_positions(atoms.get_positions() @ q.T)
        moved.set_cell(np.asarray(atoms.get_cell()) @ q.T)
        got = _outputs(model, moved)
        qt = torch.tensor(q, dtype=dtype)
        assert close(got["energy"], ref["energy"])
        assert close(got["forces"], ref["forces"] @ qt.T)
        assert close(got["stress"], qt @ ref["stress"] @ qt.T)
    shifted = atoms.copy()
    shifted.translate([0.37, -1.2, 2.9])
    got = _outputs(model, shifted)
    assert close(got["energy"], ref["energy"]) and close(got["forces"], ref["forces"])
    perm = np.random.default_rng(0).permutation(len(atoms))
    got = _outputs(model, atoms[perm])
    assert close(got["energy"], ref["energy"])
    assert close(got["forces"], ref["forces"][torch.as_tensor(perm)])
    assert close(got["stress"], ref["stress"])


def test_optimiser_step_changes_only_adapter_tensors(tiny_base):
    model = AdaptedModel(tiny_base)
    model.add_adapter("a", MMEAConfig(rank=4))
    randomize_adapter(model, "a", std=0.1)
    base_before = {
        k: v.clone() for k, v in model.base_model.state_dict().items() if "mmea" not in k
    }
    adapter_before = {k: v.clone() for k, v in model.adapter_state_dict("a").items()}
    opt = torch.optim.Adam(model.adapter_parameters("a"), lr=1e-2)
    out = evaluate(model, [random_cluster(8, seed=5)], training=True)
    loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()
    loss.backward()
    opt.step()
    after = model.base_model.state_dict()
    for key, value in base_before.items():
        assert torch.equal(after[key], value), f"base tensor {key} changed"
    assert all(p.grad is None for n, p in model.base_model.named_parameters() if "mmea" not in n)
    for key, value in model.adapter_state_dict("a").items():
        assert not torch.equal(value, adapter_before[key]), f"adapter tensor {key} did not train"


def _expected_count(model, rank):
    total = 0
    for _name, spec in model.adaptable_modules().items():
        irreps_in, irreps_out = (o3.Irreps(s) for s in spec.split(" -> "))
        n0 = irreps_in.count(o3.Irrep("0e"))
        ng = sum(mul for mul, ir in irreps_out if ir.l > 0)
        ns = irreps_out.count(o3.Irrep("0e"))
        total += rank * (n0 + 1) + (rank + 1) * (ng + ns)
    return total


@pytest.mark.parametrize("rank", [1, 16])
def test_parameter_count_matches_formula(tiny_base, rank):
    model = AdaptedModel(tiny_base)
    model.add_adapter("a", MMEAConfig(rank=rank))
    assert model.num_trainable_parameters("a") == _expected_count(model, rank)
    assert model.num_trainable_parameters("a") == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_mixed_batch_equals_single_evaluations():
    model = AdaptedModel(build_tiny_mace())
    for i, name in enumerate(["a", "b"]):
        model.add_adapter(name, MMEAConfig(rank=4))
        randomize_adapter(model, name, std=0.1, seed=10 + i)
    structures = [periodic_box(1), periodic_box(2), periodic_box(3)]
    names = ["a", None, "b"]
    mixed = evaluate(model, structures, adapters=names, compute_stress=True)
    offset = 0
    for atoms, name in zip(structures, names, strict=True):
        model.set_adapter(name)
        single = evaluate(model, [atoms], compute_stress=True)
        n = len(atoms)
        i = structures.index(atoms)
        assert torch.allclose(mixed["energy"][i], single["energy"][0], rtol=0, atol=1e-10)
        assert torch.allclose(mixed["forces"][offset : offset + n], single["forces"], atol=1e-10)
        assert torch.allclose(mixed["stress"][i], single["stress"][0], atol=1e-10)
        offset += n
    # the three adapters really differ, so the comparison could fail
    model.set_adapter("a")
    other = evaluate(model, [structures[1]])
    assert abs(other["energy"].item() - mixed["energy"][1].item()) > 1e-6


def test_management_verbs_and_errors(tiny_base):
    model = AdaptedModel(tiny_base)
    keys_before = sorted(model.base_model.state_dict())
    with pytest.raises(AdapterNotFoundError, match="loaded adapters: none"):
        model.set_adapter("nope")
    model.add_adapter("a", MMEAConfig(rank=2))
    model.add_adapter("b", MMEAConfig(rank=2), set_active=False)
    assert model.adapter_names == ["a", "b"] and model.active_adapter == "a"
    with pytest.raises(AdapterNotFoundError, match=r"\['a', 'b'\]"):
        model.set_adapter("c")
    with pytest.raises(AdapterExistsError):
        model.add_adapter("a")
    with pytest.raises(ValueError, match="not valid"):
        model.add_adapter("base")
    model.set_adapter("b")
    model.delete_adapter("b")
    assert model.active_adapter is None and model.adapter_names == ["a"]
    model.delete_adapter("a")
    # with every adapter gone, the base module tree is exactly as loaded
    assert sorted(model.base_model.state_dict()) == keys_before


def test_target_patterns():
    model = AdaptedModel(build_tiny_mace())
    model.add_adapter("inter", MMEAConfig(rank=2, targets="interactions.*.linear"))
    assert model.adapter_targets("inter") == ["interactions.0.linear", "interactions.1.linear"]
    model.add_adapter("names", MMEAConfig(rank=2, targets=["node_embedding.linear", "linear_up"]))
    assert model.adapter_targets("names") == [
        "node_embedding.linear",
        "interactions.0.linear_up",
        "interactions.1.linear_up",
    ]
    with pytest.raises(TargetError, match="matches no adaptable"):
        model.add_adapter("bad", MMEAConfig(targets=["conv_tp"]))
    assert "bad" not in model.adapter_names


def test_disable_adapters_gives_base():
    model = AdaptedModel(build_tiny_mace())
    atoms = random_cluster(9, seed=2)
    ref = _outputs(model, atoms, stress=False)
    model.add_adapter("a", MMEAConfig(rank=4))
    randomize_adapter(model, "a")
    with model.disable_adapters():
        assert torch.equal(_outputs(model, atoms, stress=False)["forces"], ref["forces"])
    assert not torch.equal(_outputs(model, atoms, stress=False)["forces"], ref["forces"])


def test_e0_correction_shifts_energy_per_element():
    model = AdaptedModel(build_tiny_mace())
    atoms = random_cluster(9, seed=2)
    ref = _outputs(model, atoms, stress=False)
    model.add_adapter("a", MMEAConfig(rank=4), e0s={1: 0.5, 6: -1.25})
    got = _outputs(model, atoms, stress=False)
    expected = 0.5 * (atoms.numbers == 1).sum() - 1.25 * (atoms.numbers == 6).sum()
    assert got["energy"].item() - ref["energy"].item() == pytest.approx(expected, abs=1e-10)
    assert torch.allclose(got["forces"], ref["forces"], atol=1e-12)


# ---------------------------------------------------------------- placement and shared bases
def test_a_loaded_module_is_never_moved_or_converted():
    base = build_tiny_mace(dtype=torch.float32).to("meta")  # meta: any move would show
    model = AdaptedModel(base)
    assert model.base_model is base
    model.add_adapter("a", MMEAConfig(rank=2))
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    assert devices == {"meta"}
    assert {p.dtype for p in model.adapter_parameters("a")} == {torch.float32}
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    # asked for: converted
    f64 = AdaptedModel(build_tiny_mace(dtype=torch.float32), dtype="float64")
    assert f64.dtype == torch.float64


def _copy_adapter(source, name, target):
    target.add_adapter(name, source.adapter_config(name), e0s=source.adapter_e0s(name))
    with torch.no_grad():
        for (_, mine), (_, theirs) in zip(
            target.named_adapter_parameters(name),
            source.named_adapter_parameters(name),
            strict=True,
        ):
            mine.copy_(theirs)


def test_models_sharing_one_base_do_not_see_each_others_adapters():
    base = build_tiny_mace()
    keys = list(base.state_dict())
    modules = [type(m).__name__ for m in base.modules()]
    first, second = AdaptedModel(base), AdaptedModel(base)
    for seed, model in enumerate((first, second)):
        model.add_adapter("a", MMEAConfig(rank=4))  # the same name in both
        randomize_adapter(model, "a", std=0.1, seed=seed)
    atoms = periodic_box()
    got = [_outputs(m, atoms) for m in (first, second)]
    for model, out in zip((first, second), got, strict=True):
        alone = AdaptedModel(copy.deepcopy(build_tiny_mace()))
        _copy_adapter(model, "a", alone)
        ref = _outputs(alone, atoms)
        for key in ref:
            assert torch.allclose(out[key], ref[key], rtol=0, atol=1e-12), key
    assert (got[0]["energy"] - got[1]["energy"]).abs().item() > 1e-6
    # the base module itself is untouched: same keys, same module tree, the bare model
    assert list(base.state_dict()) == keys
    assert [type(m).__name__ for m in base.modules()] == modules
    bare = _outputs(AdaptedModel(build_tiny_mace()), atoms)
    direct = evaluate(base, [atoms], compute_stress=True)
    assert torch.allclose(direct["energy"], bare["energy"], rtol=0, atol=1e-12)


def test_revision_counts_every_change_of_what_the_model_computes(tmp_path):
    model = AdaptedModel(build_tiny_mace())
    seen = [model.revision]

    def changed():
        seen.append(model.revision)
        return seen[-1] != seen[-2]

    model.add_adapter("a", MMEAConfig(rank=2))
    assert changed()
    model.set_adapter_e0s("a", {1: 0.1})
    assert changed()
    model.save_adapter("a", tmp_path / "a")
    assert not changed()  # saving changes nothing
    model.load_adapter(tmp_path / "a", name="b")
    assert changed()
    model.set_adapter("b")
    assert not changed()  # already active
    model.set_adapter(None)
    assert changed()
    model.delete_adapter("b")
    assert changed()


def test_loaded_adapters_are_frozen_unless_asked(tmp_path):
    model = AdaptedModel(build_tiny_mace())
    model.add_adapter("a", MMEAConfig(rank=2))
    assert all(p.requires_grad for p in model.adapter_parameters("a"))  # fresh: to be trained
    model.save_adapter("a", tmp_path / "a")
    model.load_adapter(tmp_path / "a", name="frozen")
    model.load_adapter(tmp_path / "a", name="trainable", is_trainable=True)
    assert not any(p.requires_grad for p in model.adapter_parameters("frozen"))
    assert all(p.requires_grad for p in model.adapter_parameters("trainable"))
    assert not any(p.requires_grad for p in model.base_model.parameters())


def test_e0_shifts_follow_each_node_in_mixed_batches():
    model = AdaptedModel(build_tiny_mace())
    model.add_adapter("a", MMEAConfig(rank=2), e0s={1: 0.5, 8: -1.0}, set_active=False)
    model.add_adapter("b", MMEAConfig(rank=2), e0s={6: 2.0}, set_active=False)
    model.add_adapter("c", MMEAConfig(rank=2), set_active=False)  # no E0s
    structures = [periodic_box(1), periodic_box(2), periodic_box(3), periodic_box(4)]
    names = ["a", "b", None, "c"]
    mixed = evaluate(model, structures, adapters=names)
    bare = evaluate(model, structures, adapters=[None] * 4)
    node_shift = mixed["node_energy"] - bare["node_energy"]
    offset = 0
    for i, (atoms, name) in enumerate(zip(structures, names, strict=True)):
        table = model.adapter_e0s(name) or {} if name else {}
        expected = torch.tensor(
            [table.get(int(z), 0.0) for z in atoms.numbers], dtype=torch.float64
        )
        assert torch.allclose(node_shift[offset : offset + len(atoms)], expected, atol=1e-12)
        shift = (mixed["energy"][i] - bare["energy"][i]).item()
        assert shift == pytest.approx(float(expected.sum()))
        assert torch.allclose(
            mixed["node_energy"][offset : offset + len(atoms)].sum(), mixed["energy"][i]
        )
        offset += len(atoms)
    assert node_shift.abs().max() > 0.4  # the shifts are really there


def test_float64_adapter_loads_into_a_float32_model(tmp_path):
    f32 = build_tiny_mace(dtype=torch.float32)
    f64 = AdaptedModel(copy.deepcopy(f32), dtype="float64")
    f64.add_adapter("a", MMEAConfig(rank=4), e0s={1: 0.25})
    randomize_adapter(f64, "a", std=0.1, seed=3)
    f64.save_adapter("a", tmp_path / "a")
    model = AdaptedModel(f32)
    model.load_adapter(tmp_path / "a")
    assert {p.dtype for p in model.adapter_parameters("a")} == {torch.float32}
    atoms = periodic_box()
    got, ref = _outputs(model, atoms), _outputs(f64, atoms)
    assert got["forces"].dtype == torch.float32
    scale = ref["forces"].abs().max().item()
    assert (got["forces"].double() - ref["forces"]).abs().max().item() <= 2e-4 * scale
    assert got["energy"].double().item() == pytest.approx(ref["energy"].item(), rel=1e-5)


# ---------------------------------------------------------------- gate ranges (robust gates)
def _calibrated(seed=0):
    from mmea_calc.train import calibrate_adapter

    model = AdaptedModel(build_tiny_mace())
    model.add_adapter("a", MMEAConfig(rank=4))
    randomize_adapter(model, "a", std=0.3, seed=seed)
    train = [random_cluster(8, seed=s, min_distance=1.2) for s in range(4)]
    calibrate_adapter(model, "a", train)
    return model, train


def test_calibration_changes_nothing_on_its_data_and_grades_it_zero():
    model, train = _calibrated()
    assert model.is_calibrated("a")
    outs = [evaluate(model, [atoms]) for atoms in train]
    # zero up to rounding: calibration ran batched, mace sums messages in another order alone
    assert max(out["adapter_extrapolation"].item() for out in outs) < 1e-6
    ranges = model._ranges_document("a")["gate_ranges"]
    model.set_gate_ranges("a", None)
    for atoms, out in zip(train, outs, strict=True):
        raw = evaluate(model, [atoms])
        assert "adapter_extrapolation" not in raw
        assert torch.allclose(raw["forces"], out["forces"], rtol=0, atol=1e-12)
    model.set_gate_ranges("a", ranges)
    squeezed = train[0].copy()
    squeezed.positions *= 0.55  # compressed: far outside what calibration saw
    assert evaluate(model, [squeezed])["adapter_extrapolation"].item() > 1.0


def test_gate_ranges_round_trip_and_old_files_warn(tmp_path):
    import json

    from mmea_calc.errors import UncalibratedAdapterWarning

    model, train = _calibrated()
    model.save_adapter("a", tmp_path / "a")
    loaded = AdaptedModel(build_tiny_mace())
    loaded.load_adapter(tmp_path / "a")
    squeezed = train[1].copy()
    squeezed.positions *= 0.6
    for atoms in (train[0], squeezed):
        ref, got = evaluate(model, [atoms]), evaluate(loaded, [atoms])
        assert torch.allclose(got["forces"], ref["forces"], atol=1e-12)
        assert got["adapter_extrapolation"].item() == pytest.approx(
            ref["adapter_extrapolation"].item(), rel=1e-9
        )
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.pop("gate_ranges")
    config_path.write_text(json.dumps(config))
    with pytest.warns(UncalibratedAdapterWarning, match="mmea-calc calibrate"):
        AdaptedModel(build_tiny_mace()).load_adapter(tmp_path / "a")


def test_a_failed_calibration_leaves_the_ranges_as_they_were():
    from mmea_calc.errors import ConfigError

    model, _ = _calibrated()
    before = model._ranges_document("a")
    with pytest.raises(ConfigError, match="no atoms"):
        model.calibrate_adapter("a", [])
    assert model._ranges_document("a") == before and model.is_calibrated("a")


def test_calibration_records_logit_ranges_that_bound_the_gates_far_outside(tmp_path):
    import json

    from mmea_calc.adapter import FADE_SCALE

    model, train = _calibrated(seed=2)
    gates = model._gates("a")
    with_gates = {t: g for t, g in gates.items() if g.gate is not None}
    assert with_gates and all(g.logit_low is not None for g in with_gates.values())
    assert all(g.fade_scale == FADE_SCALE for g in gates.values())
    # the recorded logit range holds every logit the training data produced (after the bound)
    seen = {}

    def logits(target, module, args, z):  # the gate head on the bottleneck (in range: as is)
        gate = with_gates[target]
        seen.setdefault(target, []).append(gate.gate(torch.nn.functional.silu(z)))

    handles = [
        g.down.register_forward_hook(lambda m, a, z, t=t: logits(t, m, a, z))
        for t, g in with_gates.items()
    ]
    for atoms in train:
        evaluate(model, [atoms])
    squeezed = train[0].copy()
    squeezed.positions *= 0.5
    far = evaluate(model, [squeezed])
    for handle in handles:
        handle.remove()
    for target, gate in with_gates.items():
        bound = gate.logit_bound
        inside = torch.cat(seen[target][:-1])
        inside = bound * torch.tanh(inside / bound)
        assert (inside >= gate.logit_low - 1e-9).all() and (inside <= gate.logit_high + 1e-9).all()
    assert torch.isfinite(far["forces"]).all()
    # saved and loaded with the adapter; files without gate_fade_scale keep the old 1.0
    model.save_adapter("a", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    entry = next(iter(config["gate_ranges"][t] for t in with_gates))
    assert "logit_low" in entry and config["gate_fade_scale"] == FADE_SCALE
    loaded = AdaptedModel(build_tiny_mace())
    loaded.load_adapter(tmp_path / "a")
    got = evaluate(loaded, [squeezed])
    assert torch.allclose(got["forces"], far["forces"], atol=1e-12)
    config.pop("gate_fade_scale")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    legacy = AdaptedModel(build_tiny_mace())
    legacy.load_adapter(tmp_path / "a")
    assert all(g.fade_scale == 1.0 for g in legacy._gates("a").values())


def test_the_route_is_cached_per_index_tensor_and_follows_its_changes():
    model = AdaptedModel(build_tiny_mace())
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, MMEAConfig(rank=4))
        randomize_adapter(model, name, std=0.3, seed=i)
    atoms = periodic_box()
    data = collate([atoms_to_graph(atoms, model.base_info)], dtype=model.dtype)
    ref = {}
    for name in ("a", "b"):
        model.route(data, [name])
        ref[name] = model(dict(data))["energy"].item()
    with model.disable_adapters():
        ref[None] = model(dict(data))["energy"].item()
    assert len({round(v, 9) for v in ref.values()}) == 3
    index = torch.zeros(len(atoms), dtype=torch.long)
    data[ADAPTER_INDEX_KEY] = index
    assert model(dict(data))["energy"].item() == ref["a"]
    route = model._route(data)
    assert model._route(data) is route  # the same tensor: no new route
    index.fill_(1)  # edited in place
    assert model(dict(data))["energy"].item() == ref["b"]
    index.fill_(-1)
    assert model(dict(data))["energy"].item() == ref[None]
    index.fill_(1)
    model.delete_adapter("a")  # index 1 now names nothing: the revision changed
    with pytest.raises(AdapterNotFoundError, match="valid are -1"):
        model(dict(data))
    index.fill_(0)  # "b" is adapter 0 now
    assert model(dict(data))["energy"].item() == ref["b"]
