from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import ase
import numpy as np
import pytest
import torch
from ase.stress import voigt_6_to_full_3x3_stress

from mmea_calc import AdaptedModel, MMEAConfig
from mmea_calc._deps import LAMMPS_MACE, e3nn_jit
from mmea_calc.adapter import FrozenMMEALinear
from mmea_calc.calculator import MMEACalculator
from mmea_calc.cli import main
from mmea_calc.errors import AdapterNotFoundError, ExportError
from mmea_calc.export import (
    check_exportable,
    export_lammps,
    export_mliap,
    lammps_module,
    sidecar_path,
)
from mmea_calc.mace_model import atomic_energies
from mmea_calc.testing import (
    build_tiny_mace,
    evaluate,
    mliap_batch,
    pair_mace_inputs,
    random_cluster,
    randomize_adapter,
)

E0S = {1: 0.25, 8: -0.4}  # carbon left out: a correction may cover only some elements
#: the keys LAMMPS' pair_mace puts in the dict it hands the model (nothing else)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated")


def adapted(seed=0, e0s=E0S, **base_kw):
    model = AdaptedModel(build_tiny_mace(**base_kw))
    model.add_adapter("a", MMEAConfig(rank=4), e0s=e0s)
    randomize_adapter(model, "a", std=0.1, seed=seed)
    model.add_adapter("b", MMEAConfig(rank=2), set_active=False)
    randomize_adapter(model, "b", std=0.1, seed=seed + 1)
    return model


def periodic(seed=1):
    return random_cluster(10, cell=5.0, seed=seed, min_distance=1.1)


def molecule(seed=2):
    return random_cluster(9, seed=seed, density=0.1)


@pytest.fixture(scope="module")
def model():
    return adapted()


@pytest.fixture(scope="module")
def lammps_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "a.pt"
    export_lammps(model, "a", path)
    return path


def reference(model, atoms):
    """What MMEACalculator gives with adapter ``a``: energy, forces, node energies, virials."""
    atoms = atoms.copy()
    atoms.calc = MMEACalculator(model, select="a")
    ref = {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "energies": atoms.calc.results["energies"],
    }
    if atoms.pbc.all():
        ref["virials"] = -voigt_6_to_full_3x3_stress(atoms.get_stress()) * atoms.get_volume()
    return ref


def call_lammps(module, data, local):
    """``model.forward({input, mask, bool(vflag_global)})``, as pair_mace calls it."""
    out = module(data, local, True)
    return {k: v.detach().to(torch.float64).numpy() for k, v in out.items()}


def with_ghosts(atoms, reach):
    """``atoms`` plus every periodic image within ``reach`` of it, as LAMMPS' ghost atoms.

    Returns the open cluster (locals first) and, per atom, the index of the local atom it is
    an image of.
    """
    cell = atoms.cell.array
    n = 3
    shifts = np.array([(i, j, k) for i in range(-n, n + 1) for j in range(-n, n + 1)
                       for k in range(-n, n + 1) if (i, j, k) != (0, 0, 0)])  # fmt: skip
    images = (atoms.positions[None, :, :] + (shifts @ cell)[:, None, :]).reshape(-1, 3)
    owner = np.tile(np.arange(len(atoms)), len(shifts))
    dist = np.linalg.norm(images[:, None, :] - atoms.positions[None, :, :], axis=-1).min(axis=1)
    keep = dist < reach
    cluster = ase.Atoms(
        numbers=np.concatenate([atoms.numbers, atoms.numbers[owner[keep]]]),
        positions=np.concatenate([atoms.positions, images[keep]]),
    )
    return cluster, np.concatenate([np.arange(len(atoms)), owner[keep]])


