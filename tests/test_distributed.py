"""torch.distributed on the CPU: 2 processes with the gloo backend, as torchrun launches them."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp
import yaml

from conftest import TINY, make_config
from ssltrain import SSLPlugin, all_reduce_mean, checkpoint, hookimpl
from ssltrain.loop import train
from ssltrain.plugins import discover
from ssltrain.testing import read_scalars


def mean_rank() -> torch.Tensor:
    """The mean of the processes' ranks, through a collective (0 for one process)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return all_reduce_mean(torch.tensor(float(rank)))


class Probe(SSLPlugin):
    """Records the rows each rank drew and a fingerprint of the parameters after each step; makes a
    collective in each hook where docs/plugins.md allows them (a broken rule would hang the run)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.rows, self.params = [], []

    @hookimpl(wrapper=True)
    def ssl_optimizer_step(self, model, ctx):
        result = yield
        self.params.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        return result

    @hookimpl
    def ssl_step_end(self, batch):
        self.rows.append((batch.idx_l.tolist(), batch.idx_u.tolist()))
        self.last_mean_rank = mean_rank()

    @hookimpl
    def ssl_metrics(self):
        return {"probe/mean_rank": mean_rank(), "probe/step_end_mean_rank": self.last_mean_rank}

    @hookimpl
    def ssl_state_dict(self, state):
        state[self.name] = {"mean_rank": mean_rank()}

    @hookimpl
    def ssl_evaluate_end(self, step):
        if step == self.final_step:
            torch.save({"rows": self.rows, "params": self.params}, f"{self.out}/rank{torch.distributed.get_rank()}.pt")


# 200 unlabeled rows = 5 global batches of 40, so no batch straddles two passes over the data
SETTINGS = ["train.checkpoint_every=5", "train.eval_every=5", "data.unlabeled_batch_size=40",
            "model.options={hidden: [16], dropout: 0.1}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, run_dir, steps, resume, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    Probe.final_step, Probe.out = steps, out
    config = make_config(*SETTINGS, f"train.steps={steps}", classes={"probe": Probe}, plugins=["pi_model", "probe"])
    try:
        train(config, run_dir, resume=resume, classes={**discover(), "probe": Probe})
        torch.distributed.barrier()  # both ranks done before either tears gloo down (a rare abort at exit otherwise)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_disjoint_data_identical_params_single_writer_and_resume(tmp_path, monkeypatch):
    run_dir, out = tmp_path / "run", tmp_path / "probe"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), run_dir, 10, False, str(out)), nprocs=2)
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    for (l0, u0), (l1, u1) in zip(r0["rows"], r1["rows"]):
        assert len(l0) == 8 and len(u0) == 20  # global batches 16 + 40 split over 2 ranks
        assert not set(u0) & set(u1)  # disjoint unlabeled rows (the 8 labeled samples repeat within a batch)
    assert not any(l0 == l1 for (l0, _), (l1, _) in zip(r0["rows"], r1["rows"]))
    for p0, p1 in zip(r0["params"], r1["params"]):
        assert torch.equal(p0, p1)
    assert not torch.equal(r0["params"][0], r0["params"][-1])
    # rank 0 alone wrote the run directory: one event file, evaluations once each
    assert len(list((run_dir / "tb").glob("events.*"))) == 1
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [5, 10]
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 10 and len(state["rng"]) == 2 and float(state["plugins"]["probe"]["mean_rank"]) == 0.5
    assert read_scalars(run_dir)["probe/mean_rank"] == [(5, 0.5), (10, 0.5)]  # ssl_metrics ran on both ranks
    assert read_scalars(run_dir)["probe/step_end_mean_rank"] == [(5, 0.5), (10, 0.5)]
    assert json.loads((run_dir / "summary.json").read_text())["processes"] == 2
    # resume with a different number of processes (1), then again with 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    config = make_config(*SETTINGS, "train.steps=15", classes={"probe": Probe}, plugins=["pi_model", "probe"])
    Probe.final_step, Probe.out = 0, str(out)
    assert train(config, run_dir, resume=True, classes={**discover(), "probe": Probe})["steps"] == 15
    mp.spawn(_worker, args=(2, _free_port(), run_dir, 20, True, str(out)), nprocs=2)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 20
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["rows"]) == 5 and torch.equal(r0["params"][-1], r1["params"][-1])


def test_torchrun_command_line(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "plugins": ["pi_model"]}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "ssltrain", "train", str(cfg), "--out", str(tmp_path / "run"), "--set", "train.steps=6",
           "--set", "train.eval_every=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1 and done.stdout.count("  device ") == 1  # rank 0 alone shows
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["processes"] == 2
