"""The native extension ``lowprec_kernels._C``: what was built, the CPU ISA choice, the shared
header math, and the blockwise 8-bit kernels bit for bit on every CPU ISA path.

The ISA paths are switched in-process with ``_C.set_cpu_isa`` (the ``cpu_isa`` fixture);
the ``LOWPREC_CPU_ISA`` environment variable, read once per process, is tested in
subprocesses. The kernels are checked against a brute-force nearest-entry encoder written
here (independent of the threshold rule they implement) and against the shared reference.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import SUPPORTED_CPU_ISAS

import lowprec_kernels as lpk
from lowprec_kernels import _ops
from lowprec_kernels.reference import blockwise as reference
from lowprec_kernels.reference.codebooks import dynamic_map, encode_thresholds
from lowprec_kernels.reference.int8 import INT8_SCALE

_C = pytest.importorskip("lowprec_kernels._C", reason="native extension not built")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("f32", "f16", "bf16")
BLOCKSIZES = _ops.BLOCKSIZES_8BIT
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


# ------------------------------------------------------------------------------ build_info


def test_build_info_describes_the_build():
    info = _C.build_info()
    assert info["compiled"] is True
    assert "scalar" in info["cpu_isa_compiled"]
    if IS_X86:
        assert info["cpu_isa_compiled"] == ["scalar", "avx2", "avx512"]
    assert set(info["cpu_isa_supported"]) <= set(info["cpu_isa_compiled"])
    assert info["cpu_isa"] in info["cpu_isa_supported"]
    assert info["torch_version"] == torch.__version__
    assert info["compiler"] and info["cplusplus"] >= 201703
    assert info["cuda_compiled"] == hasattr(_C, "quantize_blockwise_cuda")
    if info["cuda_compiled"]:
        assert info["cuda_arch_list"]
        assert info["cuda_runtime_version"] // 1000 == int(torch.version.cuda.split(".")[0])
    # The package-level wrapper adds what is usable on top.
    assert lpk.build_info()["available_backends"]["cpu"] is True


def test_cpp_constants_match_python():
    constants = _C.build_info()["constants"]
    assert constants["int8_scale"] == INT8_SCALE
    assert constants["codebook_size_8bit"] == _ops.CODEBOOK_SIZE_8BIT
    assert constants["codebook_size_4bit"] == _ops.CODEBOOK_SIZE_4BIT
    assert constants["blocksize_min_8bit"] == min(_ops.BLOCKSIZES_8BIT)
    assert constants["blocksize_max_8bit"] == max(_ops.BLOCKSIZES_8BIT)


def test_cuda_backend_registration_matches_build():
    from lowprec_kernels.backends import cuda as cuda_backend

    assert _C.build_info()["cuda_compiled"] == cuda_backend.COMPILED
    assert lpk.available_backends()["cuda"] == (cuda_backend.COMPILED and torch.cuda.is_available())


# ------------------------------------------------------------------------------ ISA choice


def test_set_cpu_isa_switches_and_validates():
    best = _C.set_cpu_isa("auto")
    assert best == SUPPORTED_CPU_ISAS[-1]
    for isa in SUPPORTED_CPU_ISAS:
        assert _C.set_cpu_isa(isa) == isa == _C.get_cpu_isa() == _C.build_info()["cpu_isa"]
    with pytest.raises(ValueError, match="must be one of"):
        _C.set_cpu_isa("sse9")
    for isa in set(_C.build_info()["cpu_isa_compiled"]) - set(SUPPORTED_CPU_ISAS):
        with pytest.raises(ValueError, match="not supported"):
            _C.set_cpu_isa(isa)
    assert _C.set_cpu_isa("auto") == best


def _isa_in_subprocess(env_value: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LOWPREC_CPU_ISA", None)
    if env_value is not None:
        env["LOWPREC_CPU_ISA"] = env_value
    # Also runs a small quantization on the chosen path, compared with the reference.
    script = (
        "import torch, lowprec_kernels\n"
        "from lowprec_kernels import _C\n"
        "from lowprec_kernels.reference import blockwise as ref\n"
        "from lowprec_kernels.reference.codebooks import dynamic_map\n"
        "x = torch.randn(1000) ; code = dynamic_map()\n"
        "q = torch.empty(1000, dtype=torch.uint8); a = torch.empty(4)\n"
        "_C.quantize_blockwise_cpu(x, code, 256, q, a)\n"
        "rq, ra = ref.quantize_blockwise(x, code, 256)\n"
        "assert torch.equal(q, rq) and torch.equal(a, ra)\n"
        "print(_C.get_cpu_isa())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
@pytest.mark.parametrize("requested", ["scalar", "avx2", "avx512", "auto", None, "bogus"])
def test_env_var_lowers_the_isa(requested):
    done = _isa_in_subprocess(requested)
    assert done.returncode == 0, done.stderr
    best = SUPPORTED_CPU_ISAS[-1]
    order = ["scalar", "avx2", "avx512"]
    if requested in order:  # the environment can only lower the choice
        expected = order[min(order.index(requested), order.index(best))]
    else:
        expected = best
    assert done.stdout.strip() == expected
    if requested == "bogus":
        assert "ignoring LOWPREC_CPU_ISA=bogus" in done.stderr


def _python(script: str, **env_vars) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_vars}
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_missing_extension_is_said_at_import():
    """Without _C every op falls back to the slow reference: a warning says so once."""
    done = _python(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'lowprec_kernels._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import lowprec_kernels as lpk\n"
        "print(lpk.build_info()['compiled'])\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert "native extension did not load (blocked for the test)" in done.stderr


@pytest.mark.parametrize(
    "value, enabled, warns",
    [("0", False, False), ("off", False, False), ("False", False, False),
     ("1", True, False), ("yes", True, False), ("maybe", True, True)],
)  # fmt: skip
def test_lowprec_eager_values(value, enabled, warns):
    done = _python(
        "import lowprec_kernels as lpk; print(lpk.build_info()['eager_entries'])",
        LOWPREC_EAGER=value,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(enabled)
    assert ("LOWPREC_EAGER='maybe' is not one of" in done.stderr) == warns


# ---------------------------------------------------------------------- shared header math


def _midpoints_from_reference(code: torch.Tensor) -> torch.Tensor:
    return encode_thresholds(code)[:-1]


def test_threshold_rule_matches_python_reference():
    pairs = []
    for signed in (True, False):
        code = dynamic_map(signed)
        pairs += list(zip(code[:-1].tolist(), code[1:].tolist(), strict=True))
    one = torch.tensor(1.0)
    next_up = torch.nextafter(one, torch.tensor(2.0)).item()
    pairs += [
        (1.0, next_up),  # midpoint not representable: the threshold is the lower entry
        (0.0, 0.0),
        (-1.0, 1.0),
        (0.25, 0.75),  # representable midpoint: exactly 0.5
        (-3.4e38, 3.4e38),
        (1e-45, 3e-45),  # subnormals
        (-0.1, 0.30000001192092896),
    ]
    g = torch.Generator().manual_seed(1)
    random_pairs = torch.randn(200, 2, generator=g).sort(dim=1).values
    pairs += [tuple(p) for p in random_pairs.tolist()]
    lower = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    upper = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    native = torch.tensor(
        [_C.midpoint_threshold(a, b) for a, b in zip(lower.tolist(), upper.tolist(), strict=True)],
        dtype=torch.float32,
    )
    # The reference builds thresholds for a whole sorted codebook; apply it pair by pair.
    want = torch.stack(
        [_midpoints_from_reference(torch.stack([a, b])) for a, b in zip(lower, upper, strict=True)]
    ).reshape(-1)
    assert torch.equal(native.view(torch.int32), want.view(torch.int32))
    # The defining property: the largest float32 not above the exact midpoint.
    mid = (lower.double() + upper.double()) / 2
    assert (native.double() <= mid).all()
    above = torch.nextafter(native, torch.full_like(native, float("inf")))
    assert (above.double() > mid).all()


# --------------------------------------------------------------- blockwise 8-bit, bit for bit


def _nearest_codes(v: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Brute force: the index of the entry nearest to each v, ties to the lower index, NaN -> 0.

    Distances of float32 values in [-1, 1] are exact in float64, so exact ties are found.
    """
    v64 = v.double().reshape(-1, 1)
    distance = (v64 - code.double().reshape(1, -1)).abs()
    idx = distance.argmin(dim=1)  # the first minimum: ties go low
    return torch.where(torch.isnan(v.reshape(-1)), torch.zeros_like(idx), idx).to(torch.uint8)


