"""Importing standard AWQ and compressed-tensors checkpoints, asymmetric zero points, lossy refusals, atomic
output folders and ``inspect`` on every format."""
import json
import shutil

import pytest

import torch
from safetensors.torch import load_file, save_file

import gracevlm
from gracevlm.errors import CheckpointError, InputError
from gracevlm.export import LossyExportError, export_model
from gracevlm.export.source import SourceModel
from gracevlm.formats.awq import dequantize_awq, pack_nibbles
from gracevlm.formats.checkpoint import AWQ_MODULES_NAME, detect_format
from gracevlm.models.llava.weights import llava_hf_config, original_to_hf
from gracevlm.models.inspect import inspect_checkpoint

AWQ_QC = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]}
TOKENIZER = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def src(tiny_awq):
    return tiny_awq


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.new("RGB", (64, 40), (200, 30, 30)).save(path)
    return path


def write_awq_hf(src, out, tensors):
    """A standard AutoAWQ checkpoint in the llava-hf layout, written by hand (AWQ triples under llava-hf names)."""
    out.mkdir(parents=True)
    source = SourceModel(src)
    cfg = llava_hf_config(source.config, source.vision_config(), 1024, 1000, "float16", dict(AWQ_QC))
    (out / "config.json").write_text(json.dumps(cfg))
    save_file({original_to_hf(k): v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    for name in TOKENIZER:
        shutil.copy2(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def asym(src, tmp_path_factory):
    """The tiny model with random zero points: a GRACE-layout copy (reference) and an AutoAWQ llava-hf copy."""
    root = tmp_path_factory.mktemp("asym")
    tensors = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    for key in [k for k in tensors if k.endswith(".qzeros")]:
        groups, words = tensors[key].shape
        tensors[key] = pack_nibbles(torch.randint(4, 13, (groups, words * 8), dtype=torch.uint8, generator=g))
    ref = root / "grace"
    shutil.copytree(src, ref)
    save_file(tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})
    return ref, write_awq_hf(src, root / "awq-hf", tensors)


def assert_same_packed(a, b):
    n = 0
    for (name, x), (_, y) in zip(a.model.language_model.named_modules(), b.model.language_model.named_modules()):
        if hasattr(x, "to_awq"):
            tx, ty = x.to_awq(), y.to_awq()
            assert torch.equal(tx.qweight, ty.qweight) and torch.equal(tx.qzeros, ty.qzeros), name
            assert torch.equal(tx.scales, ty.scales), name
            n += 1
    assert n


def test_standard_awq_checkpoints_load(src, image, tmp_path):
    ref = gracevlm.load(src, device="cpu")
    expected = ref.generate("Hi", images=[image], max_new_tokens=6)
    hf = write_awq_hf(src, tmp_path / "awq-hf", load_file(str(src / "model.safetensors")))
    original = tmp_path / "awq-original"  # AutoAWQ on the LLaVA-original class: original names + quantization_config
    shutil.copytree(src, original)
    (original / AWQ_MODULES_NAME).unlink()
    cfg = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**cfg, "quantization_config": AWQ_QC}))
    for folder in (hf, original):
        assert detect_format(folder) == "awq"
        vlm = gracevlm.load(folder, device="cpu")
        assert_same_packed(ref, vlm)
        got = vlm.generate("Hi", images=[image], max_new_tokens=6)
        assert got.token_ids == expected.token_ids and got.prompt_token_ids == expected.prompt_token_ids


def test_asymmetric_awq_loads_and_matches_the_reference(asym, image):
    ref_dir, hf_dir = asym
    ref, hf = gracevlm.load(ref_dir, device="cpu"), gracevlm.load(hf_dir, device="cpu")
    assert hf.loaded.stats.format == "awq"
    assert_same_packed(ref, hf)
    layer = hf.model.language_model.model.layers[0].mlp.down_proj
    packed = layer.to_awq()
    x = torch.randn(3, layer.in_features, dtype=torch.float32)
    exact = x.double() @ dequantize_awq(packed.qweight, packed.qzeros, packed.scales, 128, torch.float64)
    assert torch.allclose(layer(x).double(), exact, atol=1e-5)
    assert not layer.symmetric
    assert hf.generate("Hi", images=[image], max_new_tokens=6).token_ids == \
        ref.generate("Hi", images=[image], max_new_tokens=6).token_ids
    info = inspect_checkpoint(hf_dir)
    assert info["format"] == "awq" and info["layout"] == "llava-hf"
    assert info["quantization"]["zero_point"] == "asymmetric" and not info["checks"]["symmetric_zero_point_8"]


