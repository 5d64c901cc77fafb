"""Backend registry: which kernel runs an op, for a device, under the active backend choice.

Every op in ``_ops.py`` has one router implementation registered with ``torch.library``.
The router validates the arguments once, then asks :func:`kernel_for` for the kernel of
the active backend. Backends register plain Python callables with :func:`register_kernel`;
those callables have exactly the op's signature and may assume validated arguments.

Choice order when no backend is forced: ``cuda`` then ``triton`` for CUDA tensors, ``cpu``
for CPU tensors, and ``reference`` for everything else. A forced backend (``use_backend``)
that has no kernel for the op on that device falls back to ``reference``, never to an
error: the reference runs on any device.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Default preference per device type, best first; "reference" always closes the list.
_DEFAULT_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# (op name, backend) -> {device type or "any": kernel}
_KERNELS: dict[tuple[str, str], dict[str, Callable]] = {}
# The same for eager entries (register_eager).
_EAGER: dict[tuple[str, str], dict[str, Callable]] = {}
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lowprec_backend", default=None
)
# Backends whose runtime is present (set by the backend modules when they load).
_AVAILABLE: dict[str, bool] = {name: name == "reference" for name in BACKENDS}


def _register(table: dict, op: str, backend: str, device: str) -> Callable[[Callable], Callable]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def decorate(fn: Callable) -> Callable:
        table.setdefault((op, backend), {})[device] = fn
        return fn

    return decorate


def register_kernel(op: str, backend: str, device: str = "any") -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``torch.ops.lowprec.<op>`` for ``backend`` on ``device``."""
    return _register(_KERNELS, op, backend, device)


def register_eager(op: str, backend: str, device: str = "any") -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` runs a whole plain eager call of ``op`` (validation, output, kernel) in
    one native call, for ``backend`` on ``device``. It takes the op's arguments unchecked and
    returns the op's result (True for an op that only writes into its arguments), or None
    (False) for arguments it does not accept, having written nothing: the caller then goes
    through the op's checker and ``register_kernel``'s kernel, which report them."""
    return _register(_EAGER, op, backend, device)


# LOWPREC_EAGER=0 turns the eager entries off (every plain eager call takes the checked path):
# for A/B timing and for ruling them out when something looks wrong.
_EAGER_OFF = ("0", "false", "off", "no")
_EAGER_ON = ("", "1", "true", "on", "yes")


def _eager_setting() -> bool:
    value = os.environ.get("LOWPREC_EAGER", "1").strip().lower()
    if value not in _EAGER_OFF + _EAGER_ON:
        warnings.warn(
            f"lowprec_kernels: LOWPREC_EAGER={value!r} is not one of {_EAGER_OFF + _EAGER_ON[1:]}; "
            "the eager entries stay on",
            stacklevel=2,
        )
    return value not in _EAGER_OFF


_EAGER_ENABLED = _eager_setting()


def eager_for(op: str, device_type: str) -> Callable | None:
    """The eager entry of the backend that runs ``op`` on ``device_type`` now, if it has one
    (and LOWPREC_EAGER is not 0)."""
    if not _EAGER_ENABLED:
        return None
    backend, _ = kernel_for(op, device_type)
    table = _EAGER.get((op, backend), {})
    return table.get(device_type) or table.get("any")


def mark_available(backend: str, available: bool = True) -> None:
    _AVAILABLE[backend] = available


def available_backends() -> dict[str, bool]:
    """Which backends can run here: ``{"reference": True, "cpu": bool, "cuda": bool, "triton": bool}``."""
    return dict(_AVAILABLE)


def active_backend() -> str | None:
    """The backend forced by the innermost ``use_backend`` block, or None (automatic choice)."""
    return _FORCED.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every lowprec op in this block (and this thread/task) to use backend ``name``.

    A forced backend that lacks a kernel for an op on the tensors' device falls back to
    ``reference``. Forcing a backend whose runtime is missing raises ``RuntimeError``.
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    if not _AVAILABLE.get(name, False):
        raise RuntimeError(
            f"use_backend: backend {name!r} is not available here "
            f"(available: {[b for b, ok in _AVAILABLE.items() if ok]})"
        )
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _lookup(op: str, backend: str, device_type: str) -> Callable | None:
    if not _AVAILABLE.get(backend, False):
        return None
    table = _KERNELS.get((op, backend), {})
    return table.get(device_type) or table.get("any")


def reference_kernel(op: str) -> Callable:
    """The reference kernel of ``op`` (it runs on any device)."""
    fn = _lookup(op, "reference", "any")
    if fn is None:
        raise NotImplementedError(f"lowprec::{op} has no reference kernel registered")
    return fn


def kernel_for(op: str, device_type: str) -> tuple[str, Callable]:
    """The (backend name, kernel) that runs ``op`` on ``device_type`` right now."""
    forced = _FORCED.get()
    order = (forced, "reference") if forced else _DEFAULT_ORDER.get(device_type, ("reference",))
    for backend in order:
        fn = _lookup(op, backend, device_type)
        if fn is not None:
            return backend, fn
    raise NotImplementedError(f"lowprec::{op} has no reference kernel registered")
