"""Loading every checkpoint kind, generation semantics, the CLI, and bad input."""
import json
import shutil

import pytest
import torch
from PIL import Image

from gracevlm.cli import main as cli
from gracevlm.engine.vlm import load
from gracevlm.errors import CheckpointError, InputError
from gracevlm.formats.checkpoint import TensorStore
from gracevlm.models.llava.config import VISION_PREFIX
from gracevlm.formats.pack import pack_qat_checkpoint


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint):
    return {fmt: tiny_checkpoint(fmt) for fmt in ("awq", "qat", "fp16")}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.new("RGB", (64, 40), (200, 30, 30)).save(path)
    return path


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


# -- checkpoint kinds --------------------------------------------------------------------------------

def test_qat_loads_packed_and_equals_its_packed_awq(ckpts, image, tmp_path):
    report = pack_qat_checkpoint(ckpts["qat"], tmp_path / "packed", progress=False)
    assert report.max_code_error == 0 and report.layers == 14 and report.awq_bytes < report.qat_bytes
    qat, awq = load(ckpts["qat"], device="cpu"), load(tmp_path / "packed", device="cpu")
    assert qat.loaded.stats.format == "grace-qat" and awq.loaded.stats.format == "grace-awq"
    for (name, a), (_, b) in zip(qat.model.language_model.named_modules(), awq.model.language_model.named_modules()):
        if hasattr(a, "to_awq"):
            ta, tb = a.to_awq(), b.to_awq()
            assert torch.equal(ta.qweight, tb.qweight) and torch.equal(ta.scales, tb.scales), name
    ga = qat.generate("Hi", images=[image], max_new_tokens=6)
    gb = awq.generate("Hi", images=[image], max_new_tokens=6)
    assert ga.token_ids == gb.token_ids


def test_fp16_checkpoint_dense_and_rtn(ckpts, image):
    dense = load(ckpts["fp16"], device="cpu")
    assert dense.memory()["int4_linears"] == dense.memory()["int4_kernel_layouts"] == 0
    rtn = load(ckpts["fp16"], device="cpu", quantize="rtn")
    assert rtn.memory()["int4_linears"] + rtn.memory()["int4_kernel_layouts"] > 0
    assert rtn.memory()["language_dense"] < dense.memory()["language_dense"]
    # synthesized fp16 weights are q*s with |q| <= 8, so RTN with s = max/7 is close but not identical
    g1 = dense.generate("Hi", images=[image], max_new_tokens=4)
    g2 = rtn.generate("Hi", images=[image], max_new_tokens=4)
    assert len(g1.token_ids) == len(g2.token_ids) == 4 or "stop" in (g1.finish_reason, g2.finish_reason)


