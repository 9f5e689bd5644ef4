"""Two gloo processes (DDP) end with the same parameters as one process on the same global batch, and log the
same losses, with and without gradient accumulation."""

import gc
import json
import os
import socket
import warnings
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sphere_fast import data
from sphere_fast.checkpoint import load_checkpoint, save_checkpoint
from sphere_fast.training import (
    DistInfo, RunConfig, TrainConfig, Trainer, fit, init_distributed, leave_distributed, process_seed, rng_state,
)
from tests.tiny import NO_PERCEPTUAL, TINY_CONFIG, TWO_LAYERS, no_label_dropout, tiny_batch, tiny_model

GLOBAL_BATCH, STEPS = 8, 3
# a large lr so that un-synchronised gradients would move the weights far beyond the tolerance
CONFIG = dict(global_batch=GLOBAL_BATCH, total_steps=STEPS, warmup_steps=0, base_lr=0.3, min_lr=0.3, loss_weights=NO_PERCEPTUAL)


def global_step_inputs(step: int):
    """The global batch of a step with its per-sample noise levels and noise, fixed by the step."""
    x, y = tiny_batch(GLOBAL_BATCH, seed=100 + step)
    g = torch.Generator().manual_seed(200 + step)
    big = torch.rand(GLOBAL_BATCH, generator=g) * 5
    small = torch.rand(GLOBAL_BATCH, generator=g)
    big[0] = small[1] = 0.0
    return x, y, big, small, torch.randn(GLOBAL_BATCH, 16, 4, generator=g)


