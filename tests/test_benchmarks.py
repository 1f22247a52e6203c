"""The benchmark scripts: they run end to end on a tiny stand-in, resume, skip without assets,
and the report's goal check counts what it says it counts."""

from __future__ import annotations

import copy
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import ase.io
import pytest
import torch
from _synthetic import teacher_data

from mmea_calc.testing import build_tiny_mace

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """Import ``benchmarks/<name>.py`` as a module (registered, so worker processes find it)."""
    module_name = f"_bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture
def toy_rmd17(tmp_path, monkeypatch):
    """A tiny base .model and an rMD17-shaped folder ``toy/{train,valid,test}.xyz``."""
    accuracy = _load("accuracy")
    torch.save(build_tiny_mace(), tmp_path / "base.model")
    data = teacher_data(n=16)
    folder = tmp_path / "rmd17" / "toy"
    folder.mkdir(parents=True)
    ase.io.write(folder / "train.xyz", data[:8])
    ase.io.write(folder / "valid.xyz", data[8:12])
    ase.io.write(folder / "test.xyz", data[12:])
    monkeypatch.setattr(accuracy, "MODEL", tmp_path / "base.model")
    monkeypatch.setattr(accuracy, "RMD17", tmp_path / "rmd17")
    return accuracy


def test_accuracy_runs_every_method_and_resumes(toy_rmd17, tmp_path, monkeypatch):
    accuracy = toy_rmd17
    out, png = tmp_path / "my results" / "acc.json", tmp_path / "acc.png"  # a space to quote
    out.parent.mkdir()
    args = [
        "--epochs",
        "1",
        "--molecules",
        "toy",
        "--methods",
        "base,mmea-r8,mmea-paper-r4,lora-r4",
    ]
    args += ["--threads", "1", "--jobs", "2", "--out", str(out), "--plot", str(png)]
    assert accuracy.main(args) == 0
    results = json.loads(out.read_text())
    jobs = results["datasets"]["rmd17-toy"]
    assert set(jobs) == {"base", "mmea-r8", "mmea-paper-r4", "lora-r4"}
    assert jobs["base"]["trainable_parameters"] == 0
    assert jobs["mmea-r8"]["trainable_parameters"] > 0
    assert jobs["mmea-paper-r4"]["preset"] == "paper"
    assert jobs["mmea-paper-r4"]["trainable_parameters"] > jobs["mmea-r8"]["trainable_parameters"]
    assert (jobs["mmea-r8"]["n_train"], jobs["mmea-r8"]["n_valid"]) == (8, 4)  # protocol 100/50
    assert jobs["lora-r4"]["trainable_parameters"] > 0
    for res in jobs.values():
        test = res["tests"]["test"]
        assert test["n_structures"] == 4
        assert test["forces_mae_meV_per_A"] > 0
        assert res["peak_rss_mib"] > 10
    assert results["setup"]["epochs"] == 1
    assert png.stat().st_size > 1000

    # A re-run skips finished jobs: nothing is trained again.
    def boom(*_args, **_kwargs):
        raise AssertionError("a finished job ran again")

    job = accuracy._job
    monkeypatch.setattr(accuracy, "_job", boom)
    png.unlink()
    assert accuracy.main([*args, "--jobs", "1"]) == 0
    again = json.loads(out.read_text())
    assert again == results  # datasets and the recorded command/setup unchanged
    assert png.is_file()  # re-plotted

    # Finishing a file with another schedule would mix epochs: refused, nothing changed.
    with pytest.raises(SystemExit, match="1-epoch results"):
        accuracy.main([*args, "--epochs", "2", "--methods", "base,mmea-r16"])
    assert json.loads(out.read_text()) == results

    # Adding a method with LoRA's alpha set: trained with it, both commands on record.
    monkeypatch.setattr(accuracy, "_job", job)
    more = [*args[:4], "--methods", "lora-r4-a4", "--threads", "1", "--out", str(out)]
    assert accuracy.main(more) == 0
    grown = json.loads(out.read_text())
    alpha4 = grown["datasets"]["rmd17-toy"]["lora-r4-a4"]
    assert alpha4["lora_alpha"] == 4.0
    assert alpha4["trainable_parameters"] == jobs["lora-r4"]["trainable_parameters"]
    assert alpha4["tests"]["test"] != jobs["lora-r4"]["tests"]["test"]  # alpha changed the fit
    commands = grown["setup"]["commands"]  # as a shell would re-run them
    assert [shlex.split(c)[:2] for c in commands] == [["python", "benchmarks/accuracy.py"]] * 2
    assert [shlex.split(c)[2:] for c in commands] == [args, more]

    # The authors' protocol: halves of train.xyz; never mixed into a 100/50 file.
    halves = [*args[:4], "--methods", "mmea-r16", "--threads", "1", "--protocol", "50/50"]
    with pytest.raises(SystemExit, match="protocol 100/50"):
        accuracy.main([*halves, "--out", str(out)])
    assert accuracy.main([*halves, "--out", str(tmp_path / "halves.json")]) == 0
    res = json.loads((tmp_path / "halves.json").read_text())
    assert res["setup"]["protocol"] == "50/50"
    split = res["datasets"]["rmd17-toy"]["mmea-r16"]
    assert (split["n_train"], split["n_valid"]) == (4, 4)
    # nor another learning rate
    with pytest.raises(SystemExit, match=r"at lr 0\.005, not 0\.01"):
        accuracy.main(
            [
                *halves,
                "--methods",
                "mmea-r8",
                "--lr",
                "1e-2",
                "--out",
                str(tmp_path / "halves.json"),
            ]
        )


