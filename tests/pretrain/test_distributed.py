"""Distributed pretraining on CPUs (gloo): two ranks must train exactly like one process.

The end-to-end test launches ``ssl-pretrain`` with ``torchrun --nproc-per-node 2`` and compares
the checkpoint after two steps with a single-process run on the same global batches: same loss,
same weights (float tolerance). It fails if the negatives are not gathered, if the gradient is
off by the world size, if the ranks read overlapping or wrong slices of the batch, or if
BatchNorm statistics are not synchronised. The unit tests below show that each of those
mistakes does move the weights, so the end-to-end comparison would catch it.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_pretrain.checkpoint import load_checkpoint
from ssl_pretrain.cli import main as pretrain_main
from ssl_pretrain.config import load_config
from ssl_pretrain.data import open_source, random_subset
from ssl_pretrain.data.dataset import EpochBatchSampler, TwoViewDataset, epoch_batches
from ssl_pretrain.engine.distributed import DistInfo, GlobalBatchNorm, convert_sync_batchnorm
from ssl_pretrain.methods import build_model
from ssl_pretrain.engine.optim import build_optimizer, build_scheduler
from ssl_pretrain.train import make_step, train_step
from ssl_pretrain.augment.transforms import build_view_transform

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ARGS = [
    "--data", "builtin:digits:train", "--batch-size", "64", "--epochs", "1", "--no-progress",
    "--set", "data.max_images=128", "--set", "data.pipeline=pil", "--set", "data.num_workers=0",
    "--set", "augment.input_size=16", "--set", "augment.min_scale=0.25",
    "--set", "model.backbone=smallconv", "--set", "simclr.hidden_dim=64", "--set", "simclr.output_dim=32",
    "--set", "simclr.temperature=0.2", "--set", "optim.lr=0.5", "--set", "optim.warmup_epochs=0",
    "--set", "train.log_every_steps=1", "--set", "train.sync_batchnorm=true", "--set", "train.threads=1",
    "--set", "train.precision=fp32",  # auto is bf16 on CPUs with native bf16: tolerances here are fp32's
    # the default memory format: channels-last picks other convolution kernels, whose float32
    # rounding moves the second step's loss by ~1e-4 on these near-constant digits
    "--set", "train.channels_last=false",
]


def _run(command: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(env_extra or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


@pytest.mark.slow
def test_two_ranks_train_exactly_like_one_process(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    assert pretrain_main([*ARGS, "--out", str(single)]) == 0  # the reference: one process (this one)
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "ssl_pretrain", *ARGS, "--out", str(double)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 ranks" in result.stderr and "32 on each of 2 ranks" in result.stderr

    # One log, one metrics file, one checkpoint and one backbone: rank 0 writes, the other reads.
    assert (double / "backbone.safetensors").exists()
    assert result.stderr.count("done: backbone written") == 1
    one, two = _losses(single), _losses(double)
    assert len(one) == len(two) == 2  # 128 images, global batch 64
    # float32 sums in another order: 3.4e-5 apart at the second step on an AMD EPYC (AVX2), under
    # 1e-5 on a Xeon; the float64 unit test below pins the equivalence down to 1e-7
    assert two == pytest.approx(one, rel=1e-4, abs=1e-6)

    # float32: summing in another order moves the weights of nearly constant BatchNorm channels
    # by up to ~1e-3 on digits (the float64 unit test below pins exactness down to 1e-7).
    state_one = load_checkpoint(single / "checkpoints" / "last.pt")["model"]
    state_two = load_checkpoint(double / "checkpoints" / "last.pt")["model"]
    assert state_one.keys() == state_two.keys()
    for key, value in state_one.items():
        if value.is_floating_point():
            torch.testing.assert_close(state_two[key], value, rtol=1e-2, atol=1e-2, msg=key)
        else:
            assert torch.equal(state_two[key], value), key
    head = [key for key in state_one if key.startswith("projection_head") and state_one[key].is_floating_point()]
    # the head within 1e-5 on a Xeon, 1.4e-3 on an AMD EPYC (AVX2): float32 order again; the float64
    # unit test below is the exact check
    assert max((state_one[key] - state_two[key]).abs().max().item() for key in head) < 5e-3


@pytest.mark.slow
def test_resume_with_another_number_of_ranks_continues_the_same_batches(tmp_path):
    """A one-process run stopped after epoch 1, resumed with two ranks: same as never stopped."""
    base = [arg for arg in ARGS if arg not in ("--epochs", "1")] + ["--epochs", "2"]
    reference, resumed = tmp_path / "ref", tmp_path / "resumed"
    assert pretrain_main([*base, "--set", "train.keep_every_epochs=1", "--out", str(reference)]) == 0
    # The state a kill right after epoch 1 leaves behind.
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    (resumed / "checkpoints" / "last.pt").write_bytes((reference / "checkpoints" / "epoch-0001.pt").read_bytes())
    (resumed / "config.yaml").write_text((reference / "config.yaml").read_text())
    (resumed / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text())
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "ssl_pretrain", *base, "--set", "train.keep_every_epochs=1", "--resume",
                   "--out", str(resumed)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _losses(resumed) == pytest.approx(_losses(reference), rel=1e-5, abs=1e-6)
    state_ref = load_checkpoint(reference / "checkpoints" / "last.pt")["model"]
    state_res = load_checkpoint(resumed / "checkpoints" / "last.pt")["model"]
    for key, value in state_ref.items():
        if value.is_floating_point():
            torch.testing.assert_close(state_res[key], value, rtol=1e-2, atol=1e-2, msg=key)


@pytest.mark.slow
def test_two_ranks_stop_together_at_a_time_budget(tmp_path):
    """Each rank reads its own clock; the run syncs the reading (max over ranks) every step, so
    both take the same learning rates and stop at the same step - no rank left waiting in a
    collective, the run ends within its budget with one checkpoint and one export."""
    base = [arg for arg in ARGS if arg not in ("--epochs", "1")] + ["--epochs", "10000", "--time-budget", "0.2"]
    out = tmp_path / "budget"
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "ssl_pretrain", *base, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("time budget of 0.2 min reached") == 1
    assert (out / "backbone.safetensors").exists()
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    # the run stops when one more step as long as the last would pass the budget; a step slower than
    # the one before (a loaded machine) may end a fraction of a second past it (CI: 12.05 s once)
    assert 0 < state["clock"]["elapsed_s"] < 12.0 + 1.0 and state["global_step"] > 2
    assert state["global_step"] < 10000 * 2  # stopped by the budget, not the epochs


@pytest.mark.slow
def test_refused_run_folder_stops_every_rank_with_one_line(tmp_path):
    out = tmp_path / "taken"
    assert pretrain_main([*ARGS, "--out", str(out)]) == 0
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "ssl_pretrain", *ARGS, "--out", str(out)])
    assert result.returncode != 0
    assert "already holds a run" in result.stderr
    ours = result.stderr.split("failed (exitcode")[0]  # what follows is torchrun's own report
    assert ours.count("ssl-pretrain: error: ") == 2 and "Traceback" not in ours


@pytest.mark.slow
def test_batch_not_divisible_by_ranks_is_one_line(tmp_path):
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "ssl_pretrain", *ARGS, "--batch-size", "63", "--out", str(tmp_path / "odd")])
    assert result.returncode != 0
    assert "must be divisible by the 2 ranks" in result.stderr


# ---------------------------------------------------------------------------------------------
# Unit level: the pieces, in processes spawned by the test itself.


def test_sampler_ranks_partition_every_global_batch():
    single = EpochBatchSampler(1000, 64, seed=3)
    ranks = [EpochBatchSampler(1000, 64, seed=3, rank=r, world_size=4) for r in range(4)]
    for sampler in [single, *ranks]:
        sampler.set_epoch(2, start_step=5)
    for whole, *parts in zip(single, *ranks):
        assert [key for part in parts for key in part] == whole
    assert all(len(r) == len(single) == 1000 // 64 - 5 for r in ranks)
    assert epoch_batches(1000, 64, 3, 2)[5] == [index for _, index in next(iter(single))]
    with pytest.raises(ValueError, match="not divisible"):
        EpochBatchSampler(1000, 63, seed=0, rank=0, world_size=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


METHOD_SETTINGS = {
    "simclr": [],
    "moco": ["method=moco", "moco.hidden_dim=32", "moco.output_dim=16", "moco.queue_size=128"],
    "byol": ["method=byol", "byol.hidden_dim=32", "byol.output_dim=16"],
    "barlowtwins": ["method=barlowtwins", "barlowtwins.hidden_dim=32", "barlowtwins.output_dim=32"],
    "vicreg": ["method=vicreg", "vicreg.hidden_dim=32", "vicreg.output_dim=32", "optim.lr=0.1"],
    "dino": ["method=dino", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.output_dim=64"],
}
"""Small heads per method for the float64 two-rank equivalence."""


def _tiny_setup(sync_batchnorm: bool, world: int, batch: int = 32, gather: bool = False, method: str = "simclr"):
    """A small SimCLR in float64 on one global batch of real digit views (the data path's own).

    float64, because real digits make a few BatchNorm channels nearly constant: summing the
    same numbers in another order (two ranks) then moves float32 weights by up to 1e-3 after
    one step, while in float64 the two runs agree to 1e-7 and the mistakes below move them by
    1e-3 and more.
    """
    torch.set_default_dtype(torch.float64)
    cfg = load_config(None, ["model.backbone=smallconv", "simclr.hidden_dim=32", "simclr.output_dim=16",
                             "augment.input_size=16", "augment.min_scale=0.25", "optim.lr=0.5",
                             "optim.warmup_epochs=0", f"train.batch_size={batch}", "simclr.temperature=0.2",
                             "train.precision=fp32", *METHOD_SETTINGS[method]])
    dataset = TwoViewDataset(random_subset(open_source("builtin:digits:train"), batch),
                             build_view_transform(cfg.augment), seed=0)
    pairs = [dataset[(0, index)] for index in range(batch)]
    views = (torch.stack([a for a, _ in pairs]).double(), torch.stack([b for _, b in pairs]).double())
    torch.manual_seed(0)
    model = build_model(cfg, gather_distributed=gather)
    if sync_batchnorm and world > 1:
        model = convert_sync_batchnorm(model, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim, cfg.train.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, 10, 1)
    return cfg, model, optimizer, scheduler, views


Job = tuple[str, bool, bool]
"""``(method, gather, sync_bn)``: one step of ``method`` with or without the gathered negatives
(or statistics) and the global BatchNorm."""

GROUPS: list[list[Job]] = [
    [("simclr", True, True), ("simclr", False, True), ("simclr", True, False), ("moco", True, True),
     ("moco", False, True)],
    [("byol", True, True), ("barlowtwins", True, True), ("barlowtwins", False, True), ("vicreg", True, True),
     ("vicreg", False, True), ("dino", True, True)],
]
"""The two-rank steps the tests need, in the groups they are run in: one pair of processes per
group (starting a process that imports torch costs seconds; a step costs milliseconds). The
second group serves only tests marked ``slow``."""


def _rank_steps(rank: int, world: int, port: int, jobs: list[Job], results, batch: int = 32) -> None:
    """Rank ``rank`` of ``world``: one process group, then one fresh step per job on this rank's
    share of the global batch; rank 0 puts ``(job, loss, state)`` on ``results`` per job."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for job in jobs:
            method, gather, sync_bn = job
            cfg, model, optimizer, scheduler, views = _tiny_setup(sync_bn, world, batch, gather, method)
            info = DistInfo(rank, world, rank)
            step = make_step(cfg, model, optimizer, scheduler, torch.device("cpu"), info, total_steps=10)
            share = batch // world
            local = (views[0][rank * share:(rank + 1) * share], views[1][rank * share:(rank + 1) * share])
            loss = train_step(step, local).item()
            if rank == 0:
                results.put((job, loss, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}))
    finally:
        dist.destroy_process_group()


