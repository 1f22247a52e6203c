"""Data-parallel fine-tuning under torchrun (issue 26): N ranks with per-rank batch b train what
one process with batch N*b trains; rank 0 alone writes; a run resumes under another world size.

The two-rank runs are real: ``torchrun --standalone --nproc_per_node 2`` on CPU (gloo), one
subprocess for all methods (the script joins the process group once; ``fit_adapter`` uses it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ase.io
import pytest
import torch
from _synthetic import teacher_data
from safetensors.torch import load_file

from mmea_calc.distributed import Context
from mmea_calc.testing import build_tiny_mace
from mmea_calc.train import TrainConfig, fit_adapter

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # name: TrainConfig settings besides the shared ones
    "mmea": {},
    "paper": {"preset": "paper"},
    "lora": {"method": "lora", "lora_alpha": 2.0},
}
SHARED = {"rank": 2, "lr": 1e-2, "seed": 0, "dtype": "float64", "eval_batch_size": 3}

SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from mmea_calc.train import TrainConfig, fit_adapter

dist.init_process_group("gloo")  # fit_adapter uses the group it finds
root, epochs = sys.argv[1], int(sys.argv[4])
methods, shared = json.loads(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(1)
for name, extra in methods.items():
    config = TrainConfig(epochs=epochs, batch_size=2, **shared, **extra)
    fit_adapter(f"{root}/base.model", f"{root}/train.xyz", f"{root}/valid.xyz", config,
                name=name, out_dir=f"{root}/ddp-{name}")
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The files, and every method trained for 3 epochs on 2 ranks x batch 2 (and mmea for 2
    epochs, to resume from)."""
    root = tmp_path_factory.mktemp("ddp")
    torch.save(build_tiny_mace(), root / "base.model")
    data = teacher_data(n=14)
    ase.io.write(root / "train.xyz", data[:11])  # 11: the last global batch of 4 is short
    ase.io.write(root / "valid.xyz", data[11:])
    (root / "run.py").write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", "2", str(root / "run.py"), str(root)]
    subprocess.run([*torchrun, json.dumps(METHODS), json.dumps(SHARED), "3"], env=env,
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    resume = root / "resume"
    resume.mkdir()
    for name in ("base.model", "train.xyz", "valid.xyz"):
        (resume / name).symlink_to(root / name)
    subprocess.run([*torchrun[:-1], str(resume), json.dumps({"mmea": {}}), json.dumps(SHARED),
                    "2"], env=env, check=True, capture_output=True, timeout=600)  # fmt: skip
    return root


def _single(root: Path, name: str, epochs: int = 3, **kwargs):
    config = TrainConfig(epochs=epochs, batch_size=4, **SHARED, **METHODS[name])
    return fit_adapter(
        root / "base.model", root / "train.xyz", root / "valid.xyz", config, name=name, **kwargs
    )


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for key, value in want.items():
        if value.numel() == 0:
            continue
        scale = value.abs().max().clamp_min(1e-12)
        assert (got[key] - value).abs().max() / scale < 1e-8, (what, key)


@pytest.mark.parametrize("name", ["mmea", "paper"])
def test_two_ranks_train_the_adapter_one_process_trains(two_rank_runs, tmp_path, name):
    single = _single(two_rank_runs, name, out_dir=tmp_path / name)
    ddp = two_rank_runs / f"ddp-{name}"
    _assert_close(load_file(ddp / "adapter_model.safetensors"),
                  load_file(tmp_path / name / "adapter_model.safetensors"), name)  # fmt: skip
    got, want = (
        json.loads((d / "adapter_config.json").read_text()) for d in (ddp, tmp_path / name)
    )
    for z, value in want["e0s"].items():  # refitted over the whole training set every epoch
        assert got["e0s"][z] == pytest.approx(value, rel=1e-8, abs=1e-10)
    for target, ranges in want["gate_ranges"].items():  # calibrated on the whole training set
        for key, values in ranges.items():
            assert got["gate_ranges"][target][key] == pytest.approx(values, rel=1e-8, abs=1e-10)
    history = json.loads((ddp / "training.json").read_text())["history"]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in single.history])
    assert sorted(p.name for p in ddp.iterdir()) == sorted(
        p.name for p in (tmp_path / name).iterdir()
    )  # rank 0 alone wrote: the same files, no stray ones


def test_two_ranks_train_the_lora_model_one_process_trains(two_rank_runs):
    single = _single(two_rank_runs, "lora")
    ddp = torch.load(two_rank_runs / "ddp-lora" / "model.model", weights_only=False)
    want = {k: v for k, v in single.model.state_dict().items() if v.is_floating_point()}
    got = {k: v for k, v in ddp.state_dict().items() if k in want}
    _assert_close(got, want, "lora")


def test_a_two_rank_run_resumes_in_one_process_with_the_same_global_batch(two_rank_runs):
    resume = two_rank_runs / "resume"
    resumed = _single(resume, "mmea", epochs=3, out_dir=resume / "ddp-mmea", resume=True)
    straight = _single(two_rank_runs, "mmea", epochs=3)
    assert resumed.epochs_completed == 3
    got = {k: p.detach() for k, p in resumed.model.named_adapter_parameters("mmea")}
    want = {k: p.detach() for k, p in straight.model.named_adapter_parameters("mmea")}
    _assert_close(got, want, "resumed")


def test_shards_cover_every_item_once_in_order():
    for count in (0, 1, 5, 11):
        for world in (1, 2, 3):
            parts = [Context(rank=r, world_size=world).shard(count) for r in range(world)]
            covered = [i for part in parts for i in range(count)[part]]
            assert covered == list(range(count)), (count, world)
            assert (
                max(len(range(count)[p]) for p in parts) - min(len(range(count)[p]) for p in parts)
                <= 1
            )


DYING = """
import os, sys
import torch, torch.distributed as dist
from mmea_calc import _trainer
from mmea_calc.train import TrainConfig, fit_adapter

step = _trainer.Loop.step


def dying(self):
    if self.epoch == 2 and dist.get_rank() == 1:
        os._exit(3)  # rank 1 dies after two epochs
    return step(self)


_trainer.Loop.step = dying
torch.set_num_threads(1)
root = sys.argv[1]
config = TrainConfig(rank=2, epochs=5, batch_size=2, seed=0)
fit_adapter(f"{root}/base.model", f"{root}/train.xyz", f"{root}/valid.xyz", config, name="d",
            out_dir=f"{root}/dying")
"""


def test_a_dying_rank_ends_the_run_and_leaves_the_last_checkpoint(two_rank_runs):
    from safetensors import safe_open

    root = two_rank_runs
    (root / "dying.py").write_text(textwrap.dedent(DYING))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(root / "dying.py"), str(root)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    report = done.stdout + done.stderr
    assert "exitcode  : 3" in report and "local_rank: 1" in report  # torchrun names the rank
    with safe_open(str(root / "dying" / "checkpoint.safetensors"), "pt") as handle:
        meta = json.loads(handle.metadata()["mmea_checkpoint"])
    assert meta["epoch"] == 2  # the epochs before the failure, intact and resumable
    assert not (root / "dying" / "adapter_model.safetensors").exists()