# ---------------------------------------------------------------------------- freeze
@pytest.mark.parametrize("periodic_box", [True, False])
def test_freeze_equals_the_adapted_model(model, periodic_box):
    atoms = periodic() if periodic_box else molecule()
    frozen = model.freeze("a")
    model.set_adapter("a")
    want = evaluate(model, [atoms], compute_stress=periodic_box)
    got = evaluate(frozen, [atoms], compute_stress=periodic_box)
    keys = ["energy", "forces", "node_energy"] + (["stress"] if periodic_box else [])
    for key in keys:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-10)
    with model.disable_adapters():
        base = evaluate(model, [atoms])
    # the adapter changes things, so the comparison above can fail
    assert abs(float(want["energy"].detach() - base["energy"].detach())) > 1e-2
    assert (want["forces"] - base["forces"]).abs().max() > 1e-3


def test_freeze_folds_e0_corrections_per_element_and_head(model):
    frozen = model.freeze("a")
    before, after = atomic_energies(model.base_model), atomic_energies(frozen)
    zs = [int(z) for z in model.base_model.atomic_numbers]
    expected = before + torch.tensor([E0S.get(z, 0.0) for z in zs], dtype=before.dtype)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    base = build_tiny_mace(heads=("x", "Default"))  # a [n_heads, n_el] table
    two_heads = atomic_energies(base).clone()
    multi = AdaptedModel(base)
    config = MMEAConfig(rank=2, targets=["readouts.0.linear"])
    multi.add_adapter("c", config, e0s={6: 2.0}, head="x")
    folded = atomic_energies(multi.freeze("c"))
    shift = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(folded - two_heads, shift, rtol=0, atol=0)  # its head's row only
    assert torch.equal(atomic_energies(base), two_heads)  # the base keeps its own table


def test_freeze_leaves_model_and_base_untouched(model):
    atoms = periodic(seed=3)
    state = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    adapter = {k: v.clone() for k, v in model.adapter_state_dict("a").items()}
    model.set_adapter("a")
    before = evaluate(model, [atoms], compute_stress=True)
    frozen = model.freeze("a")
    lammps_module(frozen)  # compiling replaces submodules in place: must hit a copy
    after = evaluate(model, [atoms], compute_stress=True)
    for key, value in model.base_model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for key, value in model.adapter_state_dict("a").items():
        assert torch.equal(value, adapter[key]), key
    for key in ("energy", "forces", "stress"):
        assert torch.equal(before[key], after[key])
    assert all(type(m).__name__ != "FrozenMMEALinear" for m in model.base_model.modules())
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert sum(isinstance(m, FrozenMMEALinear) for m in frozen.modules()) == len(
        model.adapter_targets("a")
    )


def test_freeze_refuses_unknown_and_base_names(model):
    for name in ("nope", None, "base"):
        with pytest.raises(AdapterNotFoundError, match="loaded adapters"):
            model.freeze(name)