def _two_rank_results(jobs: list[Job]) -> dict[Job, tuple[float, dict]]:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = mp.start_processes(_rank_steps, args=(2, _free_port(), jobs, results), nprocs=2,
                                   start_method="spawn", join=False)
    collected = {}
    for _ in jobs:  # before joining: rank 0 blocks until its results are read
        job, loss, state = results.get()
        collected[job] = (loss, state)
    while not processes.join():
        pass
    return collected


@pytest.fixture(scope="module")
def two_ranks():
    """``two_ranks(method, gather, sync_bn)`` -> ``(loss, state)`` of one step on two ranks; each
    group of jobs is run once, when a test first asks for one of its jobs."""
    done: dict[Job, tuple[float, dict]] = {}

    def get(method: str, gather: bool = True, sync_bn: bool = True) -> tuple[float, dict]:
        job = (method, gather, sync_bn)
        if job not in done:
            done.update(_two_rank_results(next(group for group in GROUPS if job in group)))
        return done[job]

    return get


def _one_process_result(batch: int = 32, method: str = "simclr"):
    cfg, model, optimizer, scheduler, views = _tiny_setup(False, 1, batch, method=method)
    step = make_step(cfg, model, optimizer, scheduler, torch.device("cpu"), total_steps=10)
    loss = train_step(step, views).item()
    torch.set_default_dtype(torch.float32)
    return loss, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _max_difference(a: dict, b: dict) -> float:
    return max(float(abs(a[k] - b[k]).max()) for k in a if a[k].dtype.kind == "f")


