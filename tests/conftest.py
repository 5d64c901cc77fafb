"""Test harness: devices, backends, poisoned outputs, the Triton interpreter.

``LOWPREC_TEST_DEVICE`` (``cpu``, ``cuda`` or ``all``; default: every device present) picks
where kernels are tested; ``benchmarks/gpu_check.sh`` runs with ``cuda``. Without a GPU the
Triton kernels run on CPU tensors under the interpreter, which must be switched on before
triton is first imported: this file does it before importing the package.
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lowprec_kernels as lpk  # noqa: E402
from lowprec_kernels._alloc import poisoned  # noqa: E402

# Native backends per device; "reference" is always tested too.
_BACKENDS_FOR_DEVICE = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}


def devices_under_test() -> list[str]:
    wanted = os.environ.get("LOWPREC_TEST_DEVICE", "all")
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return present if wanted == "all" else [d for d in present if d == wanted]


def _triton_runs_on(device: str) -> bool:
    if device == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_params(include_reference: bool = False) -> list:
    """(device, backend) pairs that can run here, as pytest params with readable ids."""
    available = lpk.available_backends()
    params = []
    for device in devices_under_test():
        names = (("reference",) if include_reference else ()) + _BACKENDS_FOR_DEVICE[device]
        for name in names:
            ok = available[name] and (name != "triton" or _triton_runs_on(device))
            marks = () if ok else pytest.mark.skip(reason=f"backend {name} not available")
            params.append(pytest.param((device, name), id=f"{device}-{name}", marks=marks))
    return params


@pytest.fixture(params=backend_params())
def device_backend(request):
    """Each native backend on each device; the test compares it against ``reference``."""
    return request.param


@pytest.fixture(params=devices_under_test())
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _poison_outputs(request):
    """Every kernel output starts as poison with a guard band after it, so an unwritten element
    or a write past the end fails the test. Tests marked ``whole_storage`` get plain outputs:
    they hand them to code that wants each tensor to fill its storage (safetensors)."""
    if request.node.get_closest_marker("whole_storage"):
        yield
        return
    with poisoned():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The CPU paths (scalar, avx2, avx512) of the native extension this machine can run.
SUPPORTED_CPU_ISAS = tuple(lpk._C.build_info()["cpu_isa_supported"]) if lpk._C is not None else ()


@pytest.fixture(params=SUPPORTED_CPU_ISAS)
def cpu_isa(request):
    """Each CPU path this machine can run, restored to the automatic choice afterwards."""
    previous = lpk._C.get_cpu_isa()
    assert lpk._C.set_cpu_isa(request.param) == request.param
    yield request.param
    lpk._C.set_cpu_isa(previous)


def spy_on_router(monkeypatch, name: str) -> list:
    """Records the calls that skip torch's dispatcher for op ``name``: those ``_ops.call`` or
    ``_ops.route_mutating`` send straight to its router, and those its eager entries
    (``_dispatch.register_eager``) take. (The dispatcher calls the router it registered, not
    this one.)"""
    from lowprec_kernels import _dispatch, _ops

    calls = []

    def spying(fn):
        def spy(*args):
            calls.append(args)
            return fn(*args)

        return spy

    monkeypatch.setitem(_ops._ROUTERS, name, spying(_ops._ROUTERS[name]))
    for key, table in _dispatch._EAGER.items():
        if key[0] == name:
            monkeypatch.setitem(_dispatch._EAGER, key, {d: spying(fn) for d, fn in table.items()})
    return calls


def run_on(backend: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``backend`` forced."""
    with lpk.use_backend(backend):
        return fn(*args, **kwargs)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a wider tensor)."""
    wide = torch.empty((*t.shape[:-1], t.shape[-1] * 2), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view


# Source lines that scripts given to run_sm90_compile_script start with: compile(fn,
# signature, constexprs, **options) compiles a @triton.jit function for sm_90 (H100/H200).
SM90_COMPILE_PRELUDE = r"""
import json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile(fn, signature, constexprs, **options):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
"""


def run_sm90_compile_script(script: str):
    """Runs SM90_COMPILE_PRELUDE + ``script`` in a fresh interpreter and returns the JSON its
    last output line holds. Fresh, because TRITON_INTERPRET=1 (set for CPU test sessions)
    replaces every @triton.jit function by an interpreted one, which cannot be compiled.
    The GPU compiler catches what the interpreter lets through (a tl.dot whose out_dtype
    does not match its accumulator, a tile that needs more shared memory than the GPU has);
    no GPU is needed. Skips where this triton has no sm_90 compiler."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", SM90_COMPILE_PRELUDE + script],
        env=env, capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    if done.returncode != 0:
        if "ptxas" in done.stderr or "GPUTarget" in done.stderr:
            pytest.skip(f"this triton cannot compile for sm_90 here: {done.stderr[-300:]}")
        raise AssertionError(f"compiling for sm_90 failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_optimizer_float_states_take(monkeypatch, device: str, backend: str | None) -> None:
    """The optimizers step their float32-state tensors (below ``min_8bit_size``) by
    ``adam_multi_step_`` under ``backend`` (None: the device's default), one call per group,
    and the result equals that of their tensor-op path (forced reference backend) bit for
    bit, over several steps of a strided fp32 and a bf16 parameter."""
    torch.manual_seed(0)
    weight = torch.randn(40, 30, device=device)
    params = [
        torch.nn.Parameter(weight.t()),
        torch.nn.Parameter(torch.randn(77, device=device).bfloat16()),
    ]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    calls = spy_on_router(monkeypatch, "adam_multi_step_")
    fused = lpk.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1)
    plain = lpk.optim.AdamW8bit(twins, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, device=device).to(p.dtype)
            q.grad = p.grad.clone()
        with lpk.use_backend(backend) if backend else contextlib.nullcontext():
            fused.step()
        with lpk.use_backend("reference"):
            plain.step()
    assert [len(args[0]) for args in calls] == [2, 2, 2]
    for p, q in zip(params, twins):
        int_type = {2: torch.int16, 4: torch.int32}[p.element_size()]
        assert torch.equal(p.detach().view(int_type), q.detach().view(int_type))  # -0.0, NaNs
        for name in ("state1", "state2", "step"):
            assert torch.equal(fused.state[p][name], plain.state[q][name]), name


def assert_export_round_trip(model, make_input, op: str, tmp_path) -> None:
    """torch.export traces ``model`` with a dynamic batch (``make_input(rows)`` gives its
    input), the graph calls ``lowprec.<op>``, and the program saved and loaded again computes
    what the model does at other batch sizes too."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (make_input(3),), dynamic_shapes=({0: batch},))
    assert f"lowprec.{op}" in program.graph_module.code
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    for rows in (3, 5):
        x = make_input(rows)
        assert torch.equal(loaded(x), model(x))


def assert_backward_keeps_no_activation(layer, x: torch.Tensor) -> None:
    """``layer``'s autograd keeps no activation alive: an input computed just before it is
    freed once the forward is done (the linear ops' backward, grad_out @ W, needs only the
    weight), and the backward still reaches x."""
    x = x.requires_grad_()
    h = x * 2.0
    alive = weakref.ref(h)
    y = layer(h)
    del h
    assert alive() is None
    y.sum().backward()
    assert x.grad is not None


def free_port() -> int:
    """A free localhost TCP port, for tests that start their own torch.distributed ranks."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