def test_accuracy_refuses_unknown_methods_before_any_work(tmp_path, monkeypatch):
    accuracy = _load("accuracy")
    # Were a label wrongly accepted, main() must not start hours of work on the real assets.
    monkeypatch.setattr(accuracy, "MODEL", tmp_path / "absent.model")
    assert accuracy._parse_label("mmea-r32") == ("mmea", 32, None, "gates")
    assert accuracy._parse_label("lora-r16-a16") == ("lora", 16, 16.0, "gates")
    assert accuracy._parse_label("mmea-paper-r16") == ("mmea", 16, None, "paper")
    assert accuracy._parse_label("mmea-paper-r8-a16") == ("mmea", 8, 16.0, "paper")
    for bad in ("mmea-x", "mmea-r8-a8", "lora-r4-a", "lora-r0", "full-r4"):
        with pytest.raises(SystemExit, match=rf"unknown method '{bad}'.*lora-rN-aM"):
            accuracy.main(["--methods", f"base,{bad}", "--out", str(tmp_path / "a.json")])
    assert not (tmp_path / "a.json").exists()


def test_benchmarks_skip_with_a_message_without_shared_assets(tmp_path, monkeypatch, capsys):
    for name in ("accuracy", "speed", "robustness", "precision"):
        module = _load(name)
        monkeypatch.setattr(module, "MODEL", tmp_path / "absent.model")
        assert module.main(["--out", str(tmp_path / f"{name}.json")]) == 0
        assert "absent" in capsys.readouterr().err
        assert not (tmp_path / f"{name}.json").exists()


def test_lammps_speed_skips_with_a_message_without_lammps(tmp_path, monkeypatch, capsys):
    lammps_speed = _load("lammps_speed")
    monkeypatch.setenv("MMEA_LAMMPS", str(tmp_path / "absent-lmp"))
    assert lammps_speed.main(["--out", str(tmp_path / "lammps.json")]) == 0
    assert "absent-lmp" in capsys.readouterr().err
    assert not (tmp_path / "lammps.json").exists()


