"""`gracevlm bench --device cuda`: argument handling everywhere, and the device bench's code path run on CPU
with a tiny checkpoint (every figure present and consistent; speeds are never asserted)."""
import json

import pytest
import torch

from gracevlm import bench_cuda, kernels
from gracevlm.cli import main as cli
from gracevlm.synth.checkpoint import synthesize


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys):
    assert cli(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gracevlm: error: --device cuda: CUDA is not available in this torch build or on this machine"


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--device", "meta"], "measures cpu or cuda"),
    (["--decode-steps", "0"], "must be >= 1"),
])
def test_bad_bench_arguments(argv, message, capsys):
    assert cli(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_bench_out_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    assert cli(["bench", "--sections", "bandwidth", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["bandwidth_gbps"] > 0
    assert "memory read bandwidth" in capsys.readouterr().out


def test_dense_weight_is_exact(rng):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from int4_helpers import random_int4_layer

    layer = random_int4_layer(256, 64, 128, True, False, rng)
    x = torch.randn(3, 256, generator=rng)
    w = bench_cuda.dense_weight(layer, torch.float32)
    torch.testing.assert_close(x @ w.t() + layer.bias.float(), kernels.get_backend("reference").matmul(layer, x),
                               rtol=1e-5, atol=1e-5)


def test_device_bench_path_on_cpu(tmp_path):
    model = synthesize(tmp_path / "tiny", "tiny", "awq", seed=3, progress=False)
    r = bench_cuda.run("cpu", model=str(model), decode_steps=2, prefill_tokens=8, batch_sizes=(1, 2),
                       kernel_shapes={"tiny 256x128": (256, 128)}, kernel_rows=(1, 4))
    assert r["device"] == "cpu" and r["bandwidth_gbps"] > 0
    assert {(k["rows"], k["method"]) for k in r["kernels"]} == {
        (m, name) for m in (1, 4) for name in (kernels.select_backend(torch.device("cpu"), m).name, "fp16-dense",
                                                "dequantize-every-call")}
    m = r["model"]
    assert m["replaced_layers"] == 2 * 4  # tiny: 2 layers x (qkv, o, gate_up, down) after fusing
    assert m["dense_decode_bytes"] > m["decode_bytes"] > 0
    for label in ("int4", "fp16_dense"):
        assert m[label]["decode_tok_s"] > 0 and m[label]["prefill_tok_s"] > 0 and m[label]["share_of_bandwidth"] > 0
        assert [b["batch"] for b in m[label]["batched"]] == [1, 2]
    assert set(m["ratios"]) == {"decode_batch1_vs_fp16", "prefill_vs_fp16", "decode_batch1_vs_fp16",
                                "decode_batch2_vs_fp16"}
    assert m["vision_s_per_image"] > 0
    text = bench_cuda.format_report(r)
    assert "fp16_dense decode" in text and "INT4 / fp16" in text