def test_gathered_negatives_and_global_batchnorm_match_one_process_and_mistakes_do_not(two_ranks):
    loss_one, state_one = _one_process_result()
    loss_two, state_two = two_ranks("simclr", gather=True, sync_bn=True)
    assert loss_two == pytest.approx(loss_one, rel=1e-6)  # train_step computes the loss in float32
    assert _max_difference(state_one, state_two) < 1e-6

    # Without the gather each rank contrasts against its own 8 pairs only: another loss.
    loss_local, state_local = two_ranks("simclr", gather=False, sync_bn=True)
    assert abs(loss_local - loss_one) > 1e-3 and _max_difference(state_one, state_local) > 1e-4
    # Per-rank BatchNorm statistics: the same loss function, different normalisation.
    _, state_bn = two_ranks("simclr", gather=True, sync_bn=False)
    assert _max_difference(state_one, state_bn) > 1e-4


@pytest.mark.parametrize("method", ["moco", *[pytest.param(name, marks=pytest.mark.slow)
                                              for name in ("byol", "barlowtwins", "vicreg", "dino")]])
def test_each_method_on_two_ranks_matches_one_process(method, two_ranks):
    """One step of every method that gathers (MoCo's queue, Barlow Twins' cross-correlation,
    VICReg's variance and covariance, DINO's centre) or only needs global BatchNorm (BYOL) on the
    global batch split over two ranks equals the step in one process, momentum update included."""
    loss_one, state_one = _one_process_result(method=method)
    loss_two, state_two = two_ranks(method, gather=True, sync_bn=True)
    assert loss_two == pytest.approx(loss_one, rel=1e-6)
    assert _max_difference(state_one, state_two) < 1e-6
    if method in ("moco", "barlowtwins", "vicreg"):  # without the gather: each rank's own batch only
        loss_local, state_local = two_ranks(method, gather=False, sync_bn=True)
        assert abs(loss_local - loss_one) > 1e-4 or _max_difference(state_one, state_local) > 1e-4


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(4)
    converted = convert_sync_batchnorm(copy.deepcopy(torch.nn.Sequential(plain)), torch.device("cpu"))[0]
    assert isinstance(converted, GlobalBatchNorm)
    x = torch.randn(8, 4, 5, 5)
    torch.testing.assert_close(converted(x), plain(x))
    assert set(converted.state_dict()) == set(plain.state_dict())


