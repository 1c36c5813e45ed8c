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


def test_bench_qwen3_vl_through_the_family_contract(tmp_path, capsys):
    """A qwen3-vl-tiny W8 QAT folder: decode/prefill through the model contract, the decode bytes the model
    reports (quantized linears + the tied head read once, not the embedding table), INT8 kernel rows on the
    model's own shapes, the vision tower's seconds per image, llama.cpp n/a."""
    import gracevlm
    from gracevlm.synth.qwen3_vl import synthesize_qwen3_vl

    folder = synthesize_qwen3_vl(tmp_path / "w8", "qwen3-vl-tiny", "qat", bits=8, progress=False)
    r = bench.run(model=str(folder), decode_steps=2, prefill_tokens=16, batch_sizes=(1, 2),
                  sections=("bandwidth", "kernels", "model", "vision", "llama.cpp"), image_size=(96, 64))
    m = r["model"]
    assert r["family"] == m["family"] == "qwen3_vl" and m["format"] == "grace-qat" and m["layers"] == 2
    assert m["decode_tok_s"] > 0 and m["prefill_tok_s"] > 0 and m["bandwidth_limit_tok_s"] > 0
    assert 0 < m["peak_rss_load"] and m["rss_after_load"] <= m["peak_rss"]
    head = m["lm_head"]
    assert head == {"class": "HalfLinear", "dtype": "bfloat16", "shape": [1024, 128], "shares_embedding": True,
                    "row_kernel": True}
    # independent count: int8 codes + fp32 scales of the 7 linears of 2 layers, the bf16 head once, the norms
    lm = gracevlm.load(folder, device="cpu").model.language_model
    linears = [lm.layers[i].self_attn.qkv_proj for i in range(2)]  # q/k/v fused at load
    assert type(linears[0]).__name__ == "Int8Linear"
    s = lm.spec
    outs_ins = [(s.num_heads * s.head_dim, s.hidden_size), (s.num_kv_heads * s.head_dim, s.hidden_size),
                (s.num_kv_heads * s.head_dim, s.hidden_size), (s.hidden_size, s.num_heads * s.head_dim),
                (s.intermediate_size, s.hidden_size), (s.intermediate_size, s.hidden_size),
                (s.hidden_size, s.intermediate_size)]
    codes = s.num_layers * sum(o * i + 4 * o * i // 128 for o, i in outs_ins)
    norms = 4 * (s.num_layers * (2 * s.hidden_size + 2 * s.head_dim) + s.hidden_size)
    assert m["decode_bytes_by_kind"] == {"quantized_linears": codes, "dense_linears": 0,
                                         "lm_head": 2 * s.vocab_size * s.hidden_size, "other": norms}
    assert m["decode_bytes"] == codes + 2 * s.vocab_size * s.hidden_size + norms
    b = m["decode_breakdown"]  # timed by hooks: the layer-by-layer path, so the linears are seen
    assert b["quantized_linears_s"] > 0 and b["lm_head_s"] > 0 and b["dense_linears_s"] == 0
    # the timed decode steps ran all layers in one native call; each was paired with a bandwidth sample
    assert m["decode_one_call"] is True
    assert len(m["decode_paired_shares"]) == 2 and all(x > 0 for x in m["decode_paired_shares"])
    assert [x["batch"] for x in m["batched"]] == [1, 2] and "prefill_bf16_tok_s" not in m
    q, kv, o, f = outs_ins[0][0], outs_ins[1][0], s.hidden_size, s.intermediate_size  # q/k/v, gate/up fused
    fused = {(q + 2 * kv, s.hidden_size), (o, q), (2 * f, s.hidden_size), (s.hidden_size, f)}
    assert {(d["out"], d["in"], d["bits"]) for d in m["linear_shapes"]} == {(a, b, 8) for a, b in fused}
    assert sum(d["per_step"] for d in m["linear_shapes"]) == 8
    methods = {k["method"] for k in r["kernels"]}
    assert {"int8 dense", "int8 native"} <= methods and all(k["gbps"] > 0 for k in r["kernels"])
    v = r["vision"]
    assert v["image"] == [96, 64] and v["tokens"] == (96 // 32) * (64 // 32) and v["s"] > 0
    assert "n/a" in r["llama.cpp"]["skipped"]
    text = bench.format_report(r)
    assert "decode" in text and "lm_head: HalfLinear" in text and "vision tower per image" in text
    assert "int8 native" in text and "llama.cpp: skipped (n/a" in text
    assert "decode paired with the bandwidth" in text and "all layers in one native call" in text
