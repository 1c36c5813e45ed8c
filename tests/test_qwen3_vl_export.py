"""``gracevlm export`` for Qwen3-VL (``synth --preset qwen3-vl-tiny`` sources: dense bf16, W4 QAT, W8 QAT, GRACE
AWQ): transformers' ``Qwen3VLForConditionalGeneration.from_pretrained`` of the dense (``qwen3-vl-hf``) and
compressed-tensors exports gives gracevlm's logits and greedy tokens; the packed codes are the source codes bit for
bit (our codec and compressed-tensors' own unpacking and decompression); gracevlm loads its compressed-tensors
export back exactly; export -> load -> export is identical; ``inspect`` and ``pack`` on W8; one-line errors."""
import json

import pytest
import torch
from safetensors.torch import load_file

import gracevlm
from gracevlm.cli import main
from gracevlm.errors import InputError
from gracevlm.export import export_model
from gracevlm.export.check import PROBE_QUERY, check_export, probe_image
from gracevlm.formats.awq import unpack_awq
from gracevlm.formats.checkpoint import TensorStore
from gracevlm.formats.compressed_tensors import unpack_sequential
from gracevlm.formats.w8 import unpack_quantized_int8
from gracevlm.models.checkpoint import open_checkpoint
from gracevlm.models.inspect import inspect_checkpoint
from gracevlm.synth.qwen3_vl import synthesize_qwen3_vl

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

SOURCES = ("bf16", "qat", "qat8", "awq")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3vl_export_src")
    return {fmt: synthesize_qwen3_vl(root / fmt, "qwen3-vl-tiny", fmt, seed=5, progress=False) for fmt in SOURCES}


@pytest.fixture(scope="module")
def exports(src, tmp_path_factory):
    """(source, format, dtype) -> export folder, written once."""
    root, made = tmp_path_factory.mktemp("qwen3vl_exports"), {}

    def get(source, fmt, dtype=None):
        key = (source, fmt, dtype)
        if key not in made:
            made[key] = root / f"{source}-{fmt}-{dtype}"
            export_model(src[source], fmt, made[key], dtype=dtype)
        return made[key]
    return get


def _source_codes(folder, name):
    """(signed codes int [O, I], scales float32 [O, I/g]) of a quantized linear, as gracevlm reads the source."""
    opened = open_checkpoint(folder)
    if opened.quantized.bits == 8:
        c = opened.int8_codes(name)
        return c.qweight.to(torch.int32), c.scales
    t = opened.awq_tensors(name)
    u, _ = unpack_awq(t.qweight, t.qzeros)
    return u.t().to(torch.int32) - 8, t.scales.t().float()


@pytest.mark.parametrize("source", ["awq", "qat8"])
def test_dense_export_gives_gracevlm_logits_and_tokens_in_transformers(src, exports, source, monkeypatch):
    from transformers import Qwen3VLForConditionalGeneration

    out = exports(source, "qwen3-vl-hf", "float32")
    monkeypatch.setenv("GRACEVLM_BACKEND", "reference")  # gracevlm's exact float32 INT4 path
    result = check_export(out, "transformers", n=8)
    for case in result.cases:  # text only, and an image question
        assert case.greedy == case.reference and case.forced_agree == len(case.forced_argmax), case.line()
        assert max(case.logit_error) < 1e-5, case.line()
    model = Qwen3VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied stays tied
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"] and "qat" not in cfg and \
        "quantization_config" not in cfg and cfg["dtype"] == "float32"


@pytest.mark.parametrize("source", ["bf16", "qat", "qat8"])
def test_bf16_export_is_the_release_layout_bit_for_bit(src, exports, source):
    """bf16 (the default): a QAT source's dequantized linears come out as its baked weights, everything else as
    stored, under the same keys; processor files and the chat template come along."""
    out = exports(source, "qwen3-vl-hf")
    got, want = TensorStore(out), TensorStore(src[source])
    assert sorted(got.keys()) == sorted(want.keys())
    for key in want.keys():
        a, b = got.get(key), want.get(key)
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), key
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src[source] / name).read_bytes()
    gen = json.loads((out / "generation_config.json").read_text())
    tokens = gracevlm.load(src[source]).tokenizer.vocab_size
    assert gen["suppress_tokens"] == list(range(tokens, 1024)) and gen["eos_token_id"]  # padding rows, never sampled


@pytest.mark.parametrize("source,bits", [("awq", 4), ("qat", 4), ("qat8", 8)])
def test_compressed_tensors_codes_are_the_source_codes(src, exports, source, bits):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig, Qwen3VLForConditionalGeneration

    out = exports(source, "compressed-tensors")
    tensors = load_file(str(out / "model.safetensors"))
    names = open_checkpoint(src[source]).quantized.names
    assert len(names) == 14
    for name in names:
        q, s = _source_codes(src[source], name)
        packed, shape = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_shape"]
        ours = (unpack_sequential(packed, q.shape[1]).to(torch.int32) - 8 if bits == 4
                else unpack_quantized_int8(packed, shape).to(torch.int32))
        assert torch.equal(ours, q), name
        assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape.tolist())).to(torch.int32), q), name
        scale = tensors[f"{name}.weight_scale"]
        assert scale.dtype == (torch.float16 if bits == 4 else torch.float32) and torch.equal(scale.float(), s), name
        assert f"{name}.weight_zero_point" not in tensors
    assert not any(k.startswith("model.visual.") and k.endswith("weight_packed") for k in tensors)
    cfg = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    w = qc.config_groups["group_0"].weights
    assert (qc.format, w.num_bits, w.group_size, w.symmetric) == ("pack-quantized", bits, 128, True)
    # the library's decompression: q * s in the scale dtype (W8: fp32, exact; W4: fp16, one rounding)
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    name = "model.language_model.layers.1.mlp.down_proj"
    q, s = _source_codes(src[source], name)
    exact = q.float() * s.repeat_interleave(128, dim=1)
    layer = model.model.language_model.layers[1].mlp.down_proj
    assert torch.equal(layer.weight, exact if bits == 8 else exact.half().float())
    assert type(model.model.visual.blocks[0].attn.qkv) is torch.nn.Linear
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    if source == "qat":
        return  # same packed tensors as from awq (checked above); greedy decoding checked for awq and qat8
    result = check_export(out, "transformers", n=8)
    for case in result.cases:
        assert case.greedy == case.reference and case.forced_agree == len(case.forced_argmax), case.line()