def test_vision_tower_from_separate_folder(ckpts, image, tmp_path):
    """Without bundled tower tensors, mm_vision_tower names a CLIP folder (here relative to the checkpoint)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    base = load(ckpts["awq"], device="cpu")
    ckpt = copy_ckpt(ckpts["awq"], tmp_path / "ckpt")
    store = TensorStore(ckpt)
    kept = {k: store.get(k) for k in store.keys() if not k.startswith(VISION_PREFIX)}
    tower_sd = {k[len(VISION_PREFIX):]: store.get(k) for k in store.keys() if k.startswith(VISION_PREFIX)}
    del store
    save_file(kept, str(ckpt / "model.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    vcfg = CLIPVisionConfig(**cfg.pop("mm_vision_config"))
    cfg["mm_vision_tower"] = "clip-tower"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tower = CLIPVisionModel(vcfg)
    tower.load_state_dict({k: v.float() for k, v in tower_sd.items()}, strict=False)
    tower.save_pretrained(ckpt / "clip-tower")
    vlm = load(ckpt, device="cpu")
    assert vlm.generate("Hi", images=[image], max_new_tokens=5).token_ids == \
        base.generate("Hi", images=[image], max_new_tokens=5).token_ids


def test_hub_id_offline_gives_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load("ForeverBlue/LLaVA-1.5-7B-GRACE-W4G128-AWQ", device="cpu")
    with pytest.raises(CheckpointError, match="neither a local folder nor a Hub id"):
        load(str(tmp_path / "no" / "such" / "dir"), device="cpu")


# -- generation ----------------------------------------------------------------------------------------

def test_generation_contract(ckpts, image):
    vlm = load(ckpts["awq"], device="cpu")
    gen = vlm.generate("What is it?", images=[image], max_new_tokens=10)
    assert gen.prompt.startswith("A chat between a curious user") and gen.prompt.endswith("ASSISTANT:")
    assert "USER: <image>\nWhat is it? ASSISTANT:" in gen.prompt
    assert gen.prompt_token_ids[0] == 1 and gen.prompt_token_ids.count(-200) == 1
    assert gen.finish_reason in ("stop", "length") and len(gen.token_ids) <= 10
    assert gen.text == vlm.tokenizer.decode(gen.token_ids).strip()
    t = gen.timings
    assert t.prefill_tokens == len(gen.prompt_token_ids) - 1 + 16  # tiny tower: 56 px / 14 = 4x4 patches
    assert t.ttft_s > 0 and t.image_encode_s > 0
    # streaming gives the same text as non-streaming
    assert "".join(vlm.stream("What is it?", images=[image], max_new_tokens=10)) == gen.text


def test_vision_dtype_and_half_lm_head(ckpts, image):
    """fp32 model: the fp16 lm_head is kept as stored (HalfLinear, fp32 results); vision_dtype moves only the
    tower and projector, and their bf16 features stay close to the fp32 ones."""
    from gracevlm.kernels import native
    from gracevlm.nn import HalfLinear

    ref = load(ckpts["awq"], device="cpu")
    if native.load_library() is not None:
        head = ref.model.language_model.lm_head
        assert isinstance(head, HalfLinear) and head.weight.dtype == torch.float16
        # on CPU the AWQ buffers are freed once the native layout holds them; keep_awq keeps them
        layers = [m for m in ref.model.modules() if hasattr(m, "awq_released")]
        assert layers and all(m.awq_released for m in layers)
        mem = ref.memory()
        assert mem["int4_linears"] == 0 and mem["int4_kernel_layouts"] > 0
        kept = load(ckpts["awq"], device="cpu", keep_awq=True)
        assert not any(m.awq_released for m in kept.model.modules() if hasattr(m, "awq_released"))
        assert kept.memory()["int4_linears"] > 0
        assert kept.generate("Hi", max_new_tokens=5).token_ids == ref.generate("Hi", max_new_tokens=5).token_ids
    fast = load(ckpts["awq"], device="cpu", vision_dtype="bfloat16")
    assert next(fast.model.vision_tower.parameters()).dtype == torch.bfloat16
    assert fast.model.projector[0].weight.dtype == torch.bfloat16
    assert fast.model.language_model.model.norm.weight.dtype == torch.float32
    f32, _ = ref.encode_images([image])
    bf16, _ = fast.encode_images([image])
    assert bf16.dtype == torch.float32 and float((bf16 - f32).norm() / f32.norm()) < 5e-2
    assert fast.generate("What is it?", images=[image], max_new_tokens=4).finish_reason in ("stop", "length")
    with pytest.raises(InputError, match="vision_dtype"):
        load(ckpts["awq"], device="cpu", vision_dtype="int8")


def test_sampling_is_seeded_and_stop_strings_cut(ckpts):
    vlm = load(ckpts["awq"], device="cpu")
    a = vlm.generate("Tell me", temperature=0.9, top_p=0.9, top_k=50, seed=3, max_new_tokens=12)
    b = vlm.generate("Tell me", temperature=0.9, top_p=0.9, top_k=50, seed=3, max_new_tokens=12)
    assert a.token_ids == b.token_ids
    full = vlm.generate("Tell me", max_new_tokens=16)
    if len(full.text) > 6:
        stop = full.text[3:6]
        cut = vlm.generate("Tell me", max_new_tokens=16, stop=[stop])
        assert cut.finish_reason == "stop" and stop not in cut.text
        assert full.text.startswith(cut.text) and len(cut.text) <= full.text.index(stop)
        assert "".join(vlm.stream("Tell me", max_new_tokens=16, stop=[stop])) == cut.text


def test_multi_turn_chat_with_images_in_two_turns(ckpts, image):
    vlm = load(ckpts["awq"], device="cpu")
    first = vlm.chat([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                   {"type": "text", "text": "What?"}]}], max_new_tokens=4)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                         {"type": "image", "image": image.read_bytes()}]}]
    gen = vlm.chat(msgs, max_new_tokens=4)
    assert gen.prompt_token_ids.count(-200) == 2
    assert f"ASSISTANT: {first.text}</s>USER: <image>\nAnd this? ASSISTANT:" in gen.prompt


def test_text_only_and_conv_modes(ckpts):
    vlm = load(ckpts["awq"], device="cpu")
    gen = vlm.generate("Hello", max_new_tokens=3, conv_mode="llava_v1")
    assert -200 not in gen.prompt_token_ids and "curious human" in gen.prompt
    with pytest.raises(InputError, match="unknown conversation template"):
        vlm.generate("Hello", conv_mode="nope")


# -- bad input -------------------------------------------------------------------------------------------

def test_bad_generation_input(ckpts, image, tmp_path):
    vlm = load(ckpts["awq"], device="cpu")
    with pytest.raises(InputError, match="2 <image> placeholders but 1 image"):
        vlm.generate("<image>\n<image>\nWhat?", images=[image])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        vlm.generate("What?", images=[empty])
    with pytest.raises(InputError, match="context window"):
        vlm.generate("word " * 3000, max_new_tokens=4)
    with pytest.raises(InputError, match="max_new_tokens"):
        vlm.generate("Hi", max_new_tokens=0)
    with pytest.raises(InputError, match="unknown generation arguments"):
        vlm.generate("Hi", beams=3)


def test_bomb_image_refused(ckpts, tmp_path):
    from gracevlm.models.llava.processing import ImageSpec, preprocess_image
    big = tmp_path / "big.png"
    Image.new("1", (9000, 9000)).save(big)
    with pytest.raises(InputError, match="pixels"):
        preprocess_image(big, ImageSpec(max_pixels=10_000_000))


@pytest.mark.parametrize("breakage, message", [
    ("truncate", "truncated or corrupt"),
    ("no_tokenizer", "tokenizer.model"),
    ("bad_module_list", "names 'model.layers.9.mlp.up_proj' but the config has 2 layers"),
    ("wrong_shape", "scales has shape"),
    ("no_config", "config.json not found"),
    ("no_weights", "no safetensors weights"),
])
def test_broken_checkpoints(ckpts, tmp_path, breakage, message):
    ckpt = copy_ckpt(ckpts["awq"], tmp_path / "broken")
    st = ckpt / "model.safetensors"
    if breakage == "truncate":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif breakage == "no_tokenizer":
        (ckpt / "tokenizer.model").unlink()
    elif breakage == "bad_module_list":
        mods = json.loads((ckpt / "awq_quantized_modules.json").read_text())
        mods["modules"].append("model.layers.9.mlp.up_proj")
        (ckpt / "awq_quantized_modules.json").write_text(json.dumps(mods))
    elif breakage == "wrong_shape":
        from safetensors.torch import load_file, save_file
        sd = load_file(str(st))
        sd["model.layers.0.mlp.up_proj.scales"] = sd["model.layers.0.mlp.up_proj.scales"][:, :8].contiguous()
        save_file(sd, str(st))
    elif breakage == "no_config":
        (ckpt / "config.json").unlink()
    elif breakage == "no_weights":
        st.unlink()
    with pytest.raises((CheckpointError, InputError), match=message):
        load(ckpt, device="cpu")


# -- CLI -------------------------------------------------------------------------------------------------

def test_cli_run_json_inspect_and_pack(ckpts, image, tmp_path, capsys):
    assert cli(["run", "--model", str(ckpts["awq"]), "--image", str(image), "--query", "What?",
                "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "prompt_token_ids", "timings"} and -200 in out["prompt_token_ids"]
    assert {"prefill_tok_s", "decode_tok_s", "ttft_s"} <= set(out["timings"])
    assert cli(["inspect", str(ckpts["awq"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "grace-awq" and info["checks"]["qzeros_all_0x88888888"]
    assert info["quantization"]["packed_modules"] == 14
    assert cli(["pack", "--qat", str(ckpts["qat"]), "--out", str(tmp_path / "p"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_code_error"] == 0
    assert cli(["pack", "--qat", str(ckpts["qat"]), "--out", str(tmp_path / "p")]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert cli(["run", "--model", str(tmp_path / "nope"), "--query", "x"]) == 2
