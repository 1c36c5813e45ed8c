"""Qwen3-VL through the whole engine: ``gracevlm.load`` of tiny random checkpoint folders (dense bf16, GRACE QAT
W4 with its sidecar, GRACE AWQ W4 packed from it), then ``generate`` / ``chat`` / ``stream`` and the
continuous-batching scheduler give the greedy tokens of transformers' ``Qwen3VLForConditionalGeneration.generate``
(one image, two images, a two-turn chat, text only); batched greedy = alone."""
import json
import math

import pytest
import torch

import gracevlm
from gracevlm.engine.sampling import SamplingParams
from gracevlm.engine.scheduler import BatchScheduler
from gracevlm.errors import CheckpointError, InputError
from gracevlm.models.loader import load_checkpoint

pytest.importorskip("transformers")
from qwen3_vl_helpers import CONVERSATIONS, SIZES, random_image, reference_processor, write_folder  # noqa: E402

GROUP = 32
MAX_NEW = 6
NAMES = ("one image", "two images", "two turns", "text only")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.15 * noise)
            p.copy_(p.to(torch.bfloat16).float())  # the checkpoint is bf16: the reference holds the same values


def _bake_qat(model, gen):
    """Put every decoder linear on a W4 grid with power-of-two scales (q * s exact in bf16 and fp16, as GRACE's
    baked weights are on their grid); returns the sidecar dict."""
    sidecar = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.language_model.layers):
            for lin in LINEARS:
                mod = layer.get_submodule(lin)
                out_f, in_f = mod.weight.shape
                log2 = -torch.randint(4, 7, (out_f * in_f // GROUP,), generator=gen).float()
                s = torch.exp2(log2).view(out_f, in_f // GROUP, 1)
                q = torch.randint(-8, 8, (out_f, in_f // GROUP, GROUP), generator=gen).float()
                mod.weight.copy_((q * s).view(out_f, in_f))
                name = f"model.language_model.layers.{i}.{lin}"
                sidecar[f"{name}.weight"] = mod.weight.detach().to(torch.bfloat16).clone()
                sidecar[f"{name}.log_scale"] = (log2 * math.log(2.0)).float()
    return sidecar


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(hf reference fp32, dense folder, qat folder, awq folder, processor)."""
    from transformers import Qwen3VLForConditionalGeneration

    from gracevlm.formats.pack import pack_qat_checkpoint

    root = tmp_path_factory.mktemp("qwen3vl_engine")
    dense, qat, awq = root / "dense", root / "qat", root / "awq"
    for f in (dense, qat):
        f.mkdir()
        cfg = write_folder(f)
    generation_config = (dense / "generation_config.json").read_text()  # save_pretrained writes its own
    hf = Qwen3VLForConditionalGeneration(cfg).eval()
    _randomize(hf, 3)
    hf.to(torch.bfloat16).save_pretrained(dense)
    hf.float()
    ref_dense = {k: v.clone() for k, v in hf.state_dict().items()}
    sidecar = _bake_qat(hf, torch.Generator().manual_seed(4))
    hf.to(torch.bfloat16).save_pretrained(qat)
    hf.float()
    torch.save(sidecar, qat / "qat_quantized_weights.bin")
    for f in (dense, qat):
        (f / "generation_config.json").write_text(generation_config)
    raw = json.loads((qat / "config.json").read_text())
    raw["qat"] = {"bits": 4, "group_size": GROUP, "skip_keywords": ["visual", "merger", "lm_head", "embed_tokens"],
                  "num_replaced": len(sidecar) // 2}
    (qat / "config.json").write_text(json.dumps(raw))
    report = pack_qat_checkpoint(qat, awq, progress=False)
    assert report.max_code_error == 0 and report.layers == 3 * 7
    # fresh references: .to(bfloat16) above also rounded the rotary inv_freq buffers, which .float() keeps
    refs = {}
    for kind, state in (("dense", ref_dense), ("qat", hf.state_dict())):
        refs[kind] = Qwen3VLForConditionalGeneration(cfg).eval()
        refs[kind].load_state_dict(state)
    return {"dense": (refs["dense"], dense), "qat": (refs["qat"], qat), "awq": (refs["qat"], awq),
            "processor": reference_processor(dense)}


def _images(name, seed=0):
    return [random_image(w, h, seed + i) for i, (w, h) in enumerate(SIZES[name])]


def _messages(name, images):
    """The conversation with its image parts holding the images (OpenAI-style parts for the engine)."""
    it = iter(images)
    out = []
    for m in CONVERSATIONS[name]:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": next(it)} if p.get("type") == "image" else dict(p) for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def _reference(hf, processor, name, images, stops, vocab):
    text = processor.apply_chat_template(CONVERSATIONS[name], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops,
                          pad_token_id=stops[-1], suppress_tokens=list(range(vocab, hf.config.text_config.vocab_size)))
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return inputs["input_ids"][0].tolist(), [t for t in new if t not in stops]


@pytest.fixture(scope="module")
def loaded(folders):
    return {kind: gracevlm.load(folders[kind][1]) for kind in ("dense", "qat", "awq")}


@pytest.mark.parametrize("kind", ["dense", "qat", "awq"])
def test_chat_generate_stream_equal_transformers_generate(folders, loaded, kind):
    hf = folders[kind][0]
    vlm = loaded[kind]
    stops = vlm.tokenizer.stop_ids
    assert stops == [vlm.tokenizer.token_id("<|im_end|>"), vlm.tokenizer.token_id("<|endoftext|>")]
    for name in NAMES:
        images = _images(name, seed=7)
        ids, ref = _reference(hf, folders["processor"], name, images, stops, vlm.tokenizer.vocab_size)
        got = vlm.chat(_messages(name, images), max_new_tokens=MAX_NEW)
        assert got.token_ids == ref, (kind, name)
        assert got.timings.prefill_tokens == len(ids)  # every image's pad run expanded as the processor does
        deltas = list(vlm.stream_chat(_messages(name, images), max_new_tokens=MAX_NEW))
        assert "".join(deltas) == got.text == vlm.tokenizer.decode(ref).strip()
    images = _images("one image", seed=7)
    single = vlm.generate("What is this?", images=images, max_new_tokens=MAX_NEW)  # = the "one image" chat
    assert single.token_ids == _reference(hf, folders["processor"], "one image", images, stops,
                                          vlm.tokenizer.vocab_size)[1]


def test_scheduler_batched_greedy_equals_alone_and_transformers(folders, loaded):
    vlm, hf = loaded["awq"], folders["awq"][0]
    stops = vlm.tokenizer.stop_ids
    params = SamplingParams(max_new_tokens=MAX_NEW)
    requests = [(name, _images(name, seed=11)) for name in NAMES]
    with BatchScheduler(vlm, max_batch_size=4, max_model_len=512) as sched:
        handles = [sched.submit_chat(_messages(name, imgs), params) for name, imgs in requests]
        results = [h.result(timeout=120) for h in handles]
    with BatchScheduler(vlm, max_batch_size=2, max_model_len=512, prefill_chunk=7) as sched:
        chunked = [sched.submit_chat(_messages(name, imgs), params).result(timeout=120) for name, imgs in requests]
    for (name, imgs), res, ch in zip(requests, results, chunked):
        ref = _reference(hf, folders["processor"], name, imgs, stops, vlm.tokenizer.vocab_size)[1]
        alone = vlm.chat(_messages(name, imgs), max_new_tokens=MAX_NEW)
        assert res.token_ids == alone.token_ids == ref, name
        assert res.text == alone.text
        assert ch.token_ids == ref, name  # chunked prefill slices the deepstack rows and positions per chunk


def test_quantized_layers_and_tied_head(folders, loaded):
    from gracevlm.nn import Int4Linear

    for kind in ("qat", "awq"):
        lm = loaded[kind].model.language_model
        assert isinstance(lm.layers[2].mlp.down_proj, Int4Linear)
        assert lm.lm_head.weight is lm.embed_tokens.weight  # one copy (a HalfLinear over the bf16 table, or tied)
    dense = loaded["dense"].model.language_model
    assert type(dense.layers[0].self_attn.qkv_proj) is torch.nn.Linear  # fused at load (exact concatenation)
    assert isinstance(lm.layers[0].self_attn.qkv_proj, Int4Linear) and isinstance(lm.layers[0].mlp.gate_up_proj,
                                                                                   Int4Linear)
    assert dense.lm_head.weight is dense.embed_tokens.weight
    trained = load_checkpoint(folders["dense"][1], half_lm_head=False).model.language_model
    assert trained.embed_tokens.weight.dtype == torch.float32 and trained.lm_head.weight is trained.embed_tokens.weight


def test_inspect_reports_family_bits_and_modules(folders):
    from gracevlm.models.inspect import inspect_checkpoint

    info = inspect_checkpoint(folders["awq"][1])
    assert info["family"] == "qwen3_vl" and info["format"] == "grace-awq"
    assert info["quantization"]["bits"] == 4 and info["quantization"]["group_size"] == GROUP
    assert info["quantization"]["packed_modules"] == 21
    assert info["architecture"]["quantized"]["modules"] == 21
    assert "vision_tower" in info["bytes_by_part"]
    qat = inspect_checkpoint(folders["qat"][1])
    assert qat["format"] == "grace-qat" and qat["architecture"]["quantized"]["bits"] == 4


def test_bad_inputs_and_checkpoints(folders, loaded, tmp_path):
    import shutil

    vlm = loaded["dense"]
    with pytest.raises(InputError, match="placeholder"):
        vlm.generate("<image> and <image>", images=_images("one image"))
    with pytest.raises(InputError, match="image placeholder"):
        list(vlm.generate_raw("<|vision_start|><|image_pad|><|vision_end|>hi", images=[]))
    with pytest.raises(InputError, match="only allowed in user"):
        vlm.chat([{"role": "assistant", "content": [{"type": "image", "image": _images("one image")[0]}]}])
    with pytest.raises(InputError, match="conv_mode"):
        gracevlm.load(folders["dense"][1], conv_mode="vicuna_v1")
    w8 = tmp_path / "w8"
    shutil.copytree(folders["qat"][1], w8)
    raw = json.loads((w8 / "config.json").read_text())
    raw["qat"]["bits"] = 8
    (w8 / "config.json").write_text(json.dumps(raw))
    # the W4 codes are W8 codes too: read as W8 (exact int8 codes, fp32 scales) it answers as the reference
    from gracevlm.nn import Int8Linear

    vlm8 = gracevlm.load(w8)
    assert any(isinstance(m, Int8Linear) for m in vlm8.model.modules())
    images = _images("one image", seed=7)
    stops = vlm8.tokenizer.stop_ids
    _, ref = _reference(folders["qat"][0], folders["processor"], "one image", images, stops, vlm8.tokenizer.vocab_size)
    assert vlm8.chat(_messages("one image", images), max_new_tokens=MAX_NEW).token_ids == ref
    off = tmp_path / "off_grid"
    shutil.copytree(folders["qat"][1], off)
    side = torch.load(off / "qat_quantized_weights.bin", weights_only=True)
    key = "model.language_model.layers.0.mlp.up_proj.log_scale"
    side[key] = side[key] + 0.1  # scales no longer reproduce the baked weights
    torch.save(side, off / "qat_quantized_weights.bin")
    with pytest.raises(CheckpointError, match="up_proj"):
        gracevlm.load(off)
