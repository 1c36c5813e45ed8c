"""``gracevlm doctor``: facts read from this machine, paths that agree with the real dispatch, advice."""
import json

import torch

from gracevlm import doctor, kernels
from gracevlm.cli import main as cli
from gracevlm.kernels import native, triton_w4a16

CPUINFO = """processor\t: 0
model name\t: Test CPU
flags\t\t: fpu sse2 avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni amx_tile
"""


def test_cpu_flags_parsed():
    flags = doctor.cpu_flags(CPUINFO)
    assert flags["avx2"] and flags["avx512_vnni"] and flags["amx_tile"]
    assert not flags["avx512_bf16"] and not flags["amx_bf16"]
    assert not any(doctor.cpu_flags("no flags here").values())


def test_json_report_agrees_with_the_dispatch(capsys):
    assert cli(["doctor", "--json", "--no-bandwidth"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "bandwidth_gbps" not in r
    assert r["native"]["loaded"] == (native.load_library() is not None)
    assert r["gpu"]["triton"] == triton_w4a16.triton_version()
    assert r["gpu"]["cuda_available"] == torch.cuda.is_available()
    rows = {x["layer"]: x for x in r["paths"]["cpu"]}
    for label, m in doctor.ROWS.items():
        assert rows[f"INT4 linear ({label})"]["backend"] == kernels.select_backend(torch.device("cpu"), m).name
    assert {"lm_head", "vision tower + projector"} <= set(rows)
    assert isinstance(r["advice"], list)


def test_text_report_with_bandwidth(capsys):
    assert cli(["doctor", "--bandwidth-gib", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "kernel paths on cpu:" in out and "memory bandwidth measured now: cpu" in out
    gbps = float(out.split("memory bandwidth measured now: cpu ")[1].split()[0])
    assert gbps > 0


def test_bad_argument_is_one_line(capsys):
    assert cli(["doctor", "--bandwidth-gib", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gracevlm: error: --bandwidth-gib") and "\n" not in err


def test_cuda_paths_and_advice():
    dev = torch.device("cuda")
    paths = {x["layer"]: x for x in doctor.layer_paths(dev, doctor.cpu_flags(CPUINFO), {"loaded": True})}
    decode, prefill = paths["INT4 linear (decode, 1 row)"], paths["INT4 linear (prefill, 512 rows)"]
    if triton_w4a16.triton_version() is not None:
        assert decode["backend"] == prefill["backend"] == "triton"
        assert "GEMV" in decode["why"] and "GEMM" in prefill["why"]
    gpu = {"nvidia_device_node": True, "torch_cuda": None, "cuda_available": False, "triton": None,
           "triton_interpreter": False}
    tips = doctor.advice(doctor.cpu_flags(CPUINFO), {"loaded": False, "error": "no cc"}, gpu)
    assert any("C compiler" in t and "no cc" in t for t in tips)
    assert any("CUDA build of torch" in t for t in tips)
    gpu.update(torch_cuda="12.8", cuda_available=True)
    tips = doctor.advice(doctor.cpu_flags(CPUINFO), {"loaded": True, "isa": "AVX-512 VNNI", "openmp": True}, gpu)
    assert any("pip install triton" in t for t in tips)
    assert not any("VNNI" in t for t in tips)


def test_dense_on_cuda_without_triton(monkeypatch):
    monkeypatch.setattr(triton_w4a16, "triton_version", lambda: None)
    name, why = doctor._int4_path(torch.device("cuda"), 1)
    assert name == "dense" and "triton is not installed" in why


def test_cpu_paths_name_what_select_backend_runs():
    for rows in (1, 512):
        name, why = doctor._int4_path(torch.device("cpu"), rows)
        assert name == kernels.select_backend(torch.device("cpu"), rows).name
        if native.load_library() is None:
            assert "not loaded" in why
        elif rows == 1:
            assert "small-M kernel" in why
        else:  # the prefill GEMM it runs: integer (native-igemm) or exact fp32 tiles (native)
            assert ("integer GEMM" in why) == (name == "native-igemm") and "not loaded" not in why