def test_asymmetric_zero_points_export_exactly_to_compressed_tensors(asym, image, tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from transformers import CompressedTensorsConfig, LlavaForConditionalGeneration

    ref_dir, hf_dir = asym
    report = export_model(hf_dir, "compressed-tensors", tmp_path / "ct")
    assert report.exact and report.source_format == "awq"
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] is False
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    codes = SourceModel(hf_dir).linear("model.layers.1.mlp.up_proj")
    zp = (codes.zeros.to(torch.int16) - 8).to(torch.int8)  # compressed-tensors' signed zero point
    assert torch.equal(tensors["language_model.model.layers.1.mlp.up_proj.weight_zero_point"],
                       pack_to_int32(zp, 4, packed_dim=0))
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                          quantization_config=CompressedTensorsConfig(dequantize=True))
    w = model.model.language_model.layers[1].mlp.up_proj.weight
    assert torch.equal(w, codes.dequantize().half().float())  # (u - z) * s, decompressed in the fp16 scale dtype
    back = gracevlm.load(tmp_path / "ct", device="cpu")
    assert_same_packed(gracevlm.load(ref_dir, device="cpu"), back)


def test_gguf_refuses_asymmetric_codes_unless_lossy_is_allowed(asym, tmp_path):
    _, hf_dir = asym
    out = tmp_path / "gguf"
    with pytest.raises(LossyExportError, match="asymmetric zero points"):
        export_model(hf_dir, "gguf", out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".gguf.")]
    report = export_model(hf_dir, "gguf", out, allow_lossy=True)
    assert not report.exact and report.lossy["reasons"]
    assert 0 < report.lossy["mean_abs_weight_error"] <= report.lossy["max_abs_weight_error"] < 0.05
    assert json.loads((out / "gracevlm_export.json").read_text())["exact"] is False
    assert inspect_checkpoint(out)["format"] == "gguf"
    assert inspect_checkpoint(out / "ggml-model-q4_0.gguf")["checks"]["has_llm"]


def test_dense_source_to_compressed_tensors_needs_allow_lossy(tiny_checkpoint, tmp_path):
    fp16 = tiny_checkpoint("fp16")
    with pytest.raises(LossyExportError, match="round-to-nearest"):
        export_model(fp16, "compressed-tensors", tmp_path / "ct")
    report = export_model(fp16, "compressed-tensors", tmp_path / "ct", allow_lossy=True)
    assert not report.exact and report.lossy["max_abs_weight_error"] > 0
    # a dense source goes to GGUF exactly, as F16 linears
    g = export_model(fp16, "gguf", tmp_path / "g")
    assert g.exact and "ggml-model-f16.gguf" in g.files


def test_output_folders_are_atomic(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="--force"):
        export_model(src, "llava-hf", out)
    assert (out / "keep.txt").read_text() == "mine"

    import gracevlm.export.hf as hf

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "write_tokenizer_and_processor", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(src, "llava-hf", out, force=True)
    assert (out / "keep.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    report = export_model(src, "llava-hf", out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file() and report.exact


def test_unsupported_foreign_checkpoints_are_explained(src, tmp_path):
    hf = write_awq_hf(src, tmp_path / "gemv", load_file(str(src / "model.safetensors")))
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GEMM"):
        gracevlm.load(hf, device="cpu")
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gptq"):
        detect_format(hf)
    with pytest.raises(InputError, match="unknown export format"):
        export_model(src, "onnx", tmp_path / "x")


def test_vision_tower_from_mm_vision_tower_when_not_bundled(src, tmp_path):
    """A checkpoint without tower tensors: the exports read CLIP from ``mm_vision_tower`` (here a local folder)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from gracevlm.models.llava.config import VISION_PREFIX

    folder = tmp_path / "no-tower"
    shutil.copytree(src, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tower = {k[len(VISION_PREFIX):]: v for k, v in tensors.items() if k.startswith(VISION_PREFIX)}
    save_file({k: v for k, v in tensors.items() if not k.startswith(VISION_PREFIX)}, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    clip = CLIPVisionModel(CLIPVisionConfig(**cfg.pop("mm_vision_config")))
    clip.load_state_dict(tower, strict=False)
    clip.half().save_pretrained(folder / "clip")
    (folder / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": "clip"}))
    a = export_model(src, "llava-hf", tmp_path / "a")
    b = export_model(folder, "llava-hf", tmp_path / "b")
    ta, tb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.exact and b.exact and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
