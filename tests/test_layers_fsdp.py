"""``Linear4bit`` and ``Linear8bitLt`` under FSDP2 (``fully_shard``): two CPU ranks (gloo)
started by the test.

FSDP2 shards the codes and, for each forward, puts the all-gathered codes back as a plain
Parameter: the 4-bit layer decodes them with the quant_state it noted beside its weight, the
int8 layer with its scales (a buffer, which FSDP2 leaves whole). Each rank checks its sharded
model against the unsharded one (output, and gradients to the input and the biases, as QLoRA
trains them) and writes the result to a file.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn

WORLD_SIZE = 2


def _model() -> nn.Module:
    from lowprec_kernels.nn import Linear4bit, Linear8bitLt

    torch.manual_seed(0)
    return nn.Sequential(Linear4bit(64, 40), nn.ReLU(), Linear8bitLt(40, 16))


def _outputs(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(7))
        expected_y, expected_grad = _outputs(_model(), x)
        model = _model()
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        y, grad = _outputs(model, x)
        # The sharded layer still knows its quantization (repr, properties, state_dict, which
        # read the weight's quant_state: the sharded DTensor has none of its own).
        keys = set(model.state_dict())
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        dcp_keys = set(get_model_state_dict(model))  # getattr'd weight.absmax on the DTensor
        result = {
            "output": torch.equal(y, expected_y),
            "input_grad": torch.equal(grad, expected_grad),
            "bias_grad": model[0].bias.grad is not None,
            "repr": "quant_type=nf4" in repr(model),
            "quant_type": model[0].quant_type == "nf4",
            "state_dict": {"0.weight", "0.weight.absmax", "2.SCB"} <= keys,
            "dcp_state_dict": dcp_keys == keys,
        }
    except Exception as e:  # noqa: BLE001 - reported by the test, not lost in a child process
        result = {"error": f"{type(e).__name__}: {e}"}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # see test_optim_distributed: gloo's teardown can abort the interpreter


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_fully_shard_matches_the_unsharded_model(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        checks = ("output", "input_grad", "bias_grad", "repr", "quant_type", "state_dict",
                  "dcp_state_dict")  # fmt: skip
        assert result == dict.fromkeys(checks, True), (rank, result)


@pytest.mark.parametrize("double_quant", [True, False])
def test_distributed_checkpoint_state_dict_round_trip(double_quant):
    """torch.distributed.checkpoint's state_dict API (FSDP2's checkpointing) resolves every
    key as an attribute path (``weight.absmax`` -> ``getattr(weight, "absmax")``): the layers
    answer each of their keys, and the round trip through it restores the model."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    from lowprec_kernels.nn import Linear4bit, Linear8bitLt

    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            Linear4bit(64, 40, double_quant=double_quant), nn.ReLU(), Linear8bitLt(40, 16)
        )

    source = model()
    sd = get_model_state_dict(source)
    assert sorted(sd) == sorted(source.state_dict())
    target = model()
    with torch.no_grad():  # make it differ
        target[0].weight.quant_state.absmax.mul_(2)
        target[2].SCB.mul_(2)
    set_model_state_dict(target, sd)
    x = torch.randn(3, 64)
    assert torch.equal(target(x), source(x))