def _fake_accuracy(f_mae: dict[str, float]) -> dict:
    params = {"base": 0, "mmea-r8": 6000, "mmea-r16": 12000, "lora-r4": 7800}
    params.update({"lora-r16": 31000, "full": 150800})
    jobs = {}
    for label, value in f_mae.items():
        metrics = {"energy_mae_meV_per_atom": 1.0, "forces_mae_meV_per_A": value}
        jobs[label] = {"trainable_parameters": params[label], "tests": {"test": metrics}}
    return {"setup": {"command": "x", "epochs": 1}, "datasets": {"rmd17-toy": jobs}}


def test_report_goal_check_counts_wins_and_misses():
    report = _load("report")
    good = {"base": 300, "mmea-r8": 40, "mmea-r16": 36, "lora-r4": 45, "lora-r16": 35, "full": 34}
    results = _fake_accuracy(good)
    other = copy.deepcopy(results["datasets"]["rmd17-toy"])
    other["mmea-r8"]["tests"]["test"]["forces_mae_meV_per_A"] = 50.0  # loses to LoRA r4 (45)
    other["mmea-r16"]["tests"]["test"]["forces_mae_meV_per_A"] = 40.0  # 1.18x full: misses
    results["datasets"]["rmd17-other"] = other
    text = report.accuracy_tables(results)
    # toy: r8/r4 = 40/45 win, r16/r16 = 36/35 loss; best MMEA 36/34 = 1.059 within 10 %.
    # other: 50/45 loss, 40/35 loss; best 40/34 = 1.176 misses.
    assert "MMEA ≤ LoRA in 1 of 4 pairings" in text
    assert "on 1 of 2 test sets" in text
    assert "| rmd17-toy (test) | 0.889 ✔ | 1.029 ✘ | 1.059 (mmea-r16) ✔ | 8.0 % |" in text
    # Extra labels are tabled after the standard ones; the goal check ignores them.
    extra = copy.deepcopy(results["datasets"]["rmd17-toy"]["lora-r16"])
    results["datasets"]["rmd17-toy"]["lora-r16-a16"] = extra
    text = report.accuracy_tables(results)
    rows = [line.split(" |")[0] for line in text.splitlines() if line.startswith("| lora")]
    assert rows == ["| lora-r4", "| lora-r16", "| lora-r16-a16", "| lora-r4", "| lora-r16"]
    # LoRA with alpha = rank gets goal-1 columns (only those run) and its own count; "–" where
    # a dataset lacks it.
    assert "MMEA ≤ LoRA in 1 of 4 pairings (LoRA alpha 1; with alpha = rank: 0 of 1" in text
    assert "| MMEA r16 / LoRA r16 α=16 F MAE | best MMEA" in text
    assert "| rmd17-toy (test) | 0.889 ✔ | 1.029 ✘ | 1.029 ✘ | 1.059 (mmea-r16) ✔ |" in text
    assert "| rmd17-other (test) | 1.111 ✘ | 1.143 ✘ | – | 1.176 (mmea-r16) ✘ |" in text
    # Missing methods: the dataset is tabled but left out of the goal check.
    del results["datasets"]["rmd17-other"]["full"]
    assert "on 1 of 1 test sets" in report.accuracy_tables(results)
    del results["datasets"]["rmd17-toy"]["full"]
    assert "goal check skipped" in report.accuracy_tables(results)


