"""The fused 8-bit Adam / AdamW step in Triton: every tensor of a param group in one pass.

The definition is ``reference/adam8bit.py``; this kernel reproduces it bit for bit: float32
arithmetic in the written order (launched with ``enable_fp_fusion=False`` so no multiply-add
is contracted into an FMA; ``tl.math.div_rn`` / ``tl.math.sqrt_rn`` because Triton's ``/``
and ``sqrt`` are approximate on NVIDIA GPUs, and those two lower to ``div.rn.f32`` /
``sqrt.rn.f32``, which keep subnormals), every scalar coefficient computed in float64 and
rounded to float32 once, and the states requantized with the shared exact-nearest encoder
of ``blockwise.py``.

Many tensors, few launches. A param group's tensors (grouped by parameter dtype, which is a
compile-time constant of the kernel) are described by an int64 *address table*, one column
per tensor (the addresses of p, g, the states, step and skipped, its size and its first
program), and a *program table* giving each program its tensor. Every program owns
``BLOCKS_PER_PROGRAM`` quantization blocks of one tensor. A step is then, per dtype group:

1. ``_find_nonfinite_kernel``: flags each tensor whose gradient holds a NaN or an Inf;
2. the update scalars ``lr / (1 - beta1**t)``, ``1 / sqrt(1 - beta2**t)`` of each tensor's own
   step, in float64 (torch ops on the device: Triton's interpreter has no float64 ``pow``);
3. ``_adam8bit_update_kernel``: the fused update of every unflagged tensor;
4. ``_count_steps_kernel``: ``step = int(step) + 1`` for the updated tensors, ``skipped += 1`` for the
   flagged ones. It runs last because every program of step 3 reads the old step.

``adam_multi_step_`` (float32 m and v, the optimizers' tensors below ``min_8bit_size``) takes
the same four launches, its update kernel ``_adam_float_state_kernel`` the same arithmetic
(``_adam_update``) on programs of ``TILE_ELEMENTS`` elements, m and v in the state rows.

Nothing waits for the device: a flagged tensor is skipped by the kernels themselves. Both
tables are cached by the addresses and sizes they were built from (so an optimizer's steady
state re-sends nothing), and a freshly built table goes to the GPU by a non-blocking copy.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from lowprec_kernels._dispatch import register_kernel
from lowprec_kernels._tables import TableCache, device_key, to_device
from lowprec_kernels.backends.triton._utils import (
    device_guard,
    fp32_to,
    kernel_devices,
    num_warps_for,
    threshold_table,
    to_fp32,
)
from lowprec_kernels.backends.triton.blockwise import (
    CODEBOOK_BITS,
    TILE_ELEMENTS,
    TINY_ABSMAX,
    TINY_ABSMAX_SCALE,
    block_absmax,
    nearest_codes,
)
from lowprec_kernels.reference.adam8bit import step_counts, update_scalars

# Rows of the address table (one column per tensor).
FIELD_P = tl.constexpr(0)
FIELD_G = tl.constexpr(1)
FIELD_STATE1 = tl.constexpr(2)
FIELD_STATE2 = tl.constexpr(3)
FIELD_ABSMAX1 = tl.constexpr(4)
FIELD_ABSMAX2 = tl.constexpr(5)
FIELD_STEP = tl.constexpr(6)
FIELD_SKIPPED = tl.constexpr(7)
FIELD_NUMEL = tl.constexpr(8)
FIELD_FIRST_PROGRAM = tl.constexpr(9)
NUM_FIELDS = 10
# Tensors per program of the step-count kernel.
COUNT_TILE = 1024
# Bytes every address must be a multiple of for the kernels to assume vector-aligned rows
# (the caching allocator gives 512; views with odd offsets lose the hint, not correctness).
ALIGNMENT = 16

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tensor_ptr(table_ptr, field, n_tensors, tensor, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to element 0 of ``tensor``'s operand ``field`` (from the address table)."""
    ptr = tl.load(table_ptr + field * n_tensors + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _tensor_operands(
    table_ptr, update_scalars_ptr, n_tensors, tensor, P_DTYPE: tl.constexpr, ALIGNED: tl.constexpr
):
    """What every update kernel reads of its program's tensor: its first program, its size,
    p and g, and its update scalars."""
    first = tl.load(table_ptr + FIELD_FIRST_PROGRAM * n_tensors + tensor)
    numel = tl.load(table_ptr + FIELD_NUMEL * n_tensors + tensor)
    p_ptr = _tensor_ptr(table_ptr, FIELD_P, n_tensors, tensor, P_DTYPE, ALIGNED)
    g_ptr = _tensor_ptr(table_ptr, FIELD_G, n_tensors, tensor, P_DTYPE, ALIGNED)
    step_size = tl.load(update_scalars_ptr + tensor)
    inv_sqrt_bc2 = tl.load(update_scalars_ptr + n_tensors + tensor)
    return first, numel, p_ptr, g_ptr, step_size, inv_sqrt_bc2


# Every program but a tensor's last covers whole blocks inside the tensor: those take the
# unmasked path (MASKED=False), whose accesses the compiler can vectorize; masking with a
# size loaded from memory would make every access a scalar one.


@triton.jit
def _load(ptr, offsets, in_tensor, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offsets, mask=in_tensor, other=0)
    else:
        return tl.load(ptr + offsets)


@triton.jit
def _store(ptr, offsets, value, in_tensor, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offsets, value, mask=in_tensor)
    else:
        tl.store(ptr + offsets, value)


@triton.jit
def _find_nonfinite_kernel(
    table_ptr,
    program_tensor_ptr,
    nonfinite_ptr,
    n_tensors,
    G_DTYPE: tl.constexpr,
    TILE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(program_tensor_ptr + pid)
    first = tl.load(table_ptr + FIELD_FIRST_PROGRAM * n_tensors + tensor)
    numel = tl.load(table_ptr + FIELD_NUMEL * n_tensors + tensor)
    g_ptr = _tensor_ptr(table_ptr, FIELD_G, n_tensors, tensor, G_DTYPE, ALIGNED)
    start = (pid - first).to(tl.int64) * TILE
    offsets = start + tl.arange(0, TILE)
    if start + TILE <= numel:
        g = to_fp32(_load(g_ptr, offsets, None, MASKED=False))
    else:
        g = to_fp32(_load(g_ptr, offsets, offsets < numel, MASKED=True))
    bad = tl.max(((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32), axis=0)
    tl.atomic_max(nonfinite_ptr + tensor, bad, mask=bad > 0)


@triton.jit
def _adam_update(
    p, g, m, v, step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    weight_decay, decay_factor, gnorm_scale, APPLY_L2: tl.constexpr, APPLY_DECAY: tl.constexpr,
):  # fmt: skip
    """The reference's float32 expressions (``adam_update_corrected``), one rounding per
    operation, in its order: the new ``(p, m, v)``."""
    g = g * gnorm_scale
    if APPLY_L2:
        g = g + weight_decay * p
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    if APPLY_DECAY:
        p = p * decay_factor
    denominator = tl.math.sqrt_rn(v) * inv_sqrt_bc2 + eps
    p = p - step_size * tl.math.div_rn(m, denominator)
    return p, m, v


@triton.jit
def _update_tile(
    p_ptr, g_ptr, state1_ptr, state2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr, qmap2_ptr,
    thresholds1_ptr, thresholds2_ptr, step_size, inv_sqrt_bc2, first_block, numel,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
    gnorm_scale,
    P_DTYPE: tl.constexpr, APPLY_L2: tl.constexpr, APPLY_DECAY: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, MASKED: tl.constexpr,
    CODEBOOK_BITS: tl.constexpr, TINY_ABSMAX: tl.constexpr, TINY_ABSMAX_SCALE: tl.constexpr,
):  # fmt: skip
    """One program's tile of ``BLOCKS_PER_PROGRAM`` quantization blocks, one per row."""
    blocks = first_block + tl.arange(0, BLOCKS_PER_PROGRAM)
    offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    in_tensor = offsets < numel
    block_in_tensor = blocks * BLOCKSIZE < numel

    p = to_fp32(_load(p_ptr, offsets, in_tensor, MASKED))
    g = to_fp32(_load(g_ptr, offsets, in_tensor, MASKED))
    codes1 = _load(state1_ptr, offsets, in_tensor, MASKED).to(tl.int32)
    codes2 = _load(state2_ptr, offsets, in_tensor, MASKED).to(tl.int32)
    absmax1 = _load(absmax1_ptr, blocks, block_in_tensor, MASKED)
    absmax2 = _load(absmax2_ptr, blocks, block_in_tensor, MASKED)
    m = tl.load(qmap1_ptr + codes1) * absmax1[:, None]
    v = tl.load(qmap2_ptr + codes2) * absmax2[:, None]
    if MASKED:
        # Lanes past the tensor's end hold zeros throughout (g and p load as 0), which is
        # also how the requantization below must count them.
        m = tl.where(in_tensor, m, 0.0)
        v = tl.where(in_tensor, v, 0.0)

    p, m, v = _adam_update(
        p, g, m, v, step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2,
        eps, weight_decay, decay_factor, gnorm_scale, APPLY_L2, APPLY_DECAY,
    )  # fmt: skip
    _store(p_ptr, offsets, fp32_to(p, P_DTYPE), in_tensor, MASKED)

    # Requantize with fresh block absmax.
    new_absmax1 = block_absmax(m)
    new_absmax2 = block_absmax(v)
    codes1 = nearest_codes(
        m, new_absmax1, thresholds1_ptr, CODEBOOK_BITS, TINY_ABSMAX, TINY_ABSMAX_SCALE
    )
    codes2 = nearest_codes(
        v, new_absmax2, thresholds2_ptr, CODEBOOK_BITS, TINY_ABSMAX, TINY_ABSMAX_SCALE
    )
    _store(state1_ptr, offsets, codes1.to(tl.uint8), in_tensor, MASKED)
    _store(state2_ptr, offsets, codes2.to(tl.uint8), in_tensor, MASKED)
    _store(absmax1_ptr, blocks, new_absmax1, block_in_tensor, MASKED)
    _store(absmax2_ptr, blocks, new_absmax2, block_in_tensor, MASKED)


@triton.jit
def _adam8bit_update_kernel(
    table_ptr, program_tensor_ptr, nonfinite_ptr, update_scalars_ptr, qmap1_ptr, qmap2_ptr,
    thresholds1_ptr, thresholds2_ptr, n_tensors,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
    gnorm_scale,
    P_DTYPE: tl.constexpr, APPLY_L2: tl.constexpr, APPLY_DECAY: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, ALIGNED: tl.constexpr,
    CODEBOOK_BITS: tl.constexpr, TINY_ABSMAX: tl.constexpr, TINY_ABSMAX_SCALE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tensor = tl.load(program_tensor_ptr + pid)
    # A tensor with a non-finite gradient is left exactly as it was.
    if tl.load(nonfinite_ptr + tensor) == 0:
        first, numel, p_ptr, g_ptr, step_size, inv_sqrt_bc2 = _tensor_operands(
            table_ptr, update_scalars_ptr, n_tensors, tensor, P_DTYPE, ALIGNED
        )
        state1_ptr = _tensor_ptr(table_ptr, FIELD_STATE1, n_tensors, tensor, tl.uint8, ALIGNED)
        state2_ptr = _tensor_ptr(table_ptr, FIELD_STATE2, n_tensors, tensor, tl.uint8, ALIGNED)
        absmax1_ptr = _tensor_ptr(table_ptr, FIELD_ABSMAX1, n_tensors, tensor, tl.float32, ALIGNED)
        absmax2_ptr = _tensor_ptr(table_ptr, FIELD_ABSMAX2, n_tensors, tensor, tl.float32, ALIGNED)
        first_block = (pid - first).to(tl.int64) * BLOCKS_PER_PROGRAM
        whole_tile = (first_block + BLOCKS_PER_PROGRAM) * BLOCKSIZE <= numel
        if whole_tile:
            _update_tile(
                p_ptr, g_ptr, state1_ptr, state2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr,
                qmap2_ptr, thresholds1_ptr, thresholds2_ptr, step_size,
                inv_sqrt_bc2, first_block, numel, beta1, one_minus_beta1, beta2,
                one_minus_beta2, eps, weight_decay, decay_factor, gnorm_scale, P_DTYPE,
                APPLY_L2, APPLY_DECAY, BLOCKSIZE, BLOCKS_PER_PROGRAM, False, CODEBOOK_BITS,
                TINY_ABSMAX, TINY_ABSMAX_SCALE,
            )  # fmt: skip
        else:
            _update_tile(
                p_ptr, g_ptr, state1_ptr, state2_ptr, absmax1_ptr, absmax2_ptr, qmap1_ptr,
                qmap2_ptr, thresholds1_ptr, thresholds2_ptr, step_size,
                inv_sqrt_bc2, first_block, numel, beta1, one_minus_beta1, beta2,
                one_minus_beta2, eps, weight_decay, decay_factor, gnorm_scale, P_DTYPE,
                APPLY_L2, APPLY_DECAY, BLOCKSIZE, BLOCKS_PER_PROGRAM, True, CODEBOOK_BITS,
                TINY_ABSMAX, TINY_ABSMAX_SCALE,
            )  # fmt: skip


@triton.jit
def _float_state_tile(
    p_ptr, g_ptr, m_ptr, v_ptr, step_size, inv_sqrt_bc2, start, numel,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
    gnorm_scale,
    P_DTYPE: tl.constexpr, APPLY_L2: tl.constexpr, APPLY_DECAY: tl.constexpr,
    TILE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    offsets = start + tl.arange(0, TILE)
    in_tensor = offsets < numel
    p = to_fp32(_load(p_ptr, offsets, in_tensor, MASKED))
    g = to_fp32(_load(g_ptr, offsets, in_tensor, MASKED))
    m = _load(m_ptr, offsets, in_tensor, MASKED)
    v = _load(v_ptr, offsets, in_tensor, MASKED)
    p, m, v = _adam_update(
        p, g, m, v, step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2,
        eps, weight_decay, decay_factor, gnorm_scale, APPLY_L2, APPLY_DECAY,
    )  # fmt: skip
    _store(p_ptr, offsets, fp32_to(p, P_DTYPE), in_tensor, MASKED)
    _store(m_ptr, offsets, m, in_tensor, MASKED)
    _store(v_ptr, offsets, v, in_tensor, MASKED)


@triton.jit
def _adam_float_state_kernel(
    table_ptr, program_tensor_ptr, nonfinite_ptr, update_scalars_ptr, n_tensors,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
    gnorm_scale,
    P_DTYPE: tl.constexpr, APPLY_L2: tl.constexpr, APPLY_DECAY: tl.constexpr,
    TILE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """``adam_multi_step_``: one program's tile of ``TILE`` elements of one tensor, whose float32
    m and v sit in the address table's state rows."""
    pid = tl.program_id(0)
    tensor = tl.load(program_tensor_ptr + pid)
    if tl.load(nonfinite_ptr + tensor) == 0:
        first, numel, p_ptr, g_ptr, step_size, inv_sqrt_bc2 = _tensor_operands(
            table_ptr, update_scalars_ptr, n_tensors, tensor, P_DTYPE, ALIGNED
        )
        m_ptr = _tensor_ptr(table_ptr, FIELD_STATE1, n_tensors, tensor, tl.float32, ALIGNED)
        v_ptr = _tensor_ptr(table_ptr, FIELD_STATE2, n_tensors, tensor, tl.float32, ALIGNED)
        start = (pid - first).to(tl.int64) * TILE
        if start + TILE <= numel:
            _float_state_tile(
                p_ptr, g_ptr, m_ptr, v_ptr, step_size, inv_sqrt_bc2, start, numel, beta1,
                one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                gnorm_scale, P_DTYPE, APPLY_L2, APPLY_DECAY, TILE, False,
            )  # fmt: skip
        else:
            _float_state_tile(
                p_ptr, g_ptr, m_ptr, v_ptr, step_size, inv_sqrt_bc2, start, numel, beta1,
                one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                gnorm_scale, P_DTYPE, APPLY_L2, APPLY_DECAY, TILE, True,
            )  # fmt: skip


@triton.jit
def _count_steps_kernel(table_ptr, nonfinite_ptr, n_tensors, TILE: tl.constexpr):
    tensors = tl.program_id(0) * TILE + tl.arange(0, TILE)
    exists = tensors < n_tensors
    nonfinite = tl.load(nonfinite_ptr + tensors, mask=exists, other=0) != 0
    step_ptrs = tl.load(table_ptr + FIELD_STEP * n_tensors + tensors, mask=exists, other=0)
    skipped_ptrs = tl.load(table_ptr + FIELD_SKIPPED * n_tensors + tensors, mask=exists, other=0)
    step_ptrs = step_ptrs.to(tl.pointer_type(tl.float32))
    skipped_ptrs = skipped_ptrs.to(tl.pointer_type(tl.float32))
    stepped = exists & ~nonfinite
    step = tl.load(step_ptrs, mask=stepped)
    whole = tl.where(step < 0.0, tl.ceil(step), tl.floor(step))  # trunc: int(step), as t reads it
    tl.store(step_ptrs, whole + 1.0, mask=stepped)
    skip = exists & nonfinite
    tl.store(skipped_ptrs, tl.load(skipped_ptrs, mask=skip) + 1.0, mask=skip)


# --------------------------------------------------------------------------- tables


_program_tables = TableCache()
_address_tables = TableCache()


def _programs_per_tensor(numels: list[int], blocksize: int, blocks_per_program: int) -> list[int]:
    return [triton.cdiv(triton.cdiv(n, blocksize), blocks_per_program) for n in numels]


def _program_table(numels: list[int], blocksize: int, blocks_per_program: int, device):
    """int32 [n_programs]: the tensor each program works on."""

    def build():
        counts = torch.tensor(
            _programs_per_tensor(numels, blocksize, blocks_per_program), device="cpu"
        )
        table = torch.repeat_interleave(
            torch.arange(len(numels), dtype=torch.int32, device="cpu"), counts
        )
        return to_device(table, device)

    key = (tuple(numels), blocksize, blocks_per_program, device_key(device))
    return _program_tables.get(key, build)


def _address_table(operands: list[list[torch.Tensor]], numels, blocksize, bpp, device):
    """int64 [NUM_FIELDS, n_tensors]: the address rows in FIELD_* order, then sizes, then
    each tensor's first program."""
    addresses = tuple(tuple(t.data_ptr() for t in row) for row in operands)

    def build():
        counts = _programs_per_tensor(numels, blocksize, bpp)
        first_program = [0, *itertools.accumulate(counts)][:-1]
        rows = [list(row) for row in addresses] + [list(numels), first_program]
        assert len(rows) == NUM_FIELDS, "a row per FIELD_*"
        return to_device(torch.tensor(rows, dtype=torch.int64, device="cpu"), device)

    key = (addresses, tuple(numels), blocksize, bpp, device_key(device))
    return _address_tables.get(key, build)


def _check_host_steps(op: str, steps: list[torch.Tensor]) -> None:
    """Steps on the CPU (the interpreter's tensors) are checked as the reference and CPU
    kernels check theirs, before anything is written; a GPU's stay there, unchecked."""
    if steps and steps[0].device.type == "cpu":
        step_counts(op, steps)


def _update_scalars(
    steps: list[torch.Tensor], lr: float, beta1: float, beta2: float
) -> torch.Tensor:
    """float32 [2, n_tensors]: the reference's float64 ``update_scalars`` (step size,
    ``1 / sqrt(1 - beta2**t)``) for ``t = int(step) + 1``, rounded once; torch ops on the
    device, so the steps never travel to the host."""
    t = torch.stack([s.reshape(()) for s in steps]).to(torch.float64).trunc() + 1
    return torch.stack(update_scalars(lr, beta1, beta2, t)).to(torch.float32)


# --------------------------------------------------------------------------- launchers


def _launch_config(blocksize: int) -> tuple[int, int]:
    """(blocks per program, num_warps): the same tile as the blockwise kernels."""
    blocks_per_program = max(1, TILE_ELEMENTS // blocksize)
    return blocks_per_program, num_warps_for(blocks_per_program * blocksize)


def _update_arguments(lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale):
    """The update kernels' scalar arguments (in their order) and their two constexpr flags.
    Coefficients in float64 here; Triton passes float arguments as float32 (rounded to
    nearest), which is the single rounding the definition asks for."""
    scalars = (
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay,
        gnorm_scale,
    )  # fmt: skip
    flags = dict(
        APPLY_L2=(not decoupled) and weight_decay != 0.0,
        APPLY_DECAY=decoupled and weight_decay != 0.0,
    )
    return scalars, flags


def _step_one_dtype(operands, lr, beta1, beta2, blocksize, blocks_per_program, num_warps, update):
    """The step of one dtype group (module docstring): ``operands`` in the address table's row
    order, programs of ``blocks_per_program * blocksize`` elements; ``update(table,
    program_tensor, nonfinite, scalars, n_tensors, p_dtype, aligned)`` launches the update
    kernel, one program per entry of ``program_tensor``."""
    params, steps = operands[0], operands[6]
    device = params[0].device
    n_tensors = len(params)
    numels = [p.numel() for p in params]
    aligned = all(t.data_ptr() % ALIGNMENT == 0 for row in operands[:6] for t in row)
    table = _address_table(operands, numels, blocksize, blocks_per_program, device)
    program_tensor = _program_table(numels, blocksize, blocks_per_program, device)
    p_dtype = _TL_DTYPE[params[0].dtype]

    nonfinite = torch.zeros(n_tensors, dtype=torch.int32, device=device)
    _find_nonfinite_kernel[(program_tensor.numel(),)](
        table,
        program_tensor,
        nonfinite,
        n_tensors,
        G_DTYPE=p_dtype,
        TILE=blocks_per_program * blocksize,
        ALIGNED=aligned,
        num_warps=num_warps,
    )
    scalars = _update_scalars(steps, lr, beta1, beta2)
    update(table, program_tensor, nonfinite, scalars, n_tensors, p_dtype, aligned)
    _count_steps_kernel[(triton.cdiv(n_tensors, COUNT_TILE),)](
        table, nonfinite, n_tensors, TILE=COUNT_TILE
    )


def _per_dtype(params, step_one_dtype) -> None:
    """``step_one_dtype(indices)`` for each parameter dtype's tensors (a kernel argument)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    with device_guard(params[0]):
        for indices in by_dtype.values():
            step_one_dtype(indices)


def _pick(tensors, indices):
    return [tensors[i] for i in indices]


def adam8bit_multi_step_(
    params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, skipped,
    lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale, blocksize,
):  # fmt: skip
    _check_host_steps("adam8bit_multi_step_", steps)
    # Scalar arguments may arrive as ints; the kernels' float arguments must be floats.
    lr, beta1, beta2, eps, weight_decay, gnorm_scale = map(
        float, (lr, beta1, beta2, eps, weight_decay, gnorm_scale)
    )
    blocksize = int(blocksize)
    scalars, flags = _update_arguments(
        lr, beta1, beta2, eps, weight_decay, bool(decoupled), gnorm_scale
    )
    grads = [g.contiguous() for g in grads]
    # absmax is updated in place through raw addresses: a strided one goes through a copy.
    absmax1_dense = [a.contiguous() for a in absmax1]
    absmax2_dense = [a.contiguous() for a in absmax2]
    qmap1, qmap2 = qmap1.contiguous(), qmap2.contiguous()
    thresholds1, thresholds2 = threshold_table(qmap1), threshold_table(qmap2)
    blocks_per_program, num_warps = _launch_config(blocksize)

    def update(table, program_tensor, nonfinite, update_scalars, n_tensors, p_dtype, aligned):
        _adam8bit_update_kernel[(program_tensor.numel(),)](
            table, program_tensor, nonfinite, update_scalars, qmap1, qmap2, thresholds1,
            thresholds2, n_tensors, *scalars,
            P_DTYPE=p_dtype, BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=blocks_per_program,
            ALIGNED=aligned, CODEBOOK_BITS=CODEBOOK_BITS, TINY_ABSMAX=TINY_ABSMAX,
            TINY_ABSMAX_SCALE=TINY_ABSMAX_SCALE, num_warps=num_warps, enable_fp_fusion=False,
            **flags,
        )  # fmt: skip

    def step_one_dtype(indices):
        operands = [params, grads, state1, state2, absmax1_dense, absmax2_dense, steps, skipped]
        _step_one_dtype(
            [_pick(row, indices) for row in operands], lr, beta1, beta2, blocksize,
            blocks_per_program, num_warps, update,
        )  # fmt: skip

    _per_dtype(params, step_one_dtype)
    for dense, original in zip(absmax1_dense + absmax2_dense, absmax1 + absmax2):
        if dense is not original:
            original.copy_(dense)


def adam8bit_step_(
    p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step, skipped, *hyper
):  # fmt: skip
    adam8bit_multi_step_(
        [p], [g], [state1], [state2], [absmax1], [absmax2], qmap1, qmap2, [step], [skipped],
        *hyper,
    )  # fmt: skip


def adam_multi_step_(
    params, grads, exp_avgs, exp_avg_sqs, steps, skipped,
    lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale,
):  # fmt: skip
    """The step with float32 states: programs of ``TILE_ELEMENTS`` elements, the same four
    launches as the 8-bit step."""
    _check_host_steps("adam_multi_step_", steps)
    lr, beta1, beta2, eps, weight_decay, gnorm_scale = map(
        float, (lr, beta1, beta2, eps, weight_decay, gnorm_scale)
    )
    scalars, flags = _update_arguments(
        lr, beta1, beta2, eps, weight_decay, bool(decoupled), gnorm_scale
    )
    grads = [g.contiguous() for g in grads]
    num_warps = num_warps_for(TILE_ELEMENTS)

    def update(table, program_tensor, nonfinite, update_scalars, n_tensors, p_dtype, aligned):
        _adam_float_state_kernel[(program_tensor.numel(),)](
            table, program_tensor, nonfinite, update_scalars, n_tensors, *scalars,
            P_DTYPE=p_dtype, TILE=TILE_ELEMENTS, ALIGNED=aligned, num_warps=num_warps,
            enable_fp_fusion=False, **flags,
        )  # fmt: skip

    def step_one_dtype(indices):
        # The table's absmax rows repeat the states: this kernel reads no absmax.
        operands = [params, grads, exp_avgs, exp_avg_sqs, exp_avgs, exp_avg_sqs, steps, skipped]
        _step_one_dtype(
            [_pick(row, indices) for row in operands], lr, beta1, beta2, TILE_ELEMENTS, 1,
            num_warps, update,
        )  # fmt: skip

    _per_dtype(params, step_one_dtype)


for _device in kernel_devices():
    register_kernel("adam8bit_step_", backend="triton", device=_device)(adam8bit_step_)
    register_kernel("adam8bit_multi_step_", backend="triton", device=_device)(adam8bit_multi_step_)
    register_kernel("adam_multi_step_", backend="triton", device=_device)(adam_multi_step_)