@pytest.mark.parametrize("source", ["awq", "qat8"])
def test_gracevlm_loads_its_compressed_tensors_export_exactly(src, exports, source):
    from gracevlm.nn import Int4Linear, Int8Linear

    out = exports(source, "compressed-tensors")
    a, b = gracevlm.load(src[source]), gracevlm.load(out)
    la, lb = (v.model.language_model.layers[0].self_attn.qkv_proj for v in (a, b))  # fused q/k/v, as loaded
    if source == "qat8":
        assert isinstance(lb, Int8Linear) and torch.equal(la.qweight, lb.qweight) and torch.equal(la.scales, lb.scales)
    else:  # the loader builds Int4Linear from these AWQ triples
        assert isinstance(lb, Int4Linear)
        ta, tb = open_checkpoint(src[source]), open_checkpoint(out)
        for name in ta.quantized.names:
            x, y = ta.awq_tensors(name), tb.awq_tensors(name)
            assert all(torch.equal(getattr(x, k), getattr(y, k)) for k in ("qweight", "qzeros", "scales")), name
    photo = probe_image()
    ga, gb = (v.generate(PROBE_QUERY, images=[photo], max_new_tokens=8) for v in (a, b))
    assert ga.token_ids == gb.token_ids and ga.text == gb.text


@pytest.mark.parametrize("source,fmt", [("awq", "compressed-tensors"), ("qat8", "compressed-tensors"),
                                        ("awq", "qwen3-vl-hf")])
def test_export_load_export_is_identical(exports, source, fmt, tmp_path):
    first = exports(source, fmt)
    again = tmp_path / "again"
    export_model(first, fmt, again)
    a, b = TensorStore(first), TensorStore(again)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert a.get(key).dtype == b.get(key).dtype and torch.equal(a.get(key), b.get(key)), key
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_inspect_reports_bits_group_and_modules(src, exports):
    for folder, fmt, bits in ((src["qat8"], "grace-qat", 8), (exports("qat8", "compressed-tensors"),
                                                               "compressed-tensors", 8),
                              (exports("awq", "compressed-tensors"), "compressed-tensors", 4)):
        info = inspect_checkpoint(folder)
        assert info["ok"] and info["family"] == "qwen3_vl" and info["format"] == fmt
        assert (info["quantization"]["bits"], info["quantization"]["group_size"]) == (bits, 128)
        assert info["architecture"]["quantized"]["modules"] == 14
    dense = inspect_checkpoint(exports("awq", "qwen3-vl-hf"))
    assert dense["quantization"] is None and dense["format"] == "qwen3-vl"


def test_model_card_code_runs_as_written(src, exports, tmp_path, capsys):
    out = exports("awq", "compressed-tensors")
    card = (out / "README.md").read_text()
    assert f"source checkpoint: `{src['awq']}` (grace-awq)" in card
    assert "quantized linears: 14, 4-bit, group size 128" in card and "python -m vllm.entrypoints" in card
    photo = tmp_path / "photo.png"
    probe_image().save(photo)
    ref = gracevlm.load(src["awq"]).generate(PROBE_QUERY, images=[photo], max_new_tokens=10)
    block = card.split("```python\n")[1].split("```")[0]
    assert "max_new_tokens=64" in block
    scope = {}
    exec(block.replace("photo.jpg", str(photo)).replace("What is in the picture?", PROBE_QUERY)
         .replace("max_new_tokens=64", "max_new_tokens=10"), scope)
    new = scope["out"][0, scope["inputs"]["input_ids"].shape[1]:].tolist()
    assert new[: len(ref.token_ids)] == ref.token_ids


def _one_line_error(capsys, argv, match):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_requests_give_one_line_errors(src, tmp_path, capsys):
    out = str(tmp_path / "x")
    _one_line_error(capsys, ["export", "--model", str(src["qat8"]), "--format", "compressed-tensors", "--bits", "4",
                             "--out", out], "holds W8 codes")
    _one_line_error(capsys, ["export", "--model", str(src["awq"]), "--format", "gguf", "--out", out],
                    "it exports to qwen3-vl-hf, compressed-tensors, not 'gguf'")
    _one_line_error(capsys, ["export", "--model", str(src["awq"]), "--format", "llava-hf", "--out", out],
                    "qwen3_vl checkpoint")
    _one_line_error(capsys, ["export", "--model", str(src["bf16"]), "--format", "compressed-tensors", "--out", out],
                    "no integer codes")
    _one_line_error(capsys, ["pack", "--qat", str(src["qat8"]), "--out", out],
                    "export --format compressed-tensors")
    with pytest.raises(InputError, match="unknown export format"):
        export_model(src["awq"], "onnx", out)
    assert not (tmp_path / "x").exists()
