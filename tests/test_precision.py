"""Precision: a base's identity does not depend on the dtype it is served in (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmea_calc import AdaptedModel, MMEACalculator, MMEAConfig, fingerprint
from mmea_calc.errors import BaseModelMismatchError
from mmea_calc.identity import fingerprints
from mmea_calc.io import CONFIG_NAME
from mmea_calc.testing import build_tiny_mace, evaluate, random_cluster, randomize_adapter


def _saved(tmp_path, dtype):
    model = AdaptedModel(build_tiny_mace(dtype=dtype))
    model.add_adapter("a", MMEAConfig(rank=4), e0s={1: 0.1, 8: -0.2})
    randomize_adapter(model, "a", std=0.1)
    frames = [random_cluster(10, cell=6.0, seed=s) for s in range(3)]
    model.calibrate_adapter("a", [_batch(model, frames)])
    path = tmp_path / f"a-{dtype}"
    model.save_adapter("a", path)
    return model, path


def _batch(model, frames):
    from mmea_calc.data import atoms_to_graph, collate

    return collate([atoms_to_graph(a, model.base_info) for a in frames], dtype=model.dtype)


def test_fingerprint_is_the_same_in_float32_and_float64():
    f64 = build_tiny_mace(dtype=torch.float64)
    assert fingerprint(f64) == fingerprint(build_tiny_mace(dtype=torch.float64).float())
    assert fingerprint(f64) != fingerprint(build_tiny_mace(seed=1))


@pytest.mark.parametrize(("trained", "served"), [("float64", "float32"), ("float32", "float64")])
def test_adapter_serves_in_the_other_precision(tmp_path, trained, served):
    model, path = _saved(tmp_path, getattr(torch, trained))
    other = AdaptedModel(build_tiny_mace(dtype=getattr(torch, trained)), dtype=served)
    assert other.dtype == getattr(torch, served)
    other.load_adapter(path)
    atoms = random_cluster(10, cell=6.0, seed=7)
    ref = evaluate(model, [atoms], compute_stress=True)
    got = evaluate(other, [atoms], compute_stress=True)
    assert got["energy"].dtype == getattr(torch, served)
    # float32 rounding of ~1e-7 relative, not the adapter missing (it moves energies by ~1e-1)
    bare = evaluate(AdaptedModel(build_tiny_mace(dtype=torch.float64)), [atoms])
    assert abs(float(ref["energy"].detach()) - float(bare["energy"].detach())) > 1e-3
    assert torch.allclose(got["energy"].double(), ref["energy"].double(), rtol=0, atol=1e-4)
    assert torch.allclose(got["forces"].double(), ref["forces"].double(), rtol=0, atol=1e-4)


def test_gate_ranges_load_to_the_last_digit_in_float64(tmp_path):
    model, path = _saved(tmp_path, torch.float64)
    other = AdaptedModel(build_tiny_mace())
    other.load_adapter(path)
    for target in model.adapter_targets("a"):
        mine, theirs = model.layer(target).gates["a"], other.layer(target).gates["a"]
        for key in ("range_low", "range_high", "logit_low", "logit_high"):
            if getattr(mine, key) is not None:
                assert torch.equal(getattr(mine, key), getattr(theirs, key)), (target, key)


def test_files_written_before_version_2_load_in_their_own_dtype_only(tmp_path):
    _model, path = _saved(tmp_path, torch.float64)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    base = build_tiny_mace(dtype=torch.float64)
    legacy = (fingerprints(base) - {fingerprint(base)}).pop()  # version 1: float64 hashing
    cfg["base"]["fingerprint"] = legacy
    del cfg["base"]["fingerprint_version"]
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    assert AdaptedModel(base).load_adapter(path) == "a"  # same dtype: accepted
    with pytest.raises(BaseModelMismatchError, match="load it in that dtype"):
        AdaptedModel(build_tiny_mace(dtype=torch.float64), dtype="float32").load_adapter(path)


def test_to_refreshes_identity_and_revision():
    model = AdaptedModel(build_tiny_mace())
    model.add_adapter("a", MMEAConfig(rank=2))
    info, revision = model.base_info, model.revision
    model.to(dtype=torch.float32)
    assert model.dtype == torch.float32 and model.revision > revision
    assert model.base_info is not info and model.fingerprint == info["fingerprint"]
    assert model.layer(model.adapter_targets("a")[0]).gates["a"].down.weight.dtype == torch.float32


def test_embedded_adapters_serve_in_float32():
    atoms = random_cluster(12, ("H", "O"), cell=8.0, seed=3)
    results = {}
    for dtype in ("float64", "float32"):
        calc = MMEACalculator(base="embedded", adapters="embedded", default_dtype=dtype)
        calc.set_adapter("water")
        atoms.calc = calc
        results[dtype] = (atoms.get_potential_energy(), atoms.get_forces())
    assert calc.dtype == torch.float32
    assert abs(results["float32"][0] - results["float64"][0]) / len(atoms) < 1e-4
    assert np.abs(results["float32"][1] - results["float64"][1]).max() < 1e-3


def test_cli_exports_the_embedded_base_in_float32(tmp_path, capsys):
    from mmea_calc.base_format import embedded_adapter_dirs
    from mmea_calc.cli import main
    from mmea_calc.export import sidecar_path

    out = tmp_path / "water32.pt"
    water = next(p for p in embedded_adapter_dirs() if p.name == "water")
    args = ["export", "--adapter", str(water), "--base", "embedded", "--out", str(out)]
    args += ["--dtype", "float32", "--elements", "H", "O"]
    assert main(args) == 0
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["dtype"] == "float32" and out.is_file()