def _quantize_by_hand(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)  # propagates NaN
    scale = absmax.unsqueeze(1)
    v = torch.where(scale == 0, torch.zeros_like(blocks), blocks / scale)
    codes = _nearest_codes(v.reshape(-1)[:n], code)
    return codes.view(x.shape), absmax


def _native_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Runs the CPU kernel twice, into outputs poisoned two different ways, and checks both
    runs agree, so an element the kernel never writes cannot pass by luck."""
    results = []
    for poison in (0x00, 0xFF):
        codes = torch.full(x.shape, poison, dtype=torch.uint8)
        absmax = torch.full(((x.numel() + blocksize - 1) // blocksize,), float(poison))
        _C.quantize_blockwise_cpu(x, code, blocksize, codes, absmax)
        results.append((codes, absmax))
    (c0, a0), (c1, a1) = results
    assert torch.equal(c0, c1)
    _assert_same_floats(a0, a1)
    return c0, a0


def _assert_same_floats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal, except that any NaN matches any NaN (payloads may differ)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    a_bits = actual.reshape(-1).view(int_type)[~nan.reshape(-1)]
    e_bits = expected.reshape(-1).view(int_type)[~nan.reshape(-1)]
    mismatch = (a_bits != e_bits).nonzero()
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} values differ, first at {mismatch[0].item()}: "
        f"{actual.reshape(-1)[~nan.reshape(-1)][mismatch[0]].item()} vs "
        f"{expected.reshape(-1)[~nan.reshape(-1)][mismatch[0]].item()}"
    )


def _check_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    codes, absmax = _native_quantize(x, code, blocksize)
    want_codes, want_absmax = _quantize_by_hand(x, code, blocksize)
    _assert_same_floats(absmax, want_absmax)
    diff = (codes != want_codes).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} codes differ, first at {diff[0].tolist()}"
    ref_codes, ref_absmax = reference.quantize_blockwise(x, code, blocksize)
    assert torch.equal(codes, ref_codes)
    _assert_same_floats(absmax, ref_absmax)
    return codes, absmax


def _sizes(blocksize: int) -> list[int]:
    return sorted({1, 17, blocksize - 1, blocksize, blocksize + 1, 3 * blocksize + 17, 5000})


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_random_all_sizes(cpu_isa, dtype, blocksize):
    code = dynamic_map(signed=True)
    for n in _sizes(blocksize):
        x = (torch.randn(n) * 3).to(dtype)
        _check_quantize(x, code, blocksize)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_quantize_unsigned_map_and_shapes(cpu_isa, dtype):
    code = dynamic_map(signed=False)
    x = torch.rand(7, 13, 11).to(dtype)  # any shape; codes keep it
    codes, _ = _check_quantize(x, code, 64)
    assert codes.shape == x.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_quantize_special_blocks(cpu_isa, dtype):
    code = dynamic_map(signed=True)
    blocksize = 64
    x = (torch.randn(8 * blocksize + 5) * 10).to(dtype)
    x[3] = float("nan")  # block 0: absmax NaN, every code 0
    x[blocksize : 2 * blocksize] = 0.0  # block 1: all zero
    x[blocksize + 7] = -0.0
    x[2 * blocksize + 9] = float("inf")  # block 2: absmax inf, inf/inf = NaN -> 0, rest -> 0.0
    x[3 * blocksize : 4 * blocksize] = torch.finfo(dtype).tiny / 4  # block 3: subnormal scale
    x[4 * blocksize + 1] = -torch.finfo(dtype).max  # block 4: largest magnitude, negative
    x[8 * blocksize :] = float("nan")  # the partial last block, all NaN
    codes, absmax = _check_quantize(x, code, blocksize)
    zero_code = int((code == 0).nonzero()[0])
    assert torch.isnan(absmax[0]) and (codes[:blocksize] == 0).all()
    assert absmax[1] == 0 and (codes[blocksize : 2 * blocksize] == zero_code).all()
    assert torch.isinf(absmax[2])
    assert torch.isnan(absmax[8])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_all_zero_partial_last_block(cpu_isa, dtype, blocksize):
    """An all-zero block takes a fast path that writes its codes at once; on a partial last
    block it must write exactly the tail (a version writing whole vectors only passed the
    whole-block cases above)."""
    code = dynamic_map(signed=True)
    for tail in sorted({1, 17, blocksize - 1}):
        x = (torch.randn(2 * blocksize + tail) * 3).to(dtype)
        x[2 * blocksize :] = 0.0
        _check_quantize(x, code, blocksize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_quantize_ties_at_midpoints_go_low(cpu_isa, dtype):
    """v exactly at a representable midpoint encodes as the lower entry; one ulp above as the
    upper one (both exercise the last search steps of the vector paths)."""
    code = dynamic_map(signed=True)
    mid = (code[:-1].double() + code[1:].double()) / 2
    representable = mid.float().double() == mid
    ties = mid[representable].float()
    if dtype == torch.bfloat16:
        ties = ties[ties.to(torch.bfloat16).float() == ties]
    assert ties.numel() > 10
    above = torch.nextafter(ties, torch.tensor(2.0))
    below = torch.nextafter(ties, torch.tensor(-2.0))
    blocksize = 64
    values = torch.cat([ties, above, below])
    values = values[values.to(dtype).float() == values]
    per_block = blocksize - 1  # each block also holds 1.0, so absmax is 1 and v = x exactly
    chunks = values.split(per_block)
    x = torch.cat([torch.cat([torch.ones(1), c]) for c in chunks]).to(dtype)
    codes, absmax = _check_quantize(x, code, blocksize)
    assert (absmax == 1).all()
    tie_index = torch.searchsorted(code, ties.reshape(-1)) - 1  # the entry below the tie
    tie_codes = _nearest_codes(ties, code)
    assert torch.equal(tie_codes.long(), tie_index)


def test_quantize_many_blocks_threads_agree(cpu_isa):
    code = dynamic_map(signed=True)
    x = torch.randn(1_000_003)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native_quantize(x, code, 256)
        torch.set_num_threads(max(2, previous))
        many = _native_quantize(x, code, 256)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    ref_codes, ref_absmax = reference.quantize_blockwise(x, code, 256)
    assert torch.equal(many[0], ref_codes) and torch.equal(many[1], ref_absmax)


def _dequantize_by_hand(codes, absmax, code, blocksize, dtype):
    n = codes.numel()
    values = code[codes.reshape(-1).long()] * absmax.repeat_interleave(blocksize)[:n]
    return values.to(dtype).view(codes.shape)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_all_sizes(cpu_isa, dtype, blocksize):
    code = dynamic_map(signed=True)
    for n in _sizes(blocksize):
        nblocks = (n + blocksize - 1) // blocksize
        codes = torch.randint(0, 256, (n,), dtype=torch.uint8)
        absmax = torch.rand(nblocks) * 100 + 1e-3
        absmax[0] = float("nan") if nblocks > 2 else absmax[0]
        absmax[-1] = 0.0 if nblocks > 1 else absmax[-1]
        outs = []
        for poison in (0.0, float("nan")):
            out = torch.full((n,), poison, dtype=dtype)
            _C.dequantize_blockwise_cpu(codes, absmax, code, blocksize, out)
            outs.append(out)
        want = _dequantize_by_hand(codes, absmax, code, blocksize, dtype)
        _assert_same_floats(outs[0], want)
        _assert_same_floats(outs[1], want)
        _assert_same_floats(
            outs[0], reference.dequantize_blockwise(codes, absmax, code, blocksize, dtype)
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_dequantize_rounding_edges(cpu_isa, dtype):
    """Products that overflow, underflow to subnormals and sit at rounding ties of the 16-bit
    formats round exactly as torch's casts do."""
    code = dynamic_map(signed=True)
    blocksize = 64
    codes = torch.arange(256, dtype=torch.uint8).repeat(8)
    nblocks = codes.numel() // blocksize
    scales = [7e4, 1e5, 3e38, 1e-5, 6e-8, 1e-40, 1.0 + 2**-9, 2**-126]
    absmax = torch.tensor(scales * (nblocks // len(scales)), dtype=torch.float32)
    out = torch.empty(codes.shape, dtype=dtype)
    _C.dequantize_blockwise_cpu(codes, absmax, code, blocksize, out)
    _assert_same_floats(out, _dequantize_by_hand(codes, absmax, code, blocksize, dtype))


def test_roundtrip_through_registered_cpu_backend():
    code = dynamic_map(signed=True)
    x = torch.randn(3, 1000)
    with lpk.use_backend("cpu"):
        q, absmax = torch.ops.lowprec.quantize_blockwise(x, code, 256)
        x_hat = torch.ops.lowprec.dequantize_blockwise(q, absmax, code, 256, torch.bfloat16)
    ref_q, ref_absmax = reference.quantize_blockwise(x, code, 256)
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)
    want = reference.dequantize_blockwise(ref_q, ref_absmax, code, 256, torch.bfloat16)
    _assert_same_floats(x_hat, want)


def test_binding_rejects_what_would_corrupt_memory():
    code = dynamic_map(signed=True)
    x = torch.randn(300)
    codes = torch.empty(300, dtype=torch.uint8)
    absmax = torch.empty(5)
    with pytest.raises(RuntimeError, match="absmax must have"):
        _C.quantize_blockwise_cpu(x, code, 64, codes, torch.empty(4))
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.quantize_blockwise_cpu(torch.randn(600)[::2], code, 64, codes, absmax)
    with pytest.raises(RuntimeError, match="blocksize"):
        _C.quantize_blockwise_cpu(x, code, 100, codes, absmax)
    with pytest.raises(RuntimeError, match="code must have"):
        _C.quantize_blockwise_cpu(x, code[:16], 64, codes, absmax)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        _C.quantize_blockwise_cpu(x.double(), code, 64, codes, absmax)
    with pytest.raises(RuntimeError, match="codes must be"):
        _C.dequantize_blockwise_cpu(codes.to(torch.int8), absmax, code, 64, x)


# ---------------------------------------------------------------------- CUDA, when present


@pytest.mark.skipif(
    not (torch.cuda.is_available() and hasattr(_C, "quantize_blockwise_cuda")),
    reason="needs a GPU and the CUDA build",
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_cuda_kernels_match_cpu(dtype, blocksize):
    code = dynamic_map(signed=True)
    for n in _sizes(blocksize) + [1_000_003]:
        x = (torch.randn(n) * 3).to(dtype)
        x[0] = float("nan") if n > 3 * blocksize else x[0]
        want_codes, want_absmax = _native_quantize(x, code, blocksize)
        codes = torch.full((n,), 0xAB, dtype=torch.uint8, device="cuda")
        absmax = torch.full(want_absmax.shape, -1.0, device="cuda")
        _C.quantize_blockwise_cuda(x.cuda(), code.cuda(), blocksize, codes, absmax)
        assert torch.equal(codes.cpu(), want_codes)
        _assert_same_floats(absmax.cpu(), want_absmax)
        out = torch.full((n,), -7.0, dtype=dtype, device="cuda")
        _C.dequantize_blockwise_cuda(codes, absmax, code.cuda(), blocksize, out)
        want = torch.empty(n, dtype=dtype)
        _C.dequantize_blockwise_cpu(want_codes, want_absmax, code, blocksize, want)
        _assert_same_floats(out.cpu(), want)