@pytest.mark.parametrize("kind", ["l1-residual-scaleshift", "scalar-plain-mace"])
def test_frozen_model_compiles_with_e3nn_jit(kind):
    hidden, residual, scale_shift = {
        "l1-residual-scaleshift": ("8x0e+8x1o", True, True),
        "scalar-plain-mace": ("8x0e", False, False),
    }[kind]
    model = adapted(hidden_irreps=hidden, residual=residual, scale_shift=scale_shift)
    compiled = e3nn_jit.compile(LAMMPS_MACE(model.freeze("a")))
    assert isinstance(compiled, torch.jit.ScriptModule)
    atoms = periodic()
    data = pair_mace_inputs(atoms, model.base_info)
    got = call_lammps(compiled, data, torch.ones(len(atoms), dtype=torch.bool))
    ref = reference(model, atoms)
    np.testing.assert_allclose(got["total_energy_local"][0], ref["energy"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(got["forces"], ref["forces"], rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------- LAMMPS convention
@pytest.mark.parametrize("periodic_box", [True, False])
def test_lammps_file_matches_the_calculator(model, lammps_file, periodic_box):
    atoms = periodic() if periodic_box else molecule()
    loaded = torch.jit.load(str(lammps_file))
    local = torch.ones(len(atoms), dtype=torch.bool)
    got = call_lammps(loaded, pair_mace_inputs(atoms, model.base_info), local)
    ref = reference(model, atoms)
    np.testing.assert_allclose(got["total_energy_local"][0], ref["energy"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(got["node_energy"], ref["energies"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(got["forces"], ref["forces"], rtol=0, atol=1e-8)
    assert np.abs(ref["forces"]).max() > 1e-2
    if periodic_box:
        np.testing.assert_allclose(got["virials"][0], ref["virials"], rtol=0, atol=1e-8)
        assert np.abs(ref["virials"]).max() > 1e-2
    # pair_mace reads the dtype from this attribute (left uninitialised if it is missing)
    assert dict(loaded.named_buffers())["model.node_embedding.linear.weight"].dtype == (
        torch.float64
    )


def test_lammps_ghost_atoms_count_only_locals(model, lammps_file):
    """Domain-decomposition mode: periodic images as explicit ghost nodes, masked out."""
    atoms = periodic(seed=4)
    reach = float(model.base_model.num_interactions) * float(model.base_model.r_max) + 0.5
    cluster, owner = with_ghosts(atoms, reach)
    n_local = len(atoms)
    assert len(cluster) > 4 * n_local  # really padded with ghosts
    data = pair_mace_inputs(cluster, model.base_info)
    data["cell"] = torch.tensor(atoms.cell.array)  # LAMMPS passes its box; no shifts anywhere
    local = torch.arange(len(cluster)) < n_local
    got = call_lammps(torch.jit.load(str(lammps_file)), data, local)
    ref = reference(model, atoms)
    np.testing.assert_allclose(got["total_energy_local"][0], ref["energy"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(got["node_energy"][:n_local], ref["energies"], rtol=0, atol=1e-8)
    folded = np.zeros((n_local, 3))  # LAMMPS' reverse communication: ghost forces to owners
    np.add.at(folded, owner, got["forces"])
    np.testing.assert_allclose(folded, ref["forces"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(got["virials"][0], ref["virials"], rtol=0, atol=1e-8)


def test_lammps_mask_sums_local_node_energies(model, lammps_file):
    atoms = periodic(seed=5)
    local = torch.zeros(len(atoms), dtype=torch.bool)
    local[::3] = True
    data = pair_mace_inputs(atoms, model.base_info)
    got = call_lammps(torch.jit.load(str(lammps_file)), data, local)
    ref = reference(model, atoms)
    expected = ref["energies"][local.numpy()].sum()
    np.testing.assert_allclose(got["total_energy_local"][0], expected, rtol=0, atol=1e-8)
    assert abs(expected - ref["energy"]) > 1e-2


def test_float32_export(model, tmp_path):
    path = tmp_path / "a32.pt"
    info = export_lammps(model, "a", path, dtype="float32")
    assert info["dtype"] == "float32"
    loaded = torch.jit.load(str(path))
    assert dict(loaded.named_buffers())["model.node_embedding.linear.weight"].dtype == (
        torch.float32
    )
    atoms = periodic()
    data = pair_mace_inputs(atoms, model.base_info, dtype=torch.float32)
    got = call_lammps(loaded, data, torch.ones(len(atoms), dtype=torch.bool))
    ref = reference(model, atoms)
    np.testing.assert_allclose(got["total_energy_local"][0], ref["energy"], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got["forces"], ref["forces"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["virials"][0], ref["virials"], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- ML-IAP
def test_mliap_export_round_trips_with_the_adapted_energy(model, tmp_path):
    path = tmp_path / "a-mliap.pt"
    info = export_mliap(model, "a", path)
    assert info["format"] == "mliap" and info["cuequivariance"] is False
    loaded = torch.load(path, weights_only=False)
    assert loaded.element_types == ["H", "C", "O"] and loaded.rcutfac == 2.0
    atoms = molecule()
    batch = mliap_batch(atoms, model.base_info)
    edges = batch["edge_index"]
    energy, node_energy, pair_forces = loaded.model(batch)
    ref = reference(model, atoms)
    energy = float(energy.detach())
    np.testing.assert_allclose(energy, ref["energy"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(node_energy.detach().numpy(), ref["energies"], atol=1e-8)
    # mace returns dE/d(vector) per edge (vector = receiver - sender), LAMMPS' sign convention
    forces = torch.zeros(len(atoms), 3, dtype=torch.float64)
    forces.index_add_(0, edges[1], -pair_forces).index_add_(0, edges[0], pair_forces)
    np.testing.assert_allclose(forces.detach().numpy(), ref["forces"], rtol=0, atol=1e-8)
    with model.disable_adapters():
        base_energy = float(evaluate(model, [atoms])["energy"].detach())
    assert abs(energy - base_energy) > 1e-2


# ---------------------------------------------------------------------------- refusals, files
def test_adapted_model_is_refused_where_adapters_would_be_lost(model, tmp_path):
    for bad in (model, torch.nn.ModuleDict({"model": model})):
        with pytest.raises(ExportError, match="AdaptedModel cannot be exported"):
            check_exportable(bad)
        with pytest.raises(ExportError, match="freeze"):
            lammps_module(bad)
    state = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="AdaptedModel"):
        e3nn_jit.compile(model)  # would script the shared base in place and drop the hooks
    assert all(not isinstance(m, torch.jit.ScriptModule) for m in model.base_model.children())
    assert all(torch.equal(v, state[k]) for k, v in model.base_model.state_dict().items())
    check_exportable(model.freeze("a"))
    with pytest.raises(ExportError, match=r"adapter name 'zz'.*loaded adapters: \['a', 'b'\]"):
        export_lammps(model, "zz", tmp_path / "x.pt")
    with pytest.raises(ExportError, match="take an AdaptedModel and an adapter name"):
        export_lammps(model.base_model, "a", tmp_path / "x.pt")
    with pytest.raises(ExportError, match=r"float16.*'float32', 'float64'"):
        export_lammps(model, "a", tmp_path / "x.pt", dtype="float16")
    with pytest.raises(ExportError, match=r"adapter 'a' belongs to head 'Default', not 'nope'"):
        export_lammps(model, "a", tmp_path / "x.pt", head="nope")
    with pytest.raises(ExportError, match="folder"):
        export_lammps(model, "a", tmp_path / "missing" / "x.pt")
    assert list(tmp_path.iterdir()) == []  # nothing written by refused exports


def test_export_sidecar_records_what_was_baked_in(model, lammps_file):
    info = json.loads(sidecar_path(lammps_file).read_text())
    assert info["adapter"] == "a" and info["format"] == "lammps" and info["dtype"] == "float64"
    assert info["base"]["fingerprint"] == model.fingerprint
    assert info["elements"] == ["H", "C", "O"] and info["atomic_numbers"] == [1, 6, 8]
    assert info["adapter_e0s_folded"] == {"1": 0.25, "8": -0.4}
    assert info["adapter_targets"] == model.adapter_targets("a")
    assert info["mmea_calc_version"] and info["mace_torch_version"]
    assert "pair_coeff      * * a.pt H C O" in info["lammps_input"]
    import hashlib

    assert info["sha256"] == hashlib.sha256(lammps_file.read_bytes()).hexdigest()
    with pytest.raises(ExportError, match="exists; pass overwrite"):
        export_lammps(model, "a", lammps_file)


def test_cli_export_writes_file_and_sidecar_and_refuses_overwrite(model, tmp_path, capsys):
    base_path = tmp_path / "base.model"
    torch.save(model.base_model, base_path)
    model.save_adapter("b", tmp_path / "adapter-b")
    out = tmp_path / "b.pt"
    args = ["export", "--base", str(base_path), "--adapter", str(tmp_path / "adapter-b")]
    args += ["--out", str(out), "--format", "lammps", "--dtype", "float64"]
    args += ["--elements", "H", "C", "O"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "pair_style      mace no_domain_decomposition\n" in stdout
    assert f"pair_coeff      * * {out} H C O" in stdout
    assert json.loads(sidecar_path(out).read_text())["adapter"] == "b"
    loaded = torch.jit.load(str(out))
    atoms = molecule()
    got = call_lammps(loaded, pair_mace_inputs(atoms, model.base_info), torch.ones(9, dtype=bool))
    model.set_adapter("b")
    want = float(evaluate(model, [atoms])["energy"].detach())
    model.set_adapter("a")
    np.testing.assert_allclose(got["total_energy_local"][0], want, rtol=0, atol=1e-8)
    stamp = out.stat().st_mtime_ns
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite", "--format", "mliap"]) == 0
    assert "pair_style      mliap unified" in capsys.readouterr().out
    assert json.loads(sidecar_path(out).read_text())["format"] == "mliap"


def test_export_is_atomic_on_failure(model, tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    path.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.jit, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_lammps(model, "a", path, overwrite=True)
    assert path.read_bytes() == b"old" and not sidecar_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_lammps_file_buffers_are_shared_not_copied(lammps_file):
    buffer = io.BytesIO(lammps_file.read_bytes())
    loaded = torch.jit.load(buffer)
    linear = loaded.model.node_embedding.linear
    assert linear.weight.data_ptr() == linear.linear.weight.data_ptr()


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "export_speed.py"
    spec = importlib.util.spec_from_file_location("_bench_export_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_on_a_tiny_stand_in_and_skips_without_assets(tmp_path, monkeypatch, capsys):
    bench = _benchmark()
    monkeypatch.setattr(bench, "MODEL", tmp_path / "absent.model")
    assert bench.main(["--out", str(tmp_path / "absent.json")]) == 0
    assert "absent" in capsys.readouterr().err and not (tmp_path / "absent.json").exists()
    torch.save(build_tiny_mace(), tmp_path / "tiny.model")
    monkeypatch.setattr(bench, "MODEL", tmp_path / "tiny.model")
    out = tmp_path / "speed.json"
    args = ["--molecules", "4", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    assert bench.main(args) == 0
    results = json.loads(out.read_text())
    (row,) = results["per_step"]
    assert row["atoms"] == 12 and row["adapted_ms"] > 0 and row["base_ms"] > 0
    assert row["energy_abs_diff_eV"] < 1e-8 and row["forces_max_abs_diff_eV_per_A"] < 1e-8
    assert results["command"] == "python benchmarks/export_speed.py " + " ".join(args)


def test_calibrated_gates_are_exported_with_their_ranges(tmp_path):
    from mmea_calc.train import calibrate_adapter

    model = adapted()
    randomize_adapter(model, "a", std=0.3, seed=7)
    calibrate_adapter(model, "a", [periodic(seed=s) for s in range(3)])
    squeezed = periodic(seed=9)
    squeezed.set_cell(squeezed.cell * 0.7, scale_atoms=True)  # outside: gates fade, saturate
    model.set_adapter("a")
    want = evaluate(model, [squeezed], compute_stress=True)
    assert want["adapter_extrapolation"].item() > 0.1
    got = evaluate(model.freeze("a"), [squeezed], compute_stress=True)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-10)
    model.set_gate_ranges("a", None)  # without the ranges the answer differs: the test can fail
    assert (evaluate(model, [squeezed])["forces"] - want["forces"]).abs().max() > 1e-4


def test_sidecar_never_describes_another_file(model, tmp_path, monkeypatch):
    import mmea_calc.export as export_module

    path = tmp_path / "a.pt"
    export_lammps(model, "a", path)
    old = json.loads(sidecar_path(path).read_text())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after the model file, before its sidecar

    monkeypatch.setattr(export_module, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        export_lammps(model, "a", path, dtype="float32", overwrite=True)
    assert path.is_file() and not sidecar_path(path).exists()
    assert old["dtype"] == "float64"


def test_elements_name_the_data_files_types_and_unknown_ones_are_refused(model, tmp_path):
    info = export_lammps(model, "a", tmp_path / "ho.pt", elements=["O", "H"])
    assert info["elements"] == ["O", "H"] and info["model_elements"] == ["H", "C", "O"]
    assert "pair_coeff      * * ho.pt O H" in info["lammps_input"]
    assert "mass            1 15.999" in info["lammps_input"]  # type 1 is oxygen here
    with pytest.raises(ExportError, match=r"elements \['Si'\] are not known.*knows \['H', 'C'"):
        export_lammps(model, "a", tmp_path / "x.pt", elements=["H", "Si"])
    with pytest.raises(ExportError, match=r"elements \['H'\] appear more than once"):
        export_lammps(model, "a", tmp_path / "x.pt", elements=["H", "O", "H"])
    assert not (tmp_path / "x.pt").exists()


def test_bare_base_exports_for_a_control_run(model, tmp_path, capsys):
    out = tmp_path / "bare.pt"
    base_path = tmp_path / "base.model"
    torch.save(model.base_model, base_path)
    template = tmp_path / "in.lammps"
    args = ["export", "--base", str(base_path), "--out", str(out), "--elements", "H", "O"]
    assert main([*args, "--input", str(template), "--data-file", "water.data"]) == 0
    assert "the bare base (no adapter)" in capsys.readouterr().out
    info = json.loads(sidecar_path(out).read_text())
    assert info["adapter"] is None and info["elements"] == ["H", "O"]
    text = template.read_text()
    assert "read_data       water.data" in text and "atom_modify     map yes" in text
    assert "pair_coeff      * * bare.pt H O" in text  # relative to the input's folder
    assert text.index("read_data") < text.index("mass ") < text.index("pair_style")
    atoms = molecule()
    loaded = torch.jit.load(str(out))
    got = call_lammps(loaded, pair_mace_inputs(atoms, model.base_info), torch.ones(9, dtype=bool))
    with model.disable_adapters():
        want = float(evaluate(model, [atoms])["energy"].detach())
    np.testing.assert_allclose(got["total_energy_local"][0], want, rtol=0, atol=1e-8)
    with pytest.raises(SystemExit):  # --elements is required: never a silent type mapping
        main(["export", "--base", str(base_path), "--out", str(out)])


def test_frozen_modules_pickled_before_the_fade_coefficients_still_load(tmp_path):
    """``export_mliap`` files are pickles: a FrozenMMEALinear saved before
    ``range_fade_coef``/``scalar_start`` existed gets both when it is loaded."""
    import copy

    from mmea_calc.adapter import RANGE_MIN_WIDTH
    from mmea_calc.train import calibrate_adapter

    model = adapted()
    randomize_adapter(model, "a", std=0.3, seed=7)
    calibrate_adapter(model, "a", [periodic(seed=s) for s in range(3)])
    squeezed = periodic(seed=9)
    squeezed.set_cell(squeezed.cell * 0.7, scale_atoms=True)  # outside: the fade matters
    frozen = model.freeze("a")
    want = evaluate(frozen, [squeezed], compute_stress=True)
    old = copy.deepcopy(frozen)
    for module in old.modules():
        if isinstance(module, FrozenMMEALinear):  # as an older mmea_calc pickled it
            span = (module.range_high - module.range_low).clamp_min(RANGE_MIN_WIDTH)
            module.register_buffer("range_inv_span", 1.0 / span)
            del module._buffers["range_fade_coef"]
            del module.__dict__["scalar_start"], module.__dict__["scalar_stop"]
    torch.save(old, tmp_path / "old.pt")
    loaded = torch.load(tmp_path / "old.pt", weights_only=False)
    assert all(
        m.range_fade_coef.shape == (m.down_bias.shape[0], 1)
        for m in loaded.modules()
        if isinstance(m, FrozenMMEALinear)
    )
    got = evaluate(loaded, [squeezed], compute_stress=True)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12)
