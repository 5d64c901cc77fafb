"""AdamW8bit under DistributedDataParallel: two CPU processes (gloo) stay bit-identical.

The test spawns its own two ranks on a free localhost port. Each rank trains a small model
on its own shard of the data; DDP all-reduces the gradients, so both ranks must take
exactly the same 8-bit steps. Each rank writes its final parameters and optimizer state
to a file, and the test compares them bit for bit (and with a single-process run on the
averaged gradient, which DDP's all-reduce must reproduce).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn

WORLD_SIZE = 2
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 64*96 = 6144 weights: 8-bit state; biases and the head keep float32 state.
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 1))


def _data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(32, 64, generator=g)
    return x, x[:, :1] * 0.5 - x[:, 1:2]


def _worker(rank: int, port: int, out_dir: str) -> None:
    import lowprec_kernels as lpk

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        opt = lpk.optim.AdamW8bit(model.parameters(), lr=1e-2)
        x, y = _data(rank)
        for _ in range(STEPS):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        state = {i: opt.state[p] for i, p in enumerate(model.parameters())}
        torch.save(
            {"params": [p.detach() for p in model.parameters()], "state": state},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (the results are on disk). In torch 2.14 the
    # gloo worker thread may still be destroying the last all-reduce's work object while the
    # interpreter shuts down; its thread-local state holds a Python object, so it takes the
    # GIL, is made to exit, and the process aborts ("terminate called without an active
    # exception", about 1 run in 10 here; core dump: ProcessGroupGloo::runLoop ->
    # ~AsyncAllreduceWork -> ~ThreadLocalState -> gil_scoped_acquire -> pthread_exit).
    os._exit(0)


def _single_process_on_averaged_gradients():
    import lowprec_kernels as lpk

    model = _model()
    opt = lpk.optim.AdamW8bit(model.parameters(), lr=1e-2)
    shards = [_data(rank) for rank in range(WORLD_SIZE)]
    for _ in range(STEPS):
        grads = []
        for x, y in shards:
            model.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *per_rank in zip(model.parameters(), *grads):
            p.grad = sum(per_rank) / WORLD_SIZE
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_ranks_stay_bit_identical(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    for i, (a, b) in enumerate(zip(ranks[0]["params"], ranks[1]["params"])):
        assert torch.equal(a, b), f"parameter {i} differs between ranks"
    for i in ranks[0]["state"]:
        for key, value in ranks[0]["state"][i].items():
            assert torch.equal(value, ranks[1]["state"][i][key]), f"state {i} {key} differs"
    assert ranks[0]["state"][0]["state1"].dtype == torch.uint8
    assert ranks[0]["state"][0]["step"].item() == STEPS
    # DDP's all-reduce averages in float32 like the single-process sum / 2 (exact for two
    # ranks: one rounding of the sum, an exact halving), so the runs agree bit for bit.
    for i, (a, b) in enumerate(zip(ranks[0]["params"], _single_process_on_averaged_gradients())):
        assert torch.equal(a, b), f"parameter {i}: DDP differs from the averaged-gradient run"


_DTENSOR_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore
import lowprec_kernels as lpk

dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
mesh = init_device_mesh("cpu", (2,))
p = torch.nn.Parameter(distribute_tensor(torch.randn(64, 96), mesh, [Shard(0)]))
try:
    lpk.optim.AdamW8bit([p])
except TypeError as e:
    print("refused:", e)
opt = lpk.optim.AdamW8bit([torch.nn.Parameter(torch.randn(8))])
opt.param_groups[0]["params"].append(p)  # put in a group behind the optimizer's back
p.grad = torch.zeros_like(p)
try:
    opt.step()
except TypeError as e:
    print("refused at the step:", e)
dist.destroy_process_group()
"""


def test_sharded_dtensor_parameters_are_refused_by_name():
    """FSDP2 / tensor-parallel parameters (DTensors) are refused with a message saying why,
    when the optimizer is made and at its first step, instead of failing inside an op or
    keeping a whole-tensor state on every rank. A fake process group of two ranks, in a
    process of its own."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _DTENSOR_SCRIPT], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith("refused: AdamW8bit: a parameter of shape (64, 96) is a DTensor")
    assert lines[1].startswith("refused at the step: AdamW8bit: a parameter of shape (64, 96)")
