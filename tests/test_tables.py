"""lowprec_kernels._tables: host-built tables cached per key and copied without a wait."""

from __future__ import annotations

import sys
import threading

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lowprec_kernels as lpk
from lowprec_kernels import _tables
from lowprec_kernels.optim import adam8bit as optim_adam8bit


def test_a_table_is_built_once_per_key():
    cache = _tables.TableCache(size=3)
    builds = []

    def build(value):
        builds.append(value)
        return torch.tensor([value])

    first = cache.get(("a", 1), lambda: build(1))
    assert cache.get(("a", 1), lambda: build(2)) is first
    assert builds == [1] and len(cache) == 1


def test_a_full_cache_drops_the_least_recently_used():
    cache = _tables.TableCache(size=2)
    cache.get(0, lambda: torch.zeros(1))
    cache.get(1, lambda: torch.zeros(1))
    assert cache.get(0, lambda: torch.ones(1)).item() == 0.0  # a hit: 0 is now the newest
    cache.get(2, lambda: torch.zeros(1))  # the third key drops 1, the least recently used
    assert len(cache) == 2
    assert cache.get(0, lambda: torch.ones(1)).item() == 0.0
    assert cache.get(1, lambda: torch.ones(1)).item() == 1.0  # rebuilt


def test_a_cpu_table_is_not_copied():
    table = torch.arange(5)
    assert _tables.to_device(table, torch.device("cpu")) is table
    assert _tables.device_key(torch.device("cpu")) == torch.device("cpu")


def test_other_devices_get_a_plain_copy():
    """Only CUDA tables go through pinned memory (pinning needs a CUDA driver)."""
    table = _tables.to_device(torch.arange(5), torch.device("meta"))
    assert table.device.type == "meta" and table.shape == (5,)


def test_the_float_state_tensor_ops_reuse_their_sizes(monkeypatch):
    """The optimizers' tensor-op step (here under a forced reference backend) builds the
    tensors' sizes table once for a group, not at every step."""
    cache = _tables.TableCache()
    monkeypatch.setattr(optim_adam8bit, "_tensor_sizes", cache)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (10, 33, 7)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = lpk.optim.AdamW8bit(params), torch.optim.AdamW(twins)
    built = []
    original = cache.get

    def counting_get(key, build):
        return original(key, lambda: built.append(key) or build())

    monkeypatch.setattr(cache, "get", counting_get)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        with lpk.use_backend("reference"):
            ours.step()
        theirs.step()
    assert built == [((10, 33, 7), torch.device("cpu"))]
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


def test_a_fake_step_caches_nothing():
    """A step under FakeTensorMode (memory estimation, fake initialisation) must not leave a
    fake table for the next real step of the same layout."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 6)]
    opt = lpk.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    with lpk.use_backend("reference"):
        with FakeTensorMode():
            fakes = [torch.nn.Parameter(torch.randn(n)) for n in (5, 6)]
            fake_opt = lpk.optim.AdamW8bit(fakes)
            for p in fakes:
                p.grad = torch.randn_like(p)
            fake_opt.step()
        opt.step()
    assert all(opt.state[p]["step"].item() == 1.0 for p in params)


def test_the_float_state_tensor_ops_step_meta_tensors():
    params = [torch.nn.Parameter(torch.randn(n, device="meta")) for n in (10, 33)]
    opt = lpk.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(opt.state[p]["step"].device.type == "meta" for p in params)


def test_cache_is_safe_for_threads():
    """Threads filling and evicting one cache at once (optimizers stepped from several
    threads): no KeyError from two evictions of the same oldest key, the size bound holds."""
    cache = _tables.TableCache(size=8)
    errors = []

    def work(offset):
        try:
            for i in range(3000):
                key = (offset, i % 50)
                assert cache.get(key, lambda k=key: torch.tensor(k)).tolist() == list(key)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: widens every race
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and len(cache) <= 8
