"""The Triton W4A16 kernels (``kernels/triton_w4a16.py``) in Triton's CPU interpreter, against the exact
reference, and the backend's place in the dispatch.

The interpreter is switched on by ``TRITON_INTERPRET=1`` before triton is imported and then holds for the whole
process, so the checks run in one subprocess (``triton_interp_checks.py``) and this process stays in normal
mode (CUDA tests in the same run compile the kernels for real). Tolerances: the kernels use the reference's
exact weights with fp32 sums, so fp32 outputs agree to summation order (rel. L2 <= 2e-6); outputs cast to x's
dtype agree within one unit in the last place of that dtype at the largest output (2^-10 fp16, 2^-7 bf16).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gracevlm
from gracevlm import kernels
from gracevlm.errors import InputError
from gracevlm.kernels import triton_w4a16
from gracevlm.synth.checkpoint import synthesize

pytestmark = pytest.mark.skipif(triton_w4a16.triton_version() is None, reason="triton is not installed")

HERE = Path(__file__).resolve().parent
ULP = {"float16": 2**-10, "bfloat16": 2**-7, "float32": 1e-6}


@pytest.fixture(scope="module")
def interp(tmp_path_factory):
    folder = synthesize(tmp_path_factory.mktemp("tiny") / "tiny-awq", "tiny", "awq", seed=7, progress=False)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(Path(gracevlm.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("GRACEVLM_BACKEND", None)
    proc = subprocess.run([sys.executable, str(HERE / "triton_interp_checks.py"), str(folder)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_match_the_reference_in_the_interpreter(interp):
    cases = interp["kernels"]
    seen = {(c["kernel"], c["dtype"]) for c in cases}
    assert seen == {(k, d) for k in ("gemv", "gemm") for d in ("float16", "bfloat16", "float32")}
    assert {c["shape"][2] for c in cases} == {32, 64, 128} and {c["bias"] for c in cases} == {True, False}
    for c in cases:
        assert c["rel_l2"] <= 2e-6, c
        if "cast_max_diff" in c:
            assert c["out_dtype"] == c["dtype"], c
            assert c["cast_max_diff"] <= ULP[c["dtype"]], c


def test_split_k_is_deterministic_and_exact(interp):
    split = [c for c in interp["kernels"] if c["split_k"] > 1]
    assert {c["kernel"] for c in split} == {"gemv", "gemm"}
    for c in split:
        assert c["deterministic"] and c["rel_l2"] <= 2e-6, c


def test_release_rebuilds_awq_exactly(interp):
    for kind in ("symmetric", "asymmetric"):
        r = interp["layer"][kind]
        assert r["released"] and r["to_awq_exact"] and r["state_dict_exact"], (kind, r)
        assert r["same_after_release"] and r["rel_l2"] <= 2**-10, (kind, r)


def test_interpreter_never_auto_selected_on_cpu(interp):
    assert interp["layer"]["available_on_cpu"] is True  # asked for by name only
    assert interp["layer"]["auto_on_cpu"] != "triton"


def test_tiny_model_generates_the_reference_tokens(interp):
    m = interp["model"]
    assert m["triton"]["tokens"] == m["reference"]["tokens"] and len(m["triton"]["tokens"]) == 3
    assert m["triton"]["released"] == m["triton"]["layers"] > 0  # the layout alone holds the INT4 weights


def test_dispatch_in_this_process():
    cpu = torch.device("cpu")
    assert "triton" in kernels.backend_names()
    backend = kernels.get_backend("triton")
    if not triton_w4a16.interpreting():
        assert not backend.available(cpu)
        with pytest.raises(InputError, match="not available on device cpu"):
            kernels.select_backend(cpu, 1, "triton")
    assert kernels.select_backend(torch.device("cuda"), 1).name == "triton"
    assert kernels.select_backend(torch.device("cuda"), 512).name == "triton"


def test_nibble_permutation_round_trip():
    words = torch.randint(-2**31, 2**31, (64, 16), dtype=torch.int64).to(torch.int32)
    logical = triton_w4a16.awq_to_logical(words)
    assert torch.equal(triton_w4a16.logical_to_awq(logical), words)
    from gracevlm.formats.awq import unpack_nibbles

    # logical words hold column 8c + j in nibble j
    nib = (logical.to(torch.int64).unsqueeze(-1) >> torch.arange(0, 32, 4)) & 0xF
    assert torch.equal(nib.reshape(64, 128).to(torch.uint8), unpack_nibbles(words))


def test_tile_configs_fit():
    for rows in (1, 2, 3, 5, 8, 16):
        for g in (32, 64, 128):
            c = triton_w4a16.gemv_config(rows, g)
            assert c["BLOCK_M"] >= rows and g % c["BLOCK_K"] == 0
            assert c["BLOCK_M"] * c["BLOCK_K"] * c["BLOCK_N"] <= 8192
    for rows in (9, 17, 100, 512):
        for g in (32, 48, 128):
            c = triton_w4a16.gemm_config(rows, g)
            assert c["BLOCK_K"] >= 16 and g % c["BLOCK_K"] == 0
