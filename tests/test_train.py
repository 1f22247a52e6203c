from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _synthetic import label, one_molecule, teacher, teacher_data
from safetensors.torch import load_file

from mmea_calc import AdaptedModel, fingerprint
from mmea_calc.data import label_structures, labelled_graphs, reference_values
from mmea_calc.errors import ConfigError, DataError
from mmea_calc.testing import build_tiny_mace, random_cluster
from mmea_calc.train import (
    OutputExistsError,
    TrainConfig,
    error_metrics,
    fit_adapter,
    predict,
)


@pytest.fixture(scope="module")
def data():
    structures = teacher_data()
    return structures[:16], structures[16:]


def _valid_errors(module, valid):
    labelled = label_structures(valid)
    info = {"atomic_numbers": [1, 6, 8], "r_max": 4.0, "heads": ["Default"]}
    pred = predict(module, labelled_graphs(labelled, info))
    return error_metrics(pred, reference_values(labelled))


def test_short_fit_lowers_force_error_and_trains_only_adapter_tensors(data, tmp_path):
    train, valid = data
    model = AdaptedModel(build_tiny_mace())
    base_print = fingerprint(model.base_model)
    before = _valid_errors(model, valid)["forces_mae_meV_per_A"]
    with_grad: set[str] = set()

    def callback(record, module):
        with_grad.update(n for n, p in module.named_parameters() if p.grad is not None)

    config = TrainConfig(rank=4, epochs=10, lr=1e-2, batch_size=4)
    result = fit_adapter(
        model, train, valid, config, name="student", out_dir=tmp_path / "run", callback=callback
    )
    after = result.metrics["valid"]["forces_mae_meV_per_A"]
    # threshold: validation force MAE at least 60 % lower after 10 epochs
    assert after < 0.4 * before, (before, after)
    assert _valid_errors(model, valid)["forces_mae_meV_per_A"] == pytest.approx(after)
    # only this adapter's tensors had gradients; the base is bit-for-bit unchanged
    assert with_grad
    assert all(n.startswith("mmea_layers.") and ".gates.student." in n for n in with_grad)
    params = dict(model.named_parameters())
    assert sum(params[n].numel() for n in with_grad) == result.trainable_parameters
    assert result.trainable_parameters == model.num_trainable_parameters("student")
    assert fingerprint(model.base_model) == base_print
    # optimizer state exists for the adapter tensors only
    checkpoint = load_file(tmp_path / "run" / "checkpoint.safetensors")
    moments = [
        t for k, t in checkpoint.items() if k.startswith("optim/") and k.endswith("/exp_avg")
    ]
    assert sum(t.numel() for t in moments) == result.trainable_parameters
    # the adapter directory records environment, data hash and final metrics
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["environment"]["elements"] == ["H", "C", "O"]
    assert len(cfg["training"]["data"]["train_sha256"]) == 64
    assert cfg["training"]["metrics"]["valid"]["forces_mae_meV_per_A"] == pytest.approx(after)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_comparison_methods_train_and_export_the_trained_function(data, method):
    train, valid = data
    base = build_tiny_mace()
    base_print = fingerprint(base)
    before = _valid_errors(base, valid)["forces_mae_meV_per_A"]
    config = TrainConfig(method=method, rank=4, epochs=8, lr=1e-2, batch_size=4)
    result = fit_adapter(base, train, valid, config)
    after = result.metrics["valid"]
    assert after["forces_mae_meV_per_A"] < 0.8 * before
    expected = 4840 if method == "full" else None  # every weight of the tiny model
    if expected:
        assert result.trainable_parameters == expected
    else:
        assert 0 < result.trainable_parameters < 4840
    # the exported (LoRA-merged) MACE model with the E0 correction folded in is the same
    # function that was validated during training
    exported = _valid_errors(result.model, valid)
    for key, value in after.items():
        assert exported[key] == pytest.approx(value, rel=1e-7, abs=1e-9), key
    assert fingerprint(base) == base_print  # the caller's base is not modified