def test_report_race_compares_paper_with_full_and_gates_with_lora_at_no_more_parameters():
    report = _load("report")

    def job(params, f_mae):
        metrics = {"energy_mae_meV_per_atom": 1.0, "forces_mae_meV_per_A": f_mae}
        return {"trainable_parameters": params, "tests": {"test": metrics}}

    def dataset(full, paper, gates8, gates16, lora4, lora16):
        return {
            "full": job(150800, full), "mmea-paper-r16": job(86602, paper),
            "mmea-r8": job(6282, gates8), "mmea-r16": job(12130, gates16),
            "lora-r4-a4": job(7812, lora4), "lora-r16-a16": job(31248, lora16),
        }  # fmt: skip

    results = {
        "datasets": {
            # paper 30/31 wins; best LoRA is r4 (7,812): only gates r8 may answer, 41/40 loses
            "a": dataset(31, 30, 41, 20, 40, 45),
            # paper loses; best LoRA r16: gates r16 (fewer parameters) 35/36 wins
            "b": dataset(30, 33, 50, 35, 45, 36),
            "c": {"full": job(150800, 10.0)},  # nothing else run: dashes, not counted
        }
    }
    text = report.race_table(results)
    assert (
        "| a (test) | 31.0 | 30.0 | 0.968 ✔ | 40.0 (lora-r4-a4) | 41.0 (mmea-r8) | 1.025 ✘ |"
        in text
    )
    assert (
        "| b (test) | 30.0 | 33.0 | 1.100 ✘ | 36.0 (lora-r16-a16) | 35.0 (mmea-r16) | 0.972 ✔ |"
        in text
    )
    assert "| c (test) | 10.0 | – | – | – | – | – |" in text
    assert "paper preset ≤ full fine-tuning on 1 of 2 test sets" in text
    assert "at no more parameters on 1 of 2" in text


