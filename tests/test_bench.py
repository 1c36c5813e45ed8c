"""`gracevlm bench` end to end on a tiny checkpoint (fast sections only): every figure is there and sane,
and the report prints. Speeds are never asserted."""
import json

from gracevlm import bench
from gracevlm.cli import main as cli


def test_bench_model_and_vision_sections(tiny_awq, capsys):
    model = tiny_awq
    r = bench.run(model=str(model), layers=2, decode_steps=3, prefill_tokens=16, batch_sizes=(1, 2),
                  sections=("bandwidth", "model", "vision", "ttft"), prefix_block_tokens=16)
    m = r["model"]
    assert r["bandwidth_gbps"] > 0
    assert m["decode_tok_s"] > 0 and m["prefill_tok_s"] > 0 and m["bandwidth_limit_tok_s"] > 0
    assert [b["batch"] for b in m["batched"]] == [1, 2]
    assert 0 < m["peak_rss_load"] and m["rss_after_load"] <= m["peak_rss"]
    assert m["decode_bytes"] > 0 and set(m["bytes_by_part"]) >= {"int4_kernel_layouts", "vision_tower"}
    v = r["vision"]
    assert v["float32"]["s"] > 0 and 0 <= v["bfloat16"]["feature_rel_l2"] < 0.1
    t = r["ttft"]
    assert t["cold"]["cached_tokens"] == 0 and t["no_cache"]["cached_tokens"] == 0
    assert t["warm"]["cached_tokens"] > 0 and t["warm"]["prefill_tokens"] < t["cold"]["prefill_tokens"]
    assert t["cold"]["prefill_tokens"] == t["no_cache"]["prefill_tokens"] > 0
    kv = t["kv_bytes_per_token"]
    assert kv["float32"] == 2 * kv["float16"] == 2 * kv["bfloat16"] > 0
    text = bench.format_report(r)
    assert "decode" in text and "prefill" in text and "vision tower" in text and "time to first token" in text
    assert cli(["bench", "--model", str(model), "--sections", "bandwidth,model", "--decode-steps", "2",
                "--prefill-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["decode_tok_s"] > 0
