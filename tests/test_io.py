from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mmea_calc import AdaptedModel, MMEAConfig
from mmea_calc.errors import AdapterFormatError, BaseModelMismatchError
from mmea_calc.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes
from mmea_calc.testing import build_tiny_mace, evaluate, random_cluster, randomize_adapter


@pytest.fixture
def saved(tmp_path):
    model = AdaptedModel(build_tiny_mace())
    model.add_adapter("water", MMEAConfig(rank=4, phi="1+x"), e0s={1: 0.25, 8: -0.5})
    randomize_adapter(model, "water", std=0.1)
    path = tmp_path / "water"
    model.save_adapter("water", path, environment={"elements": ["H", "O"]})
    return model, path


def test_round_trip_into_fresh_base_under_another_name(saved):
    model, path = saved
    atoms = random_cluster(12, cell=6.0, seed=4)
    ref = evaluate(model, [atoms], compute_stress=True)
    fresh = AdaptedModel(build_tiny_mace())  # a new load of the same base
    name = fresh.load_adapter(path, name="liquid")
    assert name == "liquid" and fresh.active_adapter == "liquid"
    got = evaluate(fresh, [atoms], compute_stress=True)
    # not bit-for-bit: e3nn's TorchScript kernels change the last bits between a model's first
    # and later calls (~1e-18 here), so the same model does not reproduce itself bitwise either
    for key in ("energy", "forces", "stress"):
        assert torch.allclose(got[key], ref[key], rtol=0, atol=1e-12), key
    assert fresh.adapter_e0s("liquid") == {1: 0.25, 8: -0.5}
    assert fresh.adapter_metadata("liquid")["environment"] == {"elements": ["H", "O"]}
    assert fresh.adapter_config("liquid").phi == "1+x"
    assert fresh.load_adapter(path) == "water"  # default: the name stored in the config


def test_file_holds_only_adapter_tensors(saved):
    model, path = saved
    tensors = load_file(path / WEIGHTS_NAME)
    assert set(tensors) == set(model.adapter_state_dict("water"))
    assert sum(t.numel() for t in tensors.values()) == model.num_trainable_parameters("water")
    base_keys = set(model.base_model.state_dict())
    assert not any(k in base_keys for k in tensors)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 1 and cfg["method"] == "mmea" and cfg["rank"] == 4
    assert cfg["base"]["fingerprint"] == model.fingerprint
    assert (path / CONFIG_NAME).read_text() == json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def test_other_base_is_refused(saved):
    _, path = saved
    other = AdaptedModel(build_tiny_mace(seed=1))
    with pytest.raises(BaseModelMismatchError, match="trained on base model"):
        other.load_adapter(path)
    assert other.adapter_names == []


def _edit_config(path, **changes):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:-40]),
            "corrupt",
        ),
        (lambda p: (p / CONFIG_NAME).write_text('{"format_version": 1,'), "not valid JSON"),
        (lambda p: (p / WEIGHTS_NAME).unlink(), "adapter_model.safetensors is missing"),
        (lambda p: _edit_config(p, format_version=99), "format_version 99"),
        (lambda p: _edit_config(p, rank=5), "has shape"),
        (lambda p: _edit_config(p, tensors_sha256="0" * 64), "corrupt"),
    ],
    ids=["truncated", "bad-json", "missing", "version", "shape", "checksum"],
)
def test_damaged_files_are_refused(saved, damage, match):
    _, path = saved
    damage(path)
    fresh = AdaptedModel(build_tiny_mace())
    with pytest.raises(AdapterFormatError, match=match):
        fresh.load_adapter(path)
    assert fresh.adapter_names == []  # nothing half-loaded


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        AdaptedModel(build_tiny_mace()).load_adapter(tmp_path / "nope")


def test_atomic_write_keeps_old_file_on_crash(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left


def test_logit_bound_round_trips_and_old_files_load_unbounded(saved, tmp_path):
    model, path = saved
    assert model.adapter_config("water").logit_bound == 10.0
    cfg = json.loads((path / CONFIG_NAME).read_text())
    assert cfg["logit_bound"] == 10.0
    del cfg["logit_bound"]  # as written before the bound existed
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    fresh = AdaptedModel(build_tiny_mace())
    assert fresh.adapter_config(fresh.load_adapter(path)).logit_bound is None


# ---------------------------------------------------------------------------- reliability
def test_overwriting_an_adapter_is_old_or_new_never_a_mix(saved, tmp_path, monkeypatch):
    import mmea_calc.io as io_module

    model, path = saved
    before = {k: v.clone() for k, v in model.adapter_state_dict("water").items()}
    randomize_adapter(model, "water", std=0.2, seed=9)  # new tensors for the same adapter

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stopped between the tensors and the config

    monkeypatch.setattr(io_module, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter("water", path)
    monkeypatch.undo()
    fresh = AdaptedModel(build_tiny_mace())
    fresh.load_adapter(path)  # the old adapter, whole: its checksum matches
    for key, value in fresh.adapter_state_dict("water").items():
        assert torch.equal(value, before[key]), key
    model.save_adapter("water", path)  # a complete write: the new one, and no backup left
    again = AdaptedModel(build_tiny_mace())
    again.load_adapter(path)
    new = model.adapter_state_dict("water")
    assert all(torch.equal(v, new[k]) for k, v in again.adapter_state_dict("water").items())
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_a_failed_load_of_any_kind_leaves_the_model_as_it_was(saved, monkeypatch):
    _, path = saved
    model = AdaptedModel(build_tiny_mace())
    model.add_adapter("other", MMEAConfig(rank=2))
    layers_before = sorted(model.mmea_layers)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AdaptedModel, "_copy_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.load_adapter(path)
    assert model.adapter_names == ["other"] and sorted(model.mmea_layers) == layers_before
    assert all(list(model.mmea_layers[k].gates) == ["other"] for k in model.mmea_layers)
