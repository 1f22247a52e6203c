from __future__ import annotations

import json
import os

import pytest
import torch

import mmea_calc.base_format as base_format
from mmea_calc import AdaptedModel, MMEAConfig, fingerprint, load_base
from mmea_calc.base_format import read_base_dir, write_base_dir
from mmea_calc.cli import main
from mmea_calc.errors import BaseFormatError, EmbeddedAssetsMissingError, OutputExistsError
from mmea_calc.testing import build_tiny_mace, evaluate, random_cluster, randomize_adapter

# (hidden irreps, residual, scale_shift, dtype): l>0 and scalar-only, both interaction kinds,
# both model classes, both dtypes
CASES = {
    "l1-residual-scaleshift-f32": ("8x0e+8x1o", True, True, torch.float32),
    "scalar-plain-mace-f64": ("8x0e", False, False, torch.float64),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One written base dir per case: {case: (original model, directory, model read back)}."""
    out = {}
    for case, (hidden, residual, scale_shift, dtype) in CASES.items():
        model = build_tiny_mace(hidden, residual=residual, scale_shift=scale_shift, dtype=dtype)
        directory = write_base_dir(model, tmp_path_factory.mktemp(case) / "base")
        out[case] = (model, directory, read_base_dir(directory))
    return out


def _same_outputs(a, b, atoms, stress=False):
    """Equal up to rounding noise: TorchScript's profiling executor may change the last bit
    between a module's first calls (the same pickle loaded twice differs by ~1e-16 in float64)."""
    out_a = evaluate(a, [atoms], compute_stress=stress)
    out_b = evaluate(b, [atoms], compute_stress=stress)
    tol = 1e-12 if out_a["energy"].dtype == torch.float64 else 1e-5
    keys = ["energy", "forces"] + (["stress"] if stress else [])
    return all(torch.allclose(out_a[k], out_b[k], rtol=tol, atol=tol) for k in keys)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact(written, case):
    model, directory, rebuilt = written[case]
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():  # not mkstemp's 0600: shipped files must be readable
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert type(rebuilt) is type(model)
    assert next(rebuilt.parameters()).dtype == CASES[case][3]
    assert fingerprint(rebuilt) == fingerprint(model)
    assert _same_outputs(model, rebuilt, random_cluster(10, seed=3))
    box = random_cluster(12, cell=6.0, seed=4)
    assert _same_outputs(model, rebuilt, box, stress=True)
    config = json.loads((directory / "config.json").read_text())
    assert config["config"]["hidden_irreps"] == CASES[case][0]
    assert config["model_class"] == type(model).__name__


def test_adapter_moves_between_pickle_and_safe_base(written, tmp_path):
    model, directory, _ = written["l1-residual-scaleshift-f32"]
    adapted = AdaptedModel(load_base(model, dtype="float64"))
    adapted.add_adapter("env", MMEAConfig(rank=2))
    randomize_adapter(adapted, "env", std=0.2)
    adapted.save_adapter("env", tmp_path / "env")
    frozen = load_base(directory, dtype="float64")  # load_base reads base dirs, frozen
    assert not any(p.requires_grad for p in frozen.parameters())
    other = AdaptedModel(frozen)
    other.load_adapter(tmp_path / "env")  # fingerprints agree, so the adapter is accepted
    atoms = random_cluster(8, seed=5)
    forces = [evaluate(m, [atoms])["forces"] for m in (adapted, other)]
    assert torch.allclose(*forces, rtol=1e-12, atol=1e-12)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if key in document["config"]:
            document["config"][key] = value
        else:
            document[key] = value
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model_class": "os.system"}, "model_class 'os.system' is not allowed"),
        ({"interaction_cls": "Evil"}, "interaction_cls 'Evil' is not allowed"),
        ({"gate": "print"}, "gate 'print' is not allowed"),
        ({"readout_cls": "LinearDipoleReadoutBlock"}, "readout_cls .* is not allowed"),
        ({"format_version": 99}, "format_version 99"),
        ({"tensors_sha256": "0" * 64}, "corrupt"),
        ({"hidden_irreps": "6x0e"}, "do not fit"),
        ({"dtype": "float16"}, "dtype 'float16'"),
    ],
)
def test_bad_configs_are_refused(written, tmp_path, changes, match):
    import shutil

    directory = tmp_path / "base"
    shutil.copytree(written["scalar-plain-mace-f64"][1], directory)
    _edit_config(directory, **changes)
    with pytest.raises(BaseFormatError, match=match):
        read_base_dir(directory)


def test_bad_dirs_and_models(written, tmp_path):
    with pytest.raises(BaseFormatError, match="does not exist"):
        read_base_dir(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(BaseFormatError, match=r"model\.safetensors is missing"):
        load_base(tmp_path / "half")
    model, directory, _ = written["scalar-plain-mace-f64"]
    with pytest.raises(OutputExistsError, match="not empty"):
        write_base_dir(model, directory)
    with pytest.raises(BaseFormatError, match="not supported by the safe base format"):
        write_base_dir(AdaptedModel(model), tmp_path / "adapted")
    assert not (tmp_path / "adapted").exists()


def test_embedded_base(monkeypatch, tmp_path, written):
    monkeypatch.setattr(base_format, "EMBEDDED_DIR", tmp_path)
    with pytest.raises(EmbeddedAssetsMissingError, match="no embedded base model"):
        load_base("embedded")
    with pytest.raises(EmbeddedAssetsMissingError, match="no embedded adapters"):
        base_format.embedded_adapter_dirs()
    model, directory, _ = written["scalar-plain-mace-f64"]
    import shutil

    shutil.copytree(directory, tmp_path / "base")
    assert fingerprint(load_base("embedded")) == fingerprint(model)


def test_cli_convert_base(tmp_path, capsys):
    model = build_tiny_mace("8x0e", residual=False, scale_shift=False)
    torch.save(model, tmp_path / "tiny.model")
    out = tmp_path / "safe"
    assert main(["convert-base", str(tmp_path / "tiny.model"), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    before = (out / "config.json").read_bytes()
    assert main(["convert-base", str(tmp_path / "tiny.model"), str(out)]) == 2  # no overwrite
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert (out / "config.json").read_bytes() == before
    (tmp_path / "junk.model").write_bytes(b"junk")
    assert main(["convert-base", str(tmp_path / "junk.model"), str(tmp_path / "o2")]) == 2
    assert "could not read" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert main(["info", str(out), "--json"]) == 0  # reads the base dir back
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "base" and info["fingerprint"] == fingerprint(model)


@pytest.mark.slow
@pytest.mark.shared
def test_spice_model_round_trip(spice_model_path, tmp_path):
    model = load_base(spice_model_path)
    directory = write_base_dir(model, tmp_path / "spice")
    rebuilt = load_base(directory)
    assert fingerprint(rebuilt) == fingerprint(model)
    atoms = random_cluster(12, symbols=("H", "C", "N", "O"), seed=0)
    assert _same_outputs(model, rebuilt, atoms)