def _interrupt_after(epoch):
    def callback(record, module):
        if record["epoch"] == epoch:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("method", ["mmea", pytest.param("lora", marks=pytest.mark.slow)])
def test_resume_after_interruption_equals_uninterrupted_run(data, tmp_path, method):
    train, valid = data
    config = TrainConfig(method=method, rank=4, epochs=3, lr=1e-2, batch_size=4, seed=3)
    whole = fit_adapter(build_tiny_mace(), train, valid, config, out_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        fit_adapter(
            build_tiny_mace(), train, valid, config, out_dir=tmp_path / "b",
            callback=_interrupt_after(1),
        )  # fmt: skip
    stopped = json.loads((tmp_path / "b" / "training.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["epochs_completed"] == 1
    result_file = "adapter_model.safetensors" if method == "mmea" else "model.model"
    assert (tmp_path / "b" / result_file).is_file()  # the best so far was written
    resumed = fit_adapter(
        build_tiny_mace(), train, valid, config, out_dir=tmp_path / "b", resume=True
    )
    assert resumed.epochs_completed == whole.epochs_completed == 3
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in whole.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == strip
    assert resumed.e0s == whole.e0s
    if method == "mmea":
        a = load_file(tmp_path / "a" / result_file)
        b = load_file(tmp_path / "b" / result_file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:
        a, b = whole.model.state_dict(), resumed.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_data(data, tmp_path):
    train, valid = data
    config = TrainConfig(rank=2, epochs=1, batch_size=8)
    fit_adapter(build_tiny_mace(), train, valid, config, out_dir=tmp_path / "run")
    with pytest.raises(DataError, match="different"):
        fit_adapter(
            build_tiny_mace(), train[:-1], valid, config, out_dir=tmp_path / "run", resume=True
        )


def test_resume_accepts_a_checkpoint_written_before_presets(data, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    train, valid = data
    config = TrainConfig(rank=2, epochs=1, batch_size=8)
    fit_adapter(build_tiny_mace(), train, valid, config, out_dir=tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["mmea_checkpoint"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    old = meta["identity"]["config"]
    del old["preset"]  # what the previous version wrote: no preset, mace's LoRA alpha 1.0
    old["lora_alpha"] = 1.0
    save_file(tensors, str(path), metadata={"mmea_checkpoint": json.dumps(meta)})
    resumed = fit_adapter(
        build_tiny_mace(), train, valid, dataclasses.replace(config, epochs=2),
        out_dir=tmp_path / "run", resume=True,
    )  # fmt: skip
    assert resumed.epochs_completed == 2
    # a real difference is still refused: that checkpoint trained preset "gates"
    with pytest.raises(DataError, match="preset"):
        fit_adapter(
            build_tiny_mace(), train, valid, dataclasses.replace(config, preset="paper"),
            out_dir=tmp_path / "run", resume=True,
        )  # fmt: skip


def _mean_energy_error_per_atom(module, structures):
    labelled = label_structures(structures)
    info = {"atomic_numbers": [1, 6, 8], "r_max": 4.0, "heads": ["Default"]}
    pred = predict(module, labelled_graphs(labelled, info), forces=False)
    ref = reference_values(labelled)
    return float(np.mean((pred["energy"] - ref["energy"]) / ref["num_atoms"]) * 1000)


@pytest.mark.parametrize("method", ["mmea", "full"])
def test_constant_shift_per_atom_is_learned_without_leftover_offset(method):
    # one composition (as for one molecule's MD): the E0 fit must stay finite and sensible
    frames = label(teacher(std=0.05), one_molecule(20), shift_per_atom=0.2)
    train, valid = frames[:14], frames[14:]
    base_offset = _mean_energy_error_per_atom(build_tiny_mace(), valid)
    assert base_offset < -150  # the labels sit 200 meV/atom above the base
    config = TrainConfig(method=method, rank=4, epochs=4, lr=5e-3, batch_size=7)
    result = fit_adapter(build_tiny_mace(), train, valid, config)
    # bound: no leftover mean offset above 1 meV/atom (it was 200 meV/atom)
    assert abs(_mean_energy_error_per_atom(result.model, valid)) < 1.0
    assert result.metrics["valid"]["energy_mae_meV_per_atom"] < 2.0
    numbers = frames[0].numbers
    assert all(np.isfinite(v) and abs(v) < 1.0 for v in result.e0s.values())
    per_atom = sum(result.e0s[int(z)] for z in numbers) / len(numbers)
    assert per_atom == pytest.approx(-base_offset / 1000, abs=0.01)  # it absorbed the offset
    # without the E0 fit the same training leaves most of the offset in place
    keep = TrainConfig(method=method, rank=4, epochs=4, lr=5e-3, batch_size=7, fit_e0s=False)
    kept = fit_adapter(build_tiny_mace(), train, valid, keep)
    assert kept.e0s is None
    assert abs(_mean_energy_error_per_atom(kept.model, valid)) > 20.0


def test_stress_is_trained_when_present_even_in_mixed_batches():
    boxes = [random_cluster(10, cell=6.0, seed=s) for s in range(8)]
    molecules = [random_cluster(7, seed=40 + s) for s in range(6)]
    structures = label(teacher(), boxes + molecules)
    train = structures[:5] + structures[8:12]  # batches mix periodic boxes and molecules
    valid = structures[5:8] + structures[12:]
    config = TrainConfig(rank=4, epochs=3, lr=1e-2, batch_size=3, stress_weight=10.0)
    result = fit_adapter(build_tiny_mace(), train, valid, config)
    assert all(np.isfinite(h["loss"]) for h in result.history)
    first, last = result.history[0]["valid"], result.metrics["valid"]
    assert "stress_mae_meV_per_A3" in last and np.isfinite(last["stress_mae_meV_per_A3"])
    assert last["stress_rmse_meV_per_A3"] < first["stress_rmse_meV_per_A3"]


def test_early_stopping_and_output_protection(data, tmp_path):
    train, valid = data
    out = tmp_path / "run"
    config = TrainConfig(rank=2, epochs=40, lr=1e-12, batch_size=8, patience=2)
    result = fit_adapter(build_tiny_mace(), train, valid, config, out_dir=out)
    assert result.status == "early-stopped" and result.epochs_completed < 10
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        fit_adapter(build_tiny_mace(), train, valid, TrainConfig(rank=2, epochs=1), out_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = fit_adapter(
        build_tiny_mace(), train, valid, TrainConfig(rank=2, epochs=1), out_dir=out,
        overwrite=True,
    )  # fmt: skip
    assert again.epochs_completed == 1
    assert json.loads((out / "training.json").read_text())["epochs_completed"] == 1


def test_train_config_validation():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="adapterfusion")
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="loss weights"):
        TrainConfig(energy_weight=0, forces_weight=0, stress_weight=0)


def test_training_places_nothing_behind_the_callers_back():
    from mmea_calc.train import _prepare_model

    meta = build_tiny_mace(dtype=torch.float32).to("meta")
    model = _prepare_model(meta, TrainConfig(), "x")  # device/dtype None: left where it is
    assert model.base_model is meta and model.device.type == "meta"
    assert model.dtype == torch.float32
    adapted = AdaptedModel(build_tiny_mace(dtype=torch.float32))
    assert _prepare_model(adapted, TrainConfig(), "x") is adapted
    assert adapted.dtype == torch.float32
    _prepare_model(adapted, TrainConfig(dtype="float64"), "x")  # asked: converted
    assert adapted.dtype == torch.float64
    with pytest.raises(ConfigError, match="device 'gpu0'"):
        TrainConfig(device="gpu0")
