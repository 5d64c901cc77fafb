"""The shell entry points parse, CI runs the README's test command, and the GPU check's
kernel pass is well formed (it runs for real only on a GPU: benchmarks/gpu_check.sh)."""

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

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
    assert {"quantize_blockwise", "matmul_4bit", "int8_linear", "adam8bit_step_"} <= set(names)
