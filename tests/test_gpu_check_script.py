"""benchmarks/gpu_check.sh parses and, without a GPU, stops at once with a clear message (exit 2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for minutes")
def test_script_without_gpu_stops_clearly(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=SCRIPT.parents[1])
    assert proc.returncode == 2
    assert "needs a CUDA GPU and triton" in (tmp_path / "out" / "summary.txt").read_text()
