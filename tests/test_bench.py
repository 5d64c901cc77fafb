"""Smoke tests of the benchmark harness and CLI: tiny sizes, one repeat, structure only.

Nothing here asserts on speed: timings on shared machines are noise at these sizes.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from lowprec_kernels import bench
from lowprec_kernels.bench import harness
from lowprec_kernels.bench.__main__ import main

SMOKE = harness.Settings("cpu", harness.EFFORTS["smoke"])


def test_parse_cache_size():
    assert harness._parse_size("32768K\n") == 32 << 20
    assert harness._parse_size("1M") == 1 << 20
    assert harness.last_level_cache_bytes("cpu") > 0


def test_rotation_holds_distinct_copies_past_target():
    sample = (torch.zeros(1000), torch.zeros(10, dtype=torch.uint8))
    target = 10 * harness.nbytes(sample) + 1
    rot = harness.Rotation(sample, target)
    assert len(rot) * harness.nbytes(sample) >= target
    pointers = {rot.next()[0].data_ptr() for _ in range(len(rot))}
    assert len(pointers) == len(rot)  # every copy is its own memory
    assert harness.Rotation(sample, 0).copies.__len__() == 2  # at least two, alternating


def test_rotation_counted_over_what_one_function_reads():
    """A copy holding two functions' operands (an int8 and a dense weight): enough copies
    that the smaller share alone exceeds the target."""
    small, big = torch.zeros(100, dtype=torch.uint8), torch.zeros(1000)
    target = 10 * harness.nbytes(small)
    rot = harness.Rotation((small, big), target, read_per_call=harness.nbytes(small))
    assert len(rot) * harness.nbytes(small) >= target
    assert len(harness.Rotation((small, big), target)) == 2  # counted over the whole copy


def test_compare_interleaves_and_reports_ratio():
    calls = []
    rot = harness.Rotation(torch.ones(64), 0)
    timing = harness.compare(lambda x: calls.append("A"), lambda x: calls.append("B"), rot, SMOKE)
    # Interleaved, each timed sample after an untimed one of the same function (its settle).
    assert calls[-4:] == ["A", "A", "B", "B"]
    assert timing.pairs == 1 and timing.seconds > 0 and timing.baseline_seconds > 0
    lo, hi = timing.speedup_iqr
    assert lo <= timing.speedup <= hi


def test_roofline_takes_the_binding_limit():
    ceilings = harness.Ceilings(copy_gbps=10.0, fp32_gflops=100.0, bf16_gflops=200.0,
                                int8_gops=None)  # fmt: skip
    timing = harness.Timing(seconds=4.0, seconds_iqr=(4.0, 4.0), best_seconds=4.0, pairs=1)
    # 1 s of memory traffic at best, 3 s of fp32 GEMM at best: compute bound, 3 s / 4 s.
    gemm = harness.Row("s", "gemm", (4, 4), "float32", "cpu", timing,
                       bytes_moved=10 * 10**9, ops=300 * 10**9, compute="fp32")  # fmt: skip
    r = gemm.roofline(ceilings)
    assert r["limit"] == "fp32_gemm"
    assert math.isclose(r["roofline_fraction"], 0.75)
    assert math.isclose(r["gbps"], 2.5) and math.isclose(r["gops"], 75.0)
    memory_only = harness.Row("s", "q", (4,), "float32", "cpu", timing, bytes_moved=20 * 10**9)
    r = memory_only.roofline(ceilings)
    assert r["limit"] == "copy" and math.isclose(r["roofline_fraction"], 0.5)
    # A row that only reads is bounded by the read rate where one was measured.
    reader = harness.Row("s", "gemv", (4,), "float32", "cpu", timing, bytes_moved=20 * 10**9,
                         reads_only=True)  # fmt: skip
    assert reader.roofline(ceilings)["limit"] == "copy"  # no read rate measured
    ceilings.read_gbps = 20.0
    updater = harness.Row("s", "w", (1,), "float32", "cpu", timing, bytes_moved=2 * 10**9,
                          in_place=True)  # fmt: skip
    assert updater.roofline(ceilings)["limit"] == "copy"  # no update rate measured
    ceilings.update_gbps = 40.0
    r = updater.roofline(ceilings)
    assert r["limit"] == "update" and math.isclose(r["roofline_fraction"], 0.05 / timing.seconds)
    r = reader.roofline(ceilings)
    assert r["limit"] == "read" and math.isclose(r["roofline_fraction"], 0.25)


def test_missing_suite_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(bench, "SUITES", (*bench.SUITES, "not_written_yet"))
    assert bench.load_suite("not_written_yet") is None
    with pytest.raises(ValueError, match="unknown suite"):
        bench.load_suite("bogus")


def test_cli_smoke_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["all", "--smoke", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "ceilings (cpu" in printed and "== blockwise" in printed

    data = json.loads(path.read_text())
    assert data["command"].endswith("all --smoke --json " + str(path))
    machine = data["machine"]
    for key in ("cpu_model", "cores_available", "torch", "llc_bytes", "available_backends"):
        assert key in machine
    assert machine["available_backends"]["reference"] is True
    assert machine["versions"]["lowprec_kernels"] is not None  # installed editable or not
    assert "bitsandbytes" in machine["versions"] and "source_commit" in machine
    assert "speedup" in data["definitions"] and "floor_fraction" in data["definitions"]
    assert data["duration_seconds"] > 0
    ceilings = data["ceilings"]
    assert ceilings["copy_gbps"] > 0 and ceilings["fp32_gflops"] > 0
    assert ceilings["read_gbps"] > 0 and ceilings["update_gbps"] > 0
    assert ceilings["bf16_gflops"] > 0

    assert set(data["suites"]) == set(bench.SUITES)
    for name, suite in data["suites"].items():
        assert suite["status"] in ("ok", "not implemented yet"), (name, suite["status"])
    blockwise = data["suites"]["blockwise"]
    assert blockwise["status"] == "ok"
    whats = {row["what"] for row in blockwise["rows"]}
    assert {"copy_ (same bytes)", "quantize bs=256", "dequantize bs=256"} <= whats
    for row in blockwise["rows"]:
        assert row["timing"]["seconds"] > 0
        assert row["bytes_moved"] > 0 and row["gbps"] > 0
        assert row["limit"] == "copy" and row["roofline_fraction"] > 0
        if row["baseline"] == "reference":  # kernel rows vs reference run with a copy_ floor
            assert row["timing"]["floor_fraction"] > 0
        if row["baseline"] is not None:
            assert row["timing"]["speedup"] > 0
    baselines = {row["baseline"] for row in blockwise["rows"]} - {None}
    try:
        import bitsandbytes  # noqa: F401

        bnb = {"bnb quantize_blockwise", "bnb dequantize_blockwise"}
    except ImportError:
        bnb = set()
    assert baselines == {"reference"} | bnb


def test_cli_rejects_unknown_suite():
    with pytest.raises(SystemExit):
        main(["nope"])


def test_cli_rejects_unknown_backends_and_unwritable_paths_before_measuring(capsys):
    with pytest.raises(SystemExit):
        main(["blockwise", "--smoke", "--backend", "bogus"])
    # Refused at once (exit 2), before the ceilings and suites are measured.
    assert main(["blockwise", "--smoke", "--json", "/nonexistent-dir/x.json"]) == 2
    assert "directory does not exist" in capsys.readouterr().err


def test_cli_refuses_unusable_arguments_before_measuring(capsys, tmp_path, monkeypatch):
    """Each is refused with exit 2 and the option named, before anything is measured."""
    assert main(["blockwise", "--smoke", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path}: a directory" in capsys.readouterr().err
    assert main(["blockwise", "--smoke", "--backend", "triton"]) == 2  # a cuda backend
    assert "--backend triton: not a backend of --device cpu" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    assert main(["blockwise", "--smoke", "--plot", str(tmp_path / "p.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_cli_refuses_paths_it_could_not_write_before_measuring(capsys, tmp_path):
    """A path whose file cannot be created, or an empty one, is refused at once: not after
    the whole run, whose numbers would be lost."""
    assert main(["blockwise", "--smoke", "--json", "/proc/lowprec-bench.json"]) == 2
    assert "--json /proc/lowprec-bench.json: cannot be written" in capsys.readouterr().err
    assert main(["blockwise", "--smoke", "--json", ""]) == 2
    assert "--json: an empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the checks leave no file behind
    assert main(["blockwise", "--smoke", "--json", str(tmp_path / "x.json")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_cli_refuses_a_plot_format_matplotlib_cannot_write(capsys, tmp_path, monkeypatch):
    """The format is checked against matplotlib's own list (a stand-in here, where
    matplotlib may not be installed) before anything is measured."""
    import types

    agg = types.ModuleType("matplotlib.backends.backend_agg")
    agg.FigureCanvasAgg = types.SimpleNamespace(
        get_supported_filetypes=lambda: {"png": "Portable Network Graphics", "pdf": "PDF"}
    )
    for name in ("matplotlib", "matplotlib.backends"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", agg)
    assert main(["blockwise", "--smoke", "--plot", str(tmp_path / "p.txt")]) == 2
    assert "matplotlib writes no 'txt' images (one of pdf, png)" in capsys.readouterr().err
    assert harness.plot_format(tmp_path / "noext") == "png"
    assert harness.plot_format("a.PDF") == "pdf"


def test_cli_fails_when_no_candidate_backend_can_run(capsys, monkeypatch):
    """A build whose native backends do not load benchmarks nothing: the run fails (exit 1)
    instead of printing tables of the reference alone."""
    import lowprec_kernels as lpk

    available = {**lpk.available_backends(), "cpu": False}
    monkeypatch.setattr(lpk, "available_backends", lambda: dict(available))
    assert main(["blockwise", "--smoke"]) == 1
    assert "error: no candidate backend can run here (backend 'cpu' is not available here)" in (
        capsys.readouterr().out
    )


def test_plot_labels_tell_every_row_apart():
    """Each bar has its own label (bars placed by label text share a position): rows that
    differ only in the baseline or the shape get different ones."""
    timing = harness.Timing(seconds=1.0, seconds_iqr=(1.0, 1.0), best_seconds=1.0, pairs=1)
    rows = [
        harness.Row("int8", "int8_linear", (1, 4096, 4096), "bfloat16", "cpu", timing, "F.linear"),
        harness.Row("int8", "int8_linear", (1, 4096, 4096), "bfloat16", "cpu", timing, "bnb"),
        harness.Row("int8", "int8_linear", (5, 4096, 4096), "bfloat16", "cpu", timing, "bnb"),
        harness.Row("adam", "AdamW8bit vs torch fused", (1024,), "float32", "cpu", timing,
                    "torch fused"),
    ]  # fmt: skip
    labels = [harness.plot_label(r) for r in rows]
    assert len(set(labels)) == len(rows)
    assert labels[0] == "int8: int8_linear vs F.linear 1x4096x4096 bfloat16 [cpu]"
    assert labels[3] == "adam: AdamW8bit vs torch fused 1024 float32 [cpu]"


def test_cli_backend_option_does_not_swallow_the_suite():
    from lowprec_kernels.bench.__main__ import parse_args

    args = parse_args(["--backend", "cpu", "adam"])
    assert args.backend == ["cpu"] and args.suite == "adam"


def test_cli_names_each_backend_once():
    from lowprec_kernels.bench.__main__ import parse_args

    assert parse_args(["blockwise", "--backend", "cpu", "--backend", "cpu"]).backend == ["cpu"]


def test_script_arguments_must_be_positive():
    import argparse

    assert harness.positive(int)("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="above 0"):
        harness.positive(float)("0")
    assert harness.script_description("One line\ncontinued.\n\nMore.") == "One line continued."


def test_last_level_cache_counts_each_instance_once(tmp_path, monkeypatch):
    """CPUs 0-1 share one 32 MiB L3, CPUs 2-3 another: 64 MiB between the process's threads;
    a CPU outside the affinity mask is not counted."""

    def cache(cpu, index, level, size, shared):
        d = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
        (d / "shared_cpu_list").write_text(f"{shared}\n")

    for cpu in range(6):
        cache(cpu, 0, 1, "48K", str(cpu))
        cache(cpu, 2, 2, "1024K", str(cpu))
        cache(cpu, 3, 3, "32768K", "0-1" if cpu < 2 else "2-3" if cpu < 4 else "4-5")
    monkeypatch.setattr(harness, "SYSFS_CPU", tmp_path)
    monkeypatch.setattr(harness.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert harness.last_level_cache_bytes("cpu") == 64 << 20


def test_noisy_flag_covers_the_baseline_too():
    """A ratio of medians is as noisy as its noisier side: a baseline whose median is far
    above its best sample is flagged (only ours was checked)."""
    t = harness._timing([[1.0, 1.0, 1.0], [9.0, 9.0, 1.0]], True, False)
    assert [side for side, _, _ in harness._noisy_sides(t)] == ["baseline"]
    assert harness._noisy_sides(harness._timing([[1.0] * 3, [2.0] * 3], True, False)) == []


def test_bitsandbytes_baselines_are_layers_as_users_run_them():
    """The bitsandbytes rows time an eval-mode layer: in training mode (nn.Module's default)
    its CPU forward dequantizes the whole weight first, which inflated our ratios ~80x."""
    pytest.importorskip("bitsandbytes")
    from lowprec_kernels import functional as LF
    from lowprec_kernels.bench import int8 as int8_bench
    from lowprec_kernels.bench import nf4 as nf4_bench

    wq, w_scale = LF.int8_quantize_weight(torch.randn(64, 128))
    assert not int8_bench._bnb_layer(wq, w_scale, "cpu").training
    w = torch.randn(64, 128)
    qw, st = LF.quantize_4bit(w, nf4_bench.BLOCKSIZE, "nf4", double_quant=True)
    x = torch.randn(3, 128)
    for dtype in (torch.float32, torch.bfloat16):
        copy = (qw, st.absmax, st.nested_absmax)
        layer = nf4_bench._bnb_layer(nf4_bench._bitsandbytes(), copy, st, dtype)
        assert not layer.training
        want = LF.matmul_4bit(x.to(dtype), qw, st).float()
        got = harness.inference(layer, x.to(dtype)).float()
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
