from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from _synthetic import teacher_data

from mmea_calc.cli import main
from mmea_calc.testing import build_tiny_mace, random_cluster
from mmea_calc.train import TrainConfig, fit_adapter

ROOT = Path(__file__).resolve().parents[1]  # subprocesses import mmea_calc from the checkout
METRIC_KEYS = {
    "n_structures",
    "energy_mae_meV_per_atom",
    "energy_rmse_meV_per_atom",
    "forces_mae_meV_per_A",
    "forces_rmse_meV_per_A",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.save(build_tiny_mace(), root / "base.model")
    data = teacher_data(n=20)
    ase.io.write(root / "train.xyz", data[:14])
    ase.io.write(root / "valid.xyz", data[14:])
    alien = random_cluster(6, ("H", "Si"), seed=1)
    alien.info["REF_energy"] = -1.0
    alien.arrays["REF_forces"] = np.zeros((6, 3))
    ase.io.write(root / "alien.xyz", [alien, alien])
    (root / "empty.xyz").write_text("")
    return {name: str(root / f"{name}.{ext}") for name, ext in [
        ("base", "model"), ("train", "xyz"), ("valid", "xyz"), ("alien", "xyz"),
        ("empty", "xyz"),
    ]}  # fmt: skip


def _finetune(files, out, *extra):
    args = ["finetune", "--base", files["base"], "--train", files["train"]]
    args += ["--valid", files["valid"], "--out", str(out), "--rank", "4", "--epochs", "3"]
    return main([*args, "--lr", "1e-2", "--batch-size", "7", *extra])


def test_finetune_eval_round_trip_agrees_with_calculator(files, tmp_path, capsys):
    from mmea_calc.calculator import MMEACalculator

    out = tmp_path / "tiny.v1"
    assert _finetune(files, out) == 0
    table = capsys.readouterr().out
    assert "trainable parameters" in table and "valid" in table and "F MAE" in table
    report, plot = tmp_path / "metrics.json", tmp_path / "parity.png"
    args = ["eval", "--base", files["base"], "--adapter", str(out), "--data", files["valid"]]
    assert main([*args, "--json", str(report), "--plot", str(plot)]) == 0
    metrics = json.loads(report.read_text())
    assert set(metrics) == METRIC_KEYS  # no stress keys: the data has no stress
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same numbers through the ASE calculator (auto-selection by the stored environment)
    calc = MMEACalculator(files["base"], adapters=[str(out)], select="auto")
    de, df = [], []
    for atoms in ase.io.read(files["valid"], ":"):
        ref_e, ref_f = atoms.info["REF_energy"], atoms.arrays["REF_forces"]
        atoms.calc = calc
        de.append((atoms.get_potential_energy() - ref_e) / len(atoms) * 1000)
        df.append((atoms.get_forces() - ref_f).ravel() * 1000)
        assert calc.results["adapter"] == "tiny_v1"  # --name defaults to the folder's name
    de, df = np.array(de), np.concatenate(df)
    assert metrics["n_structures"] == len(de) == 6
    assert metrics["energy_mae_meV_per_atom"] == pytest.approx(np.abs(de).mean(), rel=1e-6)
    assert metrics["energy_rmse_meV_per_atom"] == pytest.approx(np.sqrt((de**2).mean()), rel=1e-6)
    assert metrics["forces_mae_meV_per_A"] == pytest.approx(np.abs(df).mean(), rel=1e-6)
    assert metrics["forces_rmse_meV_per_A"] == pytest.approx(np.sqrt((df**2).mean()), rel=1e-6)
    # and '--json -' prints exactly that object on stdout, nothing else
    capsys.readouterr()
    assert main([*args, "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics)


@pytest.mark.parametrize("method", ["mmea", "lora"])
def test_info_json_reports_the_tensors_trained(files, tmp_path, capsys, method):
    counted = []

    def callback(record, module):
        counted.append(sum(p.numel() for p in module.parameters() if p.grad is not None))

    out = tmp_path / method
    config = TrainConfig(method=method, rank=4, epochs=1, batch_size=7)
    result = fit_adapter(
        files["base"], files["train"], files["valid"], config, out_dir=out, callback=callback
    )
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method
    assert info["trainable_parameters"] == counted[0] == result.trainable_parameters > 0
    assert info["elements"] == ["H", "C", "O"]
    if method == "lora":
        # OUT/model.model is mace's format: readable by MACECalculator, with the E0s folded in
        from mace.calculators import MACECalculator

        from mmea_calc.data import label_structures, labelled_graphs
        from mmea_calc.train import predict

        atoms = ase.io.read(files["valid"], 0)
        atoms.calc = MACECalculator(
            model_paths=str(out / "model.model"), device="cpu", default_dtype="float64"
        )
        graphs = labelled_graphs(
            label_structures([atoms]),
            {"atomic_numbers": [1, 6, 8], "r_max": 4.0, "heads": ["Default"]},
        )
        assert atoms.get_potential_energy() == pytest.approx(
            predict(result.model, graphs)["energy"][0], rel=1e-10
        )
        folded = atoms.calc.models[0].atomic_energies_fn.atomic_energies
        base = build_tiny_mace().atomic_energies_fn.atomic_energies
        shift = [result.e0s[z] for z in (1, 6, 8)]
        assert torch.allclose(folded - base, torch.tensor(shift, dtype=folded.dtype))
        assert main(["eval", "--base", str(out / "model.model"), "--data", files["valid"],
                     "--json", "-"]) == 0  # fmt: skip
        via_cli = json.loads(capsys.readouterr().out)
        assert via_cli["forces_mae_meV_per_A"] == pytest.approx(
            result.metrics["valid"]["forces_mae_meV_per_A"], rel=1e-6
        )


def test_info_json_stdout_is_clean_in_a_fresh_process(files):
    done = subprocess.run(
        [sys.executable, "-m", "mmea_calc.cli", "info", files["base"], "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)  # the whole of stdout is one JSON object
    assert info["method"] == "base" and info["trainable_parameters"] == 0
    assert info["parameters"] == sum(p.numel() for p in build_tiny_mace().parameters())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--train": "missing.xyz"}, "does not exist"),
        ({"--forces-key": "DFT_forces"}, "no forces under key 'DFT_forces'"),
        ({"--train": "alien"}, "not known to the base model"),
        ({"--train": "empty"}, "empty"),
        ({"--valid": "empty"}, "empty"),
    ],
    ids=["missing-file", "no-forces-key", "unknown-element", "empty-train", "empty-valid"],
)
def test_finetune_bad_input_one_line_and_nothing_written(files, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    args = {"--base": files["base"], "--train": files["train"], "--valid": files["valid"]}
    for key, value in change.items():
        args[key] = files.get(value, str(tmp_path / value)) if key != "--forces-key" else value
    argv = ["finetune", *[x for kv in args.items() for x in kv], "--out", str(out)]
    assert main([*argv, "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmea-calc: error:") and "\n" not in err and message in err
    assert not out.exists()


def test_eval_bad_input_writes_nothing(files, tmp_path, capsys):
    report = tmp_path / "m.json"
    argv = ["eval", "--base", files["base"], "--data", files["alien"], "--json", str(report)]
    assert main(argv) == 2
    assert "not known to the base model" in capsys.readouterr().err
    assert not report.exists()
    argv = ["eval", "--base", str(tmp_path / "none.model"), "--data", files["valid"]]
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err


def test_existing_output_needs_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _finetune(files, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert _finetune(files, out, "--overwrite", "--epochs", "1") == 0
    assert (out / "notes.txt").read_text() == "keep me"  # only our own files are replaced
    assert main(["info", str(out)]) == 0
    assert "mmea" in capsys.readouterr().out


@pytest.mark.slow
def test_sigint_writes_the_best_adapter_so_far(files, tmp_path):
    from mmea_calc import AdaptedModel

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "mmea_calc.cli", "--threads", "1", "finetune"]
    argv += ["--base", files["base"], "--train", files["train"], "--valid", files["valid"]]
    argv += ["--out", str(out), "--rank", "4", "--epochs", "1000", "--batch-size", "7"]
    # A shell starts background jobs with SIGINT ignored, the child inherits that and Python then
    # installs no KeyboardInterrupt handler: give the child the default disposition back.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    training = json.loads((out / "training.json").read_text())
    assert training["status"] == "interrupted" and 1 <= training["epochs_completed"] < 1000
    model = AdaptedModel(build_tiny_mace())
    assert model.load_adapter(out) == "run"  # a complete, valid adapter directory


def test_verbose_shows_the_traceback_of_a_library_error(files, tmp_path, capsys):
    argv = ["eval", "--base", str(tmp_path / "none.model"), "--data", files["valid"]]
    assert main(["-v", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "BaseModelError" in err
    assert err.strip().splitlines()[-1].startswith("mmea-calc: error:")
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err  # without -v: one line


def test_calibrate_records_the_ranges_of_an_older_adapter(files, tmp_path, capsys):
    import warnings

    from mmea_calc import AdaptedModel, MMEAConfig
    from mmea_calc.errors import UncalibratedAdapterWarning

    model = AdaptedModel(torch.load(files["base"], weights_only=False))
    model.add_adapter("old", MMEAConfig(rank=2))
    model.save_adapter("old", tmp_path / "old")  # never calibrated: like a file from 0.1
    argv = ["calibrate", str(tmp_path / "old"), "--base", files["base"], "--data", files["train"]]
    assert main(argv) == 0
    assert "recorded gate ranges" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedAdapterWarning)  # no warning any more
        loaded = AdaptedModel(torch.load(files["base"], weights_only=False))
        loaded.load_adapter(tmp_path / "old")
    assert loaded.is_calibrated("old")
    assert main(["info", str(tmp_path / "old"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["calibrated"] is True and described["routing_statistics"] is True
    assert loaded.neighbourhood_statistics("old")  # per-atom routing can use it now
    assert main(["calibrate", str(tmp_path / "old"), "--base", files["base"],
                 "--data", str(tmp_path / "none.xyz")]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


def test_ctrl_c_before_the_first_epoch_says_nothing_was_written(files, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    from mmea_calc import _trainer

    def interrupted(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(_trainer.Loop, "_train_epoch", interrupted)
    out = tmp_path / "run"
    assert _finetune(files, out) != 0
    err = capsys.readouterr().err
    assert "nothing was written" in err and "best result so far" not in err
    assert not out.exists() or not any(out.iterdir())