# ---------------------------------------------------------------------------------------------
# Distributed extraction: each rank embeds a shard, rank 0 writes one file in the source's order.


@pytest.mark.slow
def test_two_rank_extraction_writes_the_single_process_file(tmp_path, digits_folder):
    import numpy as np

    from linear_probe.embed import main as embed_main, shard_bounds
    from linear_probe.embeddings import load_embeddings

    assert [shard_bounds(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    run = tmp_path / "run"
    assert pretrain_main([*ARGS, "--out", str(run)]) == 0
    (digits_folder / "0" / "broken.png").write_bytes(b"not a png")  # one unreadable file
    try:
        one, two = tmp_path / "one.npy", tmp_path / "two.npy"
        common = ["--checkpoint", str(run), "--data", str(digits_folder), "--batch-size", "16", "--no-progress"]
        assert embed_main([*common, "--out", str(one)]) == 0
        result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "-m", "linear_probe.embed", *common, "--out", str(two)])
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 ranks; 1 unreadable skipped" in result.stderr
    finally:
        (digits_folder / "0" / "broken.png").unlink()
    a, b = load_embeddings(one), load_embeddings(two)
    assert a.features.shape == b.features.shape == (200, 256)
    np.testing.assert_allclose(b.features, a.features, rtol=1e-5, atol=1e-6)
    assert b.names == a.names and np.array_equal(b.labels, a.labels) and np.array_equal(b.indices, a.indices)
    assert [name for name, _ in b.skipped] == [name for name, _ in a.skipped] and len(a.skipped) == 1
