from __future__ import annotations

import pytest
import torch

from mmea_calc import AdaptedModel, MMEAConfig, fingerprint, load_base
from mmea_calc.errors import BaseModelError
from mmea_calc.testing import build_tiny_mace, evaluate, random_cluster


def test_load_from_file_frozen_eval_and_dtype(tmp_path, tiny_base):
    path = tmp_path / "tiny.model"
    torch.save(tiny_base.float(), path)
    base = load_base(path, dtype="float64")
    assert not base.training
    assert all(not p.requires_grad for p in base.parameters())
    assert all(p.dtype == torch.float64 for p in base.parameters())
    assert load_base(path).products[0].linear.weight.dtype == torch.float32


def test_fingerprint_is_dtype_stable_and_model_specific(tiny_base):

    f32 = build_tiny_mace(dtype=torch.float32)
    assert fingerprint(f32) == fingerprint(
        load_base(build_tiny_mace(dtype=torch.float32), dtype="float64")
    )
    assert fingerprint(build_tiny_mace(seed=1)) != fingerprint(build_tiny_mace(seed=0))
    # wrapping linears with adapters does not change the base fingerprint
    model = AdaptedModel(build_tiny_mace())
    before = fingerprint(model.base_model)
    model.add_adapter("a", MMEAConfig(rank=2))
    assert fingerprint(model.base_model) == before == model.fingerprint


def test_bad_sources(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist"):
        load_base(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(BaseModelError, match="could not read"):
        load_base(junk)
    torch.save({"a": 1}, tmp_path / "dict.model")
    with pytest.raises(BaseModelError, match=r"not a torch\.nn\.Module"):
        load_base(tmp_path / "dict.model")
    with pytest.raises(BaseModelError, match="dtype"):
        load_base(build_tiny_mace(), dtype="float16")
    with pytest.raises(BaseModelError, match="not supported"):
        load_base(42)


def test_real_spice_model(spice_model_path):
    base = load_base(spice_model_path, dtype="float64")
    assert type(base).__name__ == "ScaleShiftMACE"
    assert sum(p.numel() for p in base.parameters()) == 150_800
    model = AdaptedModel(base)
    model.add_adapter("a", MMEAConfig(rank=16))
    n = model.num_trainable_parameters("a")
    assert 0 < n < 0.1 * 150_800
    atoms = random_cluster(12, symbols=("H", "C", "N", "O"), seed=0)
    with model.disable_adapters():
        ref = evaluate(model, [atoms])
    got = evaluate(model, [atoms])
    assert torch.allclose(got["forces"], ref["forces"], atol=1e-12)


def test_a_module_is_frozen_in_place_and_never_moved():
    base = build_tiny_mace(dtype=torch.float32).to("meta")
    loaded = load_base(base)
    assert loaded is base
    assert {p.device.type for p in base.parameters()} == {"meta"}
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in base.parameters())


def test_importing_any_module_prints_nothing_on_stdout():
    import importlib.util
    import pkgutil
    import subprocess
    import sys

    import mmea_calc

    names = [m.name for m in pkgutil.iter_modules(mmea_calc.__path__, "mmea_calc.")]
    assert "mmea_calc.data" in names and "mmea_calc.testing" in names
    if importlib.util.find_spec("torch_sim") is None:  # it raises ImportError there by design
        names.remove("mmea_calc.torchsim")
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == ""


def test_installed_dependencies_satisfy_the_declared_ranges():
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    declared = {Requirement(r).name: Requirement(r) for r in requires("mmea-calc") or []}
    for name in ("mace-torch", "torch-ema", "e3nn"):
        assert name in declared, name
        assert declared[name].specifier.contains(version(name), prereleases=True), name