def test_speed_replot_draws_from_results(tmp_path):
    speed = _load("speed")
    rows = [
        {"atoms": n, "mmea_ms": 1.04 * n, "mace_ms": n, "ratio": 1.04, "repeats": 3}
        for n in (30, 201, 999)
    ]
    path = tmp_path / "speed.json"
    path.write_text(json.dumps({"machine": {"threads": 2}, "per_step": rows}))
    png = tmp_path / "speed.png"
    assert speed.main(["--out", str(path), "--replot", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000


#: a tiny stand-in for speed.FOUNDATION (same builder, seconds instead of minutes)
TINY_FOUNDATION = {
    "hidden_irreps": "8x0e+8x1o", "max_ell": 2, "num_bessel": 4, "num_polynomial_cutoff": 5,
    "radial_MLP": [8], "correlation": 2, "num_interactions": 2,
    "interaction": "RealAgnosticResidualInteractionBlock",
    "interaction_first": "RealAgnosticInteractionBlock", "MLP_irreps": "4x0e", "r_max": 4.0,
    "avg_num_neighbors": 6.0, "atomic_numbers": [1, 6, 7, 8],
}  # fmt: skip


def test_speed_measures_every_part_in_both_dtypes_on_tiny_stand_ins(tmp_path, monkeypatch):
    speed = _load("speed")
    torch.save(build_tiny_mace(atomic_numbers=(1, 6, 7, 8)), tmp_path / "base.model")
    data = teacher_data(n=10)
    folder = tmp_path / "rmd17" / "toy"
    folder.mkdir(parents=True)
    for split, frames in (("train", data[:6]), ("valid", data[6:8]), ("test", data[8:])):
        ase.io.write(folder / f"{split}.xyz", frames)
    monkeypatch.setattr(speed, "MODEL", tmp_path / "base.model")
    monkeypatch.setattr(speed, "RMD17", tmp_path / "rmd17")
    monkeypatch.setattr(speed, "FOUNDATION", TINY_FOUNDATION)
    out, png = tmp_path / "my results" / "speed.json", tmp_path / "speed.png"  # a space to quote
    argv = ["--parts", "all", "--dtypes", "float64,float32", "--threads", "1"]
    argv += ["--repeats", "2", "--big-repeats", "1", "--batch-repeats", "1"]
    argv += ["--spice-molecules", "2", "100", "--foundation-systems", "aspirin", "3"]
    argv += ["--molecule", "toy", "--per-atom-molecules", "4", "--export-molecules", "3"]
    argv += ["--export-repeats", "2", "--export-warmup", "1", "--train-frames", "4"]
    argv += ["--valid-frames", "2", "--train-epochs", "2", "--out", str(out), "--plot", str(png)]
    assert speed.main(argv) == 0
    results = json.loads(out.read_text())
    assert shlex.split(results["command"]) == ["python", "benchmarks/speed.py", *argv]
    assert results["setup"]["parts"] == list(speed.PARTS)
    rows = {(r["model"], r["dtype"], r["system"], r["atoms"]): r for r in results["per_step"]}
    assert set(rows) == {
        (model, dtype, system, atoms)
        for dtype in ("float64", "float32")
        for model, system, atoms in (
            ("spice-small", "water", 6), ("spice-small", "water", 300),
            ("foundation", "aspirin", 8), ("foundation", "water", 9),
        )
    }  # fmt: skip
    for (_, _, _, atoms), row in rows.items():
        assert row["mmea_ms"] > 0 and row["mace_ms"] > 0 and row["pair_ratio_median"] > 0
        assert row["repeats"] == (1 if atoms >= 300 else 2)
        assert row["goal"] == (1.01 if atoms >= 200 else 1.03)
        assert row["meets_goal"] == (row["pair_ratio_median"] <= row["goal"])
        assert row["cpu"]["mmea_ms"] > 0 and row["cpu"]["pair_ratio_median"] > 0
        assert len(row["load_average"]) == 2
    foundation = results["foundation"]
    assert foundation["architecture"] == TINY_FOUNDATION
    assert foundation["adapter"]["calibrated_on"] == {"water": 3, "aspirin": 5}
    assert foundation["adapter"]["trainable_parameters"] > 0 < foundation["base_parameters"]
    for dtype in ("float64", "float32"):
        timing = results["per_atom"][dtype]
        assert timing["atoms"] == 12 and timing["reference"] == "single"
        assert set(timing["calculators"]) == {"single", "per-atom", "mace"}
        weights = timing["mean_adapter_weights"]
        assert set(weights) == {"water", "organic"} and abs(sum(weights.values()) - 1) < 1e-6
        (row,) = results["export"][dtype]["per_step"]
        assert row["atoms"] == 9 and row["adapted_ms"] > 0 and row["repeats"] == 2
        assert results["export"][dtype]["base"]["dtype"] == dtype
        fit = results["training"][dtype]
        assert fit["epochs"] == 2 and len(fit["seconds_per_epoch"]) == 2
        assert fit["mean_s_per_epoch"] > 0
    assert (results["training"]["n_train"], results["training"]["n_valid"]) == (4, 2)
    assert results["forward_backward_99_atoms"]["ratio"] > 0 and results["memory"]
    assert set(results["seconds"]) == set(speed.PARTS)
    assert png.stat().st_size > 1000
    # bad names are refused before any work
    with pytest.raises(SystemExit):
        speed.main(["--parts", "spice,gpu", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        speed.main(["--dtypes", "float16", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_robustness_trains_rattles_and_runs_md_on_a_toy(toy_rmd17, tmp_path, monkeypatch):
    robustness = _load("robustness")
    monkeypatch.setattr(robustness, "MODEL", toy_rmd17.MODEL)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rmd17").symlink_to(tmp_path / "rmd17")
    monkeypatch.setattr(robustness, "SHARED", tmp_path)
    out = tmp_path / "robustness.json"
    argv = ["--datasets", "toy", "--epochs", "1", "--jobs", "1", "--structures", "2"]
    argv += ["--test-frames", "2", "--md-steps", "4", "--work", str(tmp_path / "work")]
    assert robustness.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    toy = result["datasets"]["toy"]
    assert set(toy["test"]["test"]) == set(robustness.MODELS) - {"paper"}  # not by default
    for label in ("mmea", "mmea-old", "lora", "full"):
        rows = toy["rattle"][label]
        assert set(rows) == {str(s) for s in robustness.SIGMAS}
        assert all(0 <= row["blowups"] <= row["structures"] == 2 for row in rows.values())
    assert toy["md"]["mmea"]["1500K"]["steps"] == 4 and toy["md"]["full"]["500K"]["finite"]
    table = _load("report").robustness_tables(result)
    assert "| mmea-old |" in table and "| 1500K |" in table
    assert (tmp_path / "work" / "toy" / "mmea" / "adapter_config.json").is_file()
    # a re-run reuses the trained models; --methods mmea without rattles and MD: the range rule's
    # effect on accuracy alone
    trained = (tmp_path / "work" / "toy" / "full" / "training.json").stat().st_mtime
    assert robustness.main([*argv, "--out", str(out)]) == 0
    assert (tmp_path / "work" / "toy" / "full" / "training.json").stat().st_mtime == trained
    quick = [*argv, "--methods", "mmea", "--structures", "0", "--md-steps", "0"]
    assert robustness.main([*quick, "--out", str(out)]) == 0
    only = json.loads(out.read_text())["datasets"]["toy"]
    assert set(only) == {"test", "seconds"} and set(only["test"]["test"]) == {
        "base",
        "mmea",
        "mmea-old",
    }
    assert "| toy |" in _load("report").robustness_tables(json.loads(out.read_text()))
    # the paper preset beside the gates: trained as such, rattled, graded by its own gate ranges
    paper = [*argv, "--methods", "mmea,paper", "--md-steps", "0"]
    assert robustness.main([*paper, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    toy = result["datasets"]["toy"]
    assert set(toy["test"]["test"]) == {"base", "mmea", "mmea-old", "paper"}
    assert set(toy["rattle"]) == {"mmea", "mmea-old", "paper"}
    assert "extrapolation_median" in toy["rattle"]["paper"]["0.1"]
    assert "extrapolation_median" not in toy["rattle"]["mmea-old"]["0.1"]
    config = json.loads((tmp_path / "work" / "toy" / "paper" / "adapter_config.json").read_text())
    assert config["preset"] == "paper" and config["paper_tensors"]
    assert "| paper |" in _load("report").robustness_tables(result)
    with pytest.raises(SystemExit):
        robustness.main([*argv, "--methods", "paper,lora"])


def test_robustness_of_the_shipped_adapters_runs_on_stand_ins(demo_assets, tmp_path, monkeypatch):
    import mmea_calc.base_format as base_format

    robustness = _load("robustness")
    monkeypatch.setattr(base_format, "EMBEDDED_DIR", Path(demo_assets))
    out = tmp_path / "embedded.json"
    assert robustness.main(["--embedded", "--structures", "2", "--out", str(out)]) == 0
    adapters = json.loads(out.read_text())["adapters"]
    assert set(adapters) == {"water", "ethanol"}
    for result in adapters.values():
        assert set(result["rattle"]) == {"mmea", "mmea-old"}
        assert result["test"]["mmea"]["forces_mae_meV_per_A"] < 1e-3  # labelled by the adapter


def test_precision_trains_both_dtypes_times_them_and_resumes(toy_rmd17, tmp_path, monkeypatch):
    precision = _load("precision")
    monkeypatch.setattr(precision, "MODEL", toy_rmd17.MODEL)
    monkeypatch.setattr(precision, "RMD17", toy_rmd17.RMD17)
    out = tmp_path / "my results" / "precision.json"  # a space to quote
    args = ["--molecules", "toy", "--epochs", "2", "--n-test", "3", "--timing-frames", "2"]
    args += ["--passes", "1", "--threads", "1", "--out", str(out), "--work", str(tmp_path / "w")]
    assert precision.main(args) == 0
    results = json.loads(out.read_text())
    setup = results["setup"]
    assert (setup["epochs"], setup["n_test"], setup["rank"], setup["preset"]) == (2, 3, 16, "gates")
    assert [shlex.split(c) for c in setup["commands"]] == [
        ["python", "benchmarks/precision.py", *args]
    ]
    toy = results["molecules"]["toy"]
    assert set(toy) == {"float64", "float32", "serve"}
    for dtype in ("float64", "float32"):
        fit = toy[dtype]
        assert fit["dtype"] == fit["parameter_dtype"] == dtype
        assert fit["status"] == "complete" and fit["epochs_completed"] == 2
        assert 1 <= fit["best_epoch"] <= 2 and len(fit["history"]) == 2
        assert fit["seconds_per_epoch"] > 0 and fit["valid"]["n_structures"] == 4
        assert fit["test"]["n_structures"] == 3 and fit["test"]["forces_mae_meV_per_A"] > 0
        assert (tmp_path / "w" / "toy" / dtype / "adapter_config.json").is_file()
    assert toy["float32"]["trainable_parameters"] == toy["float64"]["trainable_parameters"]
    # same seed and schedule: the two fits land close, but not bit for bit
    f64, f32 = (toy[d]["test"]["forces_mae_meV_per_A"] for d in ("float64", "float32"))
    assert f32 != f64 and abs(f32 / f64 - 1) < 0.2
    serve = toy["serve"]
    speed = serve["calculator_speed"]
    assert (speed["structures"], speed["steps_per_dtype"], speed["atoms"]) == (2, 2, 8)
    assert speed["float32_ms_per_structure"] > 0 and speed["float64_ms_per_structure"] > 0
    assert speed["median_pair_ratio"] > 0 and speed["ratio_of_medians"] > 0
    # the calculators read back from the files give the fits' own test energies
    reproduced = serve["reproduced_max_abs_energy_diff_eV"]
    assert reproduced["float64"] < 1e-9 and reproduced["float32"] < 1e-4
    served = serve["float64_trained_served_float32"]
    assert served["test"]["n_structures"] == 3
    assert 0 < served["max_abs_force_diff_meV_per_A"] < 1.0

    # A re-run skips finished steps: nothing is trained or timed again, nothing changes.
    def boom(*_args, **_kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(precision, "_fit", boom)
    monkeypatch.setattr(precision, "_serve", boom)
    assert precision.main(args) == 0
    assert json.loads(out.read_text()) == results
    # Another schedule would mix settings in one file: refused, nothing changed.
    with pytest.raises(SystemExit, match=r"'epochs': \(2, 3\)"):
        precision.main([*args, "--epochs", "3"])
    assert json.loads(out.read_text()) == results


def test_float32_md_reports_tolerance_and_nve_drift_of_the_shipped_adapters(tmp_path):
    bench = _load("float32_md")
    out = tmp_path / "f32.json"
    argv = ["--steps", "4", "--block", "2", "--out", str(out)]
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())
    assert shlex.split(results["command"])[2:] == argv
    for adapter in ("water", "aspirin"):
        tolerance = results["tolerance"][adapter]
        # float32 rounding, not zero (two dtypes really ran) and far below model errors
        assert 0 < tolerance["forces_meV_per_A_max"] < 5.0
        assert 0 < tolerance["energy_per_atom_meV_max"] < 1.0
    nve = results["nve_water"]
    assert nve["float64"]["ms_per_step"] > 0 and nve["float32"]["ms_per_step"] > 0
    assert abs(nve["float32"]["drift_meV_per_atom"] - nve["float64"]["drift_meV_per_atom"]) < 1


def test_distributed_benchmark_compares_one_process_with_two_ranks(tmp_path):
    bench = _load("distributed")
    out = tmp_path / "dist.json"
    argv = ["--epochs", "1", "--rank", "2", "--batch-size", "2", "--datasets", "water"]
    argv += ["--water-structures", "8", "--memory-structures", "20", "--out", str(out)]
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())
    assert shlex.split(results["command"])[2:] == argv
    water = results["water"]
    assert water["adapter_max_relative_difference"] < 1e-8  # the same adapter either way
    for row in ("1 process x 2 threads", "2 ranks x 1 thread"):
        assert water[row]["seconds_per_epoch_median"] > 0
        assert water[row]["peak_rss_mb_largest_process"] > 0
    memory = results["graph_memory_per_rank"]
    assert memory["structures"] == 20 and memory["edges_total"] > 20 * 24


def test_torchsim_speed_times_every_engine_on_the_same_systems():
    """benchmarks/torchsim_speed.py on 2 systems, 1 round (needs torch-sim >= 0.6: .ci/run's
    Python 3.12 stage runs it)."""
    ts = pytest.importorskip("torch_sim")
    if not hasattr(ts, "Integrator"):
        pytest.skip("torch-sim-atomistic >= 0.6 not installed")
    bench = _load("torchsim_speed")
    row = bench.time_size(2, "float64", rounds=2, warmup=0)
    assert row["n_atoms"] == 24 + 21
    assert set(row["seconds_per_step"]) == {"ase", "mmea", "mmea_base", "mace"}
    assert all(t > 0 for times in row["times"].values() for t in times)
    assert row["ase_over_mmea"]["median"] > 0
    added = bench.memory("mace", 2, "float64")
    assert added["peak_kb"] >= added["loaded_kb"]
    md = bench.md_run(2, "float64", steps=2)
    assert md["n_atoms"] == 45 and set(md["seconds"]) == {"torchsim", "ase"}
    assert md["ase_over_torchsim"] > 0


def test_gate_cost_times_every_variant_on_a_tiny_stand_in(tmp_path, monkeypatch):
    gate_cost = _load("gate_cost")
    speed = gate_cost._speed()
    torch.save(build_tiny_mace(atomic_numbers=(1, 6, 7, 8)), tmp_path / "base.model")
    monkeypatch.setattr(speed, "MODEL", tmp_path / "base.model")
    out = tmp_path / "gate_cost.json"
    argv = ["--molecules", "2", "--dtypes", "float64,float32", "--rounds", "2", "--out", str(out)]
    assert gate_cost.main(argv) == 0
    results = json.loads(out.read_text())
    assert shlex.split(results["command"]) == ["python", "benchmarks/gate_cost.py", *argv]
    assert [(r["dtype"], r["atoms"]) for r in results["rows"]] == [("float64", 6), ("float32", 6)]
    for row in results["rows"]:
        for part in ("step", "forward_only"):
            assert set(row[part]) == set(gate_cost.VARIANTS)
            assert all(v["ms"] > 0 and v["ratio_to_base"] > 0 for v in row[part].values())
        forward = row["gate_forward"]
        assert forward["gated_linears"] > 0
        assert forward["in_step_ms"] > 0 and forward["alone_ms"] > 0
    with pytest.raises(SystemExit):
        gate_cost.main(["--dtypes", "float16", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_same_numbers_saves_every_path_and_compares(tmp_path, monkeypatch, capsys):
    same = _load("same_numbers")
    speed = same._speed()
    torch.save(build_tiny_mace(atomic_numbers=(1, 6, 7, 8)), tmp_path / "base.model")
    folder = tmp_path / "rmd17" / "toy"
    folder.mkdir(parents=True)
    data = teacher_data(n=6)
    ase.io.write(folder / "train.xyz", data[:4])
    ase.io.write(folder / "valid.xyz", data[4:])
    monkeypatch.setattr(speed, "MODEL", tmp_path / "base.model")
    monkeypatch.setattr(speed, "RMD17", tmp_path / "rmd17")
    files = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for path in files:
        argv = ["--save", str(path), "--molecule", "toy", "--train-frames", "4"]
        assert same.main([*argv, "--valid-frames", "2"]) == 0
    out = tmp_path / "same.json"
    assert same.main(["--compare", *map(str, files), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["differences"]
    routes = {"water", "organic", "mixed", "per-atom", "frozen"}
    assert {k.split("/")[1] for k in rows if not k.startswith("training")} == routes
    assert {"training/loss", "float64/frozen/forces", "float32/per-atom/stress"} <= set(rows)
    assert all(row["max_rel"] < 1e-12 for row in rows.values())  # one version, same numbers