def train(
    info: DistInfo, rows: slice | None = None, accumulation: int = 1
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """STEPS steps on this process's share of each global batch (``rows`` overrides the share): the weights
    at the end and each step's logged values."""
    config = TrainConfig(**CONFIG, accumulation_steps=accumulation)
    trainer = Trainer(no_label_dropout(tiny_model()), config, "cpu", info)
    b = GLOBAL_BATCH // info.world_size
    share = rows or slice(info.rank * b, (info.rank + 1) * b)
    logs = []
    for step in range(STEPS):
        x, y, big, small, e = global_step_inputs(step)
        logs.append(trainer.train_step(x[share], y[share], scales=(big[share], small[share]), noise=e[share]))
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, logs


def join_group(rank: int, world: int, port: int, timeout: timedelta | None = None) -> DistInfo:
    """This process as torchrun starts it, joined by init_distributed; with ``timeout`` the group is made first,
    so that a collective another process misses fails within it instead of hanging the test. A deprecated torch
    API that our code calls (DDP's options, say) fails the worker: pytest's warning filters stay in its process."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("error", category=category, module=r"sphere_fast\.")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if timeout is not None:
        dist.init_process_group("gloo", timeout=timeout)
    info = init_distributed()
    assert dist.get_backend() == "gloo" and info == DistInfo(rank, world, rank)
    return info


def worker(rank: int, world: int, port: int, out: str, accumulation: int) -> None:
    info = join_group(rank, world, port)
    state, logs = train(info, accumulation=accumulation)
    torch.save({"state": state, "logs": logs}, f"{out}/rank{rank}.pt")
    leave_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("accumulation", [1, 2], ids=["one-batch", "two-micro-batches"])
def test_two_gloo_processes_match_one_process(tmp_path, accumulation):
    """With accumulation, each process's first micro-batch backward skips DDP's all-reduce (no_sync): the
    gradients must still be reduced, once, in the last. Each process logs the global batch's loss terms (the
    mean of the processes' means) and the norm of the reduced gradient, as one process does."""
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), accumulation), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ranks = [s["state"] for s in saved]
    single, single_logs = train(DistInfo())
    initial = tiny_model().state_dict()
    half_batch_only, _ = train(DistInfo(), rows=slice(0, GLOBAL_BATCH // 2))
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-2  # the steps really changed the weights
    for k in single:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(ranks[0][k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    # negative control: training on one process's share alone does not match
    assert max((half_batch_only[k] - single[k]).abs().max().item() for k in single) > 1e-3
    for rank in saved:
        assert [log.keys() for log in rank["logs"]] == [log.keys() for log in single_logs]
        for log, expected in zip(rank["logs"], single_logs):
            assert log == pytest.approx(expected, rel=1e-4)


def checkpoint_worker(rank: int, world: int, port: int, out: str) -> None:
    info = join_group(rank, world, port, timedelta(seconds=60))
    trainer = Trainer(no_label_dropout(tiny_model()), TrainConfig(**CONFIG), "cpu", info)
    torch.manual_seed(10 + rank)
    mine = rng_state()
    path = save_checkpoint(out, trainer.model, trainer=trainer)
    assert (path is not None) == (rank == 0)  # rank 0 writes, once every process's RNG state is gathered
    torch.manual_seed(99)
    load_checkpoint(out, trainer=trainer)  # the others read it only after rank 0 has written it
    assert torch.equal(torch.get_rng_state(), mine["torch"])
    leave_distributed()


def test_every_process_saves_and_resumes_its_own_rng_state(tmp_path):
    """Under torchrun every process calls save_checkpoint: the RNG states are gathered to rank 0, which writes
    them; after the save each process loads the checkpoint back and resumes with its own state."""
    mp.spawn(checkpoint_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rngs = torch.load(tmp_path / "step-00000000" / "trainer_state.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


class InACycle:
    def __init__(self) -> None:
        self.me = self


def exit_worker(rank: int, world: int, port: int, out: str) -> None:
    """Joins the group, runs a collective and returns without leaving it, an object in a reference cycle (as a
    DDP engine can be) left for the garbage collector, which runs only when called."""
    gc.disable()
    join_group(rank, world, port)
    cycle = weakref.ref(InACycle())
    destroy = dist.destroy_process_group

    def recorded_destroy(*args, **kwargs) -> None:
        Path(out, f"left{rank}").write_text("cycle freed" if cycle() is None else "cycle alive")
        destroy(*args, **kwargs)

    dist.destroy_process_group = recorded_destroy
    dist.all_reduce(torch.ones(1))


def test_a_process_leaves_the_group_it_joined_when_it_exits(tmp_path):
    """A process that exits with a gloo group alive, or destroys it while a DDP engine still holds it, can abort
    in the interpreter's teardown (SIGABRT): the group init_distributed made is destroyed at exit, while the
    interpreter is whole, once a garbage collection has freed what holds it."""
    mp.spawn(exit_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["left0", "left1"]
    assert all(p.read_text() == "cycle freed" for p in tmp_path.iterdir())


def resumable_run(out: str, steps: int) -> RunConfig:
    train = TrainConfig(global_batch=6, total_steps=steps, warmup_steps=0, loss_weights=NO_PERCEPTUAL)
    return RunConfig(model=TINY_CONFIG, train=train, data="synthetic", out=out, checkpoint_every=2, workers=0)


def fit_worker(rank: int, world: int, port: int, out: str) -> None:
    join_group(rank, world, port, timedelta(seconds=60))
    fit(resumable_run(out, 2), progress=False)
    leave_distributed()


def test_a_run_of_two_processes_resumes_on_one(tmp_path, monkeypatch):
    """A checkpoint of two processes resumes on one, with a warning: the step, weights and losses log carry over,
    the next global batch is the one the two processes would have read, and the process's RNG is seeded from
    (seed, rank, step), as the two saved states do not map onto one process."""
    mp.spawn(fit_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    saved = load_file(str(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"))
    batches: list[torch.Tensor] = []
    rng_at_first_step: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        batches.append(x)
        rng_at_first_step.append(torch.get_rng_state())
        return x

    monkeypatch.setattr(data, "random_hflip", record)
    run = resumable_run(str(tmp_path), 3)
    with pytest.warns(UserWarning, match="written by 2 processes and resumes on 1"):
        trainer = fit(run, progress=False)
    assert trainer.step == 3
    assert [json.loads(line)["step"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()] == [0, 1, 2]
    calls = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]  # rank 0's alone
    assert [(c["start_step"], c["environment"]["world_size"]) for c in calls] == [(0, 2), (2, 1)]
    dataset = data.open_dataset("synthetic", TINY_CONFIG["input_size"])
    rows = next(iter(data.StepBatchSampler(len(dataset), 3, rank=1, world_size=2, start_step=2)))
    assert torch.equal(batches[0][3:], torch.stack([dataset[i][0] for i in rows]))  # rank 1's half of step 2
    torch.manual_seed(process_seed(run.train.seed, 0, 2))
    assert torch.equal(rng_at_first_step[0], torch.get_rng_state())
    resumed, _ = load_checkpoint(tmp_path / "checkpoints" / "step-00000002")
    assert all(torch.equal(v, saved[k]) for k, v in resumed.state_dict().items())


def split_resume_worker(rank: int, world: int, port: int, out: str) -> None:
    join_group(rank, world, port, timedelta(seconds=60))
    try:
        fit(resumable_run(f"{out}/run" if rank == 0 else f"{out}/elsewhere", 3), progress=False)
    except ValueError as err:
        Path(out, f"error{rank}").write_text(str(err))
    leave_distributed()


def test_processes_that_find_different_checkpoints_are_refused(tmp_path):
    """A process that finds no checkpoint (a node without the shared folder) would start at step 0 while the others
    resume: all of them stop before training, naming each rank's start, instead of averaging gradients of different
    weights until a collective times out."""
    fit(resumable_run(str(tmp_path / "run"), 2), progress=False)  # rank 0 will find its step-2 checkpoint
    mp.spawn(split_resume_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"error{rank}").read_text()
        assert "rank 0 at step 2" in message and "rank 1 at step 0 (no checkpoint) on 'synthetic'" in message
        assert "every process must see the same run folder and data" in message
    assert not (tmp_path / "elsewhere" / "checkpoints").exists()  # stopped before any step


def other_data_worker(rank: int, world: int, port: int, out: str) -> None:
    join_group(rank, world, port, timedelta(seconds=60))
    if rank == 1:  # a node whose copy of the data holds other images
        data.open_dataset = lambda *args, **kwargs: data.SyntheticShapes(size=4000, image_size=16)
    try:
        fit(resumable_run(out, 2), progress=False)
    except ValueError as err:
        Path(out, f"error{rank}").write_text(str(err))
    leave_distributed()


def test_processes_that_read_other_data_are_refused(tmp_path):
    """A node that falls back to synthetic shapes, or holds another copy of an image folder, would index other
    images than the others under the same sampler: every process stops before training, naming each one's data."""
    mp.spawn(other_data_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"error{rank}").read_text()
        assert "rank 0 at step 0 (no checkpoint) on 'synthetic' (4096 images)" in message
        assert "rank 1 at step 0 (no checkpoint) on 'synthetic' (4000 images)" in message
    assert not (tmp_path / "checkpoints").exists()


def autoencoder_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model.decoder(model.f(model.encoder(x, y)), y).square().mean()


def fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    join_group(rank, world, port, timedelta(seconds=60))
    model = no_label_dropout(tiny_model(**TWO_LAYERS)).train()
    for net in (model.encoder, model.decoder):
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
    fully_shard(model)
    loss = autoencoder_loss(model, *tiny_batch(4))
    loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out}/fsdp.pt")
    leave_distributed()


def test_fsdp2_shards_per_block(tmp_path):
    """FSDP2's usual recipe, fully_shard on each block, then each network, then the model: a block reads only its
    own parameters (the MLP's residual add runs in the next block, with its norm), so each block's all-gather
    comes before its forward. Two processes on the same batch give one process's loss and gradients."""
    mp.spawn(fsdp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "fsdp.pt")
    model = no_label_dropout(tiny_model(**TWO_LAYERS)).train()
    loss = autoencoder_loss(model, *tiny_batch(4))
    loss.backward()
    torch.testing.assert_close(sharded["loss"], loss.detach())
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == sharded["grads"].keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
