"""The shell entry points parse, CI runs the README's test command, and the GPU check's
kernel pass is well formed (it runs for real only on a GPU: benchmarks/gpu_check.sh)."""

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowprec_kernels.bench.harness import script_description

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["scripts/setup.sh", "scripts/test.sh", ".ci/run", "benchmarks/gpu_check.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_script_parses(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert "bash scripts/test.sh" in commands, "the README's test command"
    assert any("lowprec_kernels.bench" in c and "--quick" in c for c in commands)
    assert "exec bash scripts/test.sh" in (ROOT / ".ci/run").read_text()


def test_gpu_quick_pass_cases_run_on_cpu():
    spec = importlib.util.spec_from_file_location("cuda_quick", ROOT / "benchmarks/cuda_quick.py")
    cuda_quick = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_quick)
    names = []
    for name, fn in cuda_quick.cases("cpu"):
        out = fn()
        assert cuda_quick.close(out, out)
        names.append(name)
    assert {"quantize_blockwise", "matmul_4bit", "int8_linear", "int8_scaled_mm", "adam8bit_step_",
            "AdamW8bit multi-tensor"} <= set(names)  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        ["benchmarks/adam_step_context.py", "--params", "5000", "--rounds", "1", "--gemm-ms", "1"],
        ["benchmarks/adam_memory_modes.py", "--params", "5000", "--seconds", "0.05", "--copies",
         "2"],
        ["benchmarks/adam_many_tensors.py", "--rounds", "1", "--max-params", "1100000"],
        ["benchmarks/cache_rotation.py", "--tensor-mib", "1", "--multiples", "0.1", "--rounds",
         "1"],
        ["benchmarks/adam_build_ab.py", "--rounds", "1", "--scale", "0.01"],
        ["benchmarks/adam_rotated_ab.py", "--params", "5000", "--copies", "2", "--seconds",
         "0.05"],
    ],
    ids=lambda c: Path(c[0]).stem,
)  # fmt: skip
def test_probe_scripts_run(command):
    """The probes behind the results' numbers run (tiny sizes: a smoke test, not a timing)."""
    out = subprocess.run([sys.executable, *command], cwd=ROOT, check=True, capture_output=True,
                         text=True, timeout=300).stdout  # fmt: skip
    assert any(word in out for word in ("ours", "amax reads", "gpt2-50"))


@pytest.mark.parametrize(
    "script",
    ["cuda_quick.py", "cuda_gemv_check.py", "adam_step_context.py", "adam_memory_modes.py",
     "adam_many_tensors.py", "cache_rotation.py", "adam_build_ab.py", "adam_rotated_ab.py"],
)  # fmt: skip
def test_scripts_answer_help_anywhere(script):
    """--help works without a GPU, with the docstring's whole first paragraph."""
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = ast.get_docstring(ast.parse((ROOT / "benchmarks" / script).read_text()))
    assert script_description(doc) in " ".join(done.stdout.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a GPU")
@pytest.mark.parametrize("script", ["cuda_quick.py", "cuda_gemv_check.py"])
def test_cuda_scripts_say_there_is_no_gpu(script):
    done = subprocess.run([sys.executable, f"benchmarks/{script}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "no CUDA device" in done.stdout
