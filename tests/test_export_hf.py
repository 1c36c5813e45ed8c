"""Export to llava-hf and compressed-tensors, checked against stock transformers and compressed-tensors."""
import json

import numpy as np
import pytest

import torch
from PIL import Image
from safetensors.torch import load_file

import gracevlm
from gracevlm.export import export_model
from gracevlm.export.chat_template import chat_template
from gracevlm.export.source import SourceModel
from gracevlm.models.llava.weights import original_to_hf
from gracevlm.models.llava.processing import preprocess_images
from gracevlm.models.llava.chat import prepare_user_text, render_prompt

transformers = pytest.importorskip("transformers")
QUERY = "What is shown in this image?"


@pytest.fixture(scope="module")
def src(tiny_awq):
    return tiny_awq


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))  # not square: exercises padding


@pytest.fixture(scope="module")
def exports(src, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {fmt: (root / fmt, export_model(src, fmt, root / fmt)) for fmt in ("llava-hf", "compressed-tensors")}


@pytest.fixture(scope="module")
def ours(src, image):
    vlm = gracevlm.load(src, device="cpu")
    return vlm, vlm.generate(QUERY, images=[image], max_new_tokens=10)


def hf_generate(folder, image, n=10, **load_kwargs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, **load_kwargs).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUERY}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    if new and new[-1] == model.config.text_config.eos_token_id:
        new = new[:-1]
    return model, prompt, inputs, new


def collapse_image_tokens(ids, image_id):
    out = []
    for t in ids:
        if t == image_id and out and out[-1] == -200:
            continue
        out.append(-200 if t == image_id else t)
    return out


def test_llava_hf_loads_in_transformers_and_decodes_like_gracevlm(exports, ours, image):
    folder, report = exports["llava-hf"]
    vlm, ref = ours
    model, prompt, inputs, new = hf_generate(folder, image)
    assert report.exact and report.rounding["dtype"] == "float16"
    # processor: pixels and prompt ids equal gracevlm's preprocessing and tokenisation
    assert torch.equal(inputs["pixel_values"], preprocess_images([image], vlm.runtime.image_spec))
    assert prompt == "<s>" + ref.prompt  # the template writes BOS; the tokenizer does not add a second one
    assert collapse_image_tokens(inputs["input_ids"][0].tolist(), model.config.image_token_index) == \
        ref.prompt_token_ids
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == 16  # (56/14)^2 patches
    assert new == ref.token_ids and len(new) > 3


def test_llava_hf_weights_are_the_dequantized_codes(src, exports, tmp_path):
    folder, report = exports["llava-hf"]
    source = SourceModel(src)
    tensors = load_file(str(folder / "model.safetensors"))
    codes = source.linear("model.layers.1.self_attn.k_proj")
    exact = codes.dequantize()
    assert torch.equal(tensors[original_to_hf(codes.name + ".weight")], exact.half())
    assert report.rounding["max_abs"] >= float((exact.half().float() - exact).abs().max()) > 0
    # every dense tensor is copied unchanged, except that the vocabulary is cut to the tokenizer: the 1000
    # pieces' rows, a zero row for <image> (id 1000); the source's 23 rows past the tokenizer are dropped
    vocab = ("model.embed_tokens.weight", "lm_head.weight")
    for key in source.dense_keys() + source.vision_keys():
        if key in vocab:
            out = tensors[original_to_hf(key)]
            assert out.shape == (1001, 128) and torch.equal(out[:1000], source.tensor(key)[:1000]), key
            assert not out[1000].any(), key
        else:
            assert torch.equal(tensors[original_to_hf(key)], source.tensor(key)), key
    cfg = json.loads((folder / "config.json").read_text())
    gen = json.loads((folder / "generation_config.json").read_text())
    assert cfg["image_token_index"] == 1000 and cfg["text_config"]["vocab_size"] == 1001
    assert gen["suppress_tokens"] == [1000]
    # float32: exact
    f32 = export_model(src, "llava-hf", tmp_path / "f32", dtype="float32")
    t32 = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert torch.equal(t32[original_to_hf(codes.name + ".weight")], exact) and f32.rounding["max_abs"] == 0.0


def test_image_token_rows_are_padded_when_the_vocabulary_is_full(src, ours, image, tmp_path):
    """LLaVA-1.5's case: as many embedding rows as tokenizer pieces (32000). <image> gets the next id and one
    zero row (32001 rows for LLaVA-1.5); every existing row is unchanged."""
    import shutil

    from safetensors.torch import save_file

    from gracevlm.export.hf import vocab_layout

    assert vocab_layout(32000, 32000) == (32000, 32001) and vocab_layout(1000, 1024) == (1000, 1001)
    full = tmp_path / "full-vocab"
    shutil.copytree(src, full)
    tensors = load_file(str(full / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[key] = tensors[key][:1000].contiguous()
    save_file(tensors, str(full / "model.safetensors"))
    cfg = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1000}))
    report = export_model(full, "llava-hf", tmp_path / "hf")
    out = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for key, hf in (("model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
                    ("lm_head.weight", "language_model.lm_head.weight")):
        assert out[hf].shape == (1001, 128) and torch.equal(out[hf][:1000], tensors[key])
        assert not out[hf][1000:].any()
    assert "1000 -> 1001" in report.notes[0]
    _, _, _, new = hf_generate(tmp_path / "hf", image)
    assert new == ours[1].token_ids  # rows >= 1000 were never sampled by gracevlm either


def test_compressed_tensors_matches_the_reference_packer_and_transformers(src, exports, ours, image):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig

    folder, report = exports["compressed-tensors"]
    vlm, ref = ours
    source = SourceModel(src)
    tensors = load_file(str(folder / "model.safetensors"))
    for name in source.quantized:
        codes = source.linear(name)
        hf = original_to_hf(name)
        q = (codes.u.to(torch.int16) - 8).to(torch.int8)
        assert torch.equal(tensors[f"{hf}.weight_packed"], pack_to_int32(q, 4)), name
        assert torch.equal(tensors[f"{hf}.weight_scale"], codes.scales) and tensors[f"{hf}.weight_scale"].dtype == \
            torch.float16
        assert tensors[f"{hf}.weight_shape"].tolist() == list(codes.shape)
        assert f"{hf}.weight_zero_point" not in tensors
    cfg = json.loads((folder / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert qc.format == "pack-quantized" and qc.config_groups["group_0"].weights.group_size == 128
    # transformers + compressed-tensors decompress in the scale dtype: fp16((u - 8) * s), the AWQ kernels' value
    # (one rounding of the exact product); tower and projector stay dense and unchanged
    model, prompt, inputs, new = hf_generate(folder, image,
                                             quantization_config=CompressedTensorsConfig(dequantize=True))
    layer = model.model.language_model.layers[0].self_attn.q_proj
    assert torch.equal(layer.weight, source.linear("model.layers.0.self_attn.q_proj").dequantize().half().float())
    tower_fc = model.model.vision_tower.encoder.layers[0].mlp.fc1
    assert type(tower_fc) is torch.nn.Linear and torch.equal(
        tower_fc.weight, source.tensor("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
                                       ).float())
    assert new == ref.token_ids
    # the default (compressed until the first forward) path decodes the same
    assert hf_generate(folder, image)[3] == ref.token_ids


def test_compressed_tensors_round_trip_into_gracevlm(exports, ours, image):
    folder, _ = exports["compressed-tensors"]
    vlm, ref = ours
    back = gracevlm.load(folder, device="cpu")
    assert back.loaded.stats.format == "compressed-tensors"
    pairs = zip(vlm.model.language_model.named_modules(), back.model.language_model.named_modules())
    n = 0
    for (name, a), (_, b) in pairs:
        if hasattr(a, "to_awq"):
            ta, tb = a.to_awq(), b.to_awq()
            assert torch.equal(ta.qweight, tb.qweight) and torch.equal(ta.qzeros, tb.qzeros), name
            assert torch.equal(ta.scales, tb.scales), name
            n += 1
    assert n == 8  # 2 layers x (fused qkv, o, fused gate_up, down) hold the 14 exported linears
    g = back.generate(QUERY, images=[image], max_new_tokens=10)
    assert g.token_ids == ref.token_ids and g.prompt_token_ids == ref.prompt_token_ids
    dense = gracevlm.load(exports["llava-hf"][0], device="cpu")  # the dense llava-hf export reads back too
    assert dense.loaded.stats.format == "llava-hf"
    assert dense.generate(QUERY, images=[image], max_new_tokens=10).token_ids == ref.token_ids


def test_names_and_shapes_follow_the_vllm_and_sglang_loaders(exports, src):
    """vLLM ``LlavaForConditionalGeneration`` (AutoWeightsLoader over language_model / vision_tower /
    multi_modal_projector; CompressedTensorsWNA16 params weight_packed [O, I/8] int32, weight_scale [O, I/g],
    weight_shape [2]) and SGLang ``LlavaForConditionalGeneration.load_weights`` (strips ``language_model.`` /
    ``vision_tower.`` and hands the rest to LlamaForCausalLM / CLIPVisionModel, the projector by exact name)."""
    from compressed_tensors.utils.match import is_match

    folder, _ = exports["compressed-tensors"]
    tensors = load_file(str(folder / "model.safetensors"))
    prefixes = ("language_model.model.layers.", "language_model.model.embed_tokens.", "language_model.model.norm.",
                "language_model.lm_head.", "vision_tower.vision_model.", "multi_modal_projector.linear_1.",
                "multi_modal_projector.linear_2.")
    assert all(k.startswith(prefixes) for k in tensors), [k for k in tensors if not k.startswith(prefixes)][:3]
    wp = tensors["language_model.model.layers.0.mlp.down_proj.weight_packed"]
    assert wp.dtype == torch.int32 and tuple(wp.shape) == (128, 256 // 8)
    assert tuple(tensors["language_model.model.layers.0.mlp.down_proj.weight_scale"].shape) == (128, 2)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["model_type"] == "llava"
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["image_aspect_ratio"] == "pad" and cfg["mm_patch_merge_type"] == "flat"  # SGLang reads these
    assert cfg["text_config"]["rope_theta"] == 10000.0 and cfg["text_config"]["rms_norm_eps"] == 1e-5
    qc = cfg["quantization_config"]
    group = qc["config_groups"]["group_0"]
    linear = torch.nn.Linear(2, 2)
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    quantized = ["language_model.model.layers.0.self_attn.qkv_proj", "language_model.model.layers.1.mlp.gate_up_proj",
                 "model.language_model.layers.0.self_attn.o_proj", "language_model.model.layers.0.mlp.down_proj"]
    dense = ["vision_tower.vision_model.encoder.layers.0.self_attn.qkv_proj", "multi_modal_projector.linear_1",
             "model.vision_tower.encoder.layers.0.mlp.fc1", "model.multi_modal_projector.linear_2",
             "language_model.lm_head", "lm_head"]
    for name in quantized:
        assert is_match(name, linear, group["targets"], qc["ignore"], fused), name
    for name in dense:
        assert not is_match(name, linear, group["targets"], qc["ignore"], fused), name
    proc = json.loads((folder / "processor_config.json").read_text())
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert proc["patch_size"] == 14 and "image_processor" not in proc  # transformers 4.x passes these as kwargs
    assert pre["image_processor_type"] == "LlavaImageProcessor" and pre["do_pad"] is True
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok["added_tokens_decoder"]["1000"]["content"] == "<image>" and "extra_special_tokens" not in tok


def normalized(messages):
    """What gracevlm's chat API makes of transformers-style content lists (texts joined by newlines, one
    ``<image>\\n`` per image in front when the text has none)."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            text = "\n".join(p["text"] for p in c if p["type"] == "text")
            n = sum(p["type"] == "image" for p in c)
            c = prepare_user_text(text, n) if n else text
        out.append({"role": m["role"], "content": c})
    return out


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
    [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
     {"role": "user", "content": "Sure? "}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "a"},
                                  {"type": "text", "text": "b 'q' \"d\""}]}],
    [{"role": "user", "content": [{"type": "text", "text": "<image> first"}, {"type": "image"}]}],
    [{"role": "user", "content": "text only"}],
])
def test_chat_template_renders_the_gracevlm_prompt(messages):
    from transformers.utils.chat_template_utils import render_jinja_template

    for name in ("vicuna_v1", "llava_v1", "plain"):
        rendered = render_jinja_template([messages], chat_template=chat_template(name), add_generation_prompt=True)
        rendered = rendered[0][0] if isinstance(rendered, tuple) else rendered
        assert rendered == render_prompt(normalized(messages), name), name
        with_bos = render_jinja_template([messages], chat_template=chat_template(name, bos="<s>"),
                                         add_generation_prompt=True)
        assert (with_bos[0][0] if isinstance(with_bos, tuple) else with_bos) == "<s>" + rendered, name
    system = [{"role": "system", "content": "Be brief."}] + messages  # replaces the template's system text
    for name in ("vicuna_v1", "llava_v1"):
        rendered = render_jinja_template([system], chat_template=chat_template(name), add_generation_prompt=True)
        rendered = rendered[0][0] if isinstance(rendered, tuple) else rendered
        assert rendered == render_prompt(normalized(system), name) and rendered.startswith("Be brief."), name
    with pytest.raises(Exception, match="no system slot"):
        render_jinja_template([system], chat_template=chat_template("plain"))
    with pytest.raises(Exception, match="must come first"):
        render_jinja_template([messages + [{"role": "system", "content": "x"}]], chat_template=chat_template())


@pytest.mark.parametrize("fmt", ["llava-hf", "compressed-tensors"])
def test_every_embedding_row_has_a_token(exports, fmt):
    """No peer can sample or report an id without text: the tokenizer has exactly one entry per row."""
    from transformers import AutoTokenizer

    folder, _ = exports[fmt]
    tok = AutoTokenizer.from_pretrained(folder)
    rows = load_file(str(folder / "model.safetensors"))["language_model.lm_head.weight"].shape[0]
    cfg = json.loads((folder / "config.json").read_text())
    assert len(tok) == rows == cfg["text_config"]["vocab_size"] == 1001
    pieces = tok.convert_ids_to_tokens(list(range(rows)))
    assert None not in pieces and len(set(pieces)) == rows and pieces[-1] == "<image>"


def test_every_chat_path_gives_gracevlm_prompt_ids_with_one_bos(exports, ours, image):
    """gracevlm's prompt ids (BOS once) from: vLLM's OpenAI chat rule (the template rendered to text, then
    tokenized without special tokens - vllm ``ChatCompletionRequest.add_special_tokens`` defaults to False;
    vLLM passes image parts either as content lists or as ``<image>\n`` placeholders before the text),
    transformers' one-step ``apply_chat_template(..., tokenize=True)`` (tokenizer and processor) and the
    two-step processor call."""
    from transformers import AutoProcessor, AutoTokenizer

    vlm, ref = ours
    folder, _ = exports["compressed-tensors"]
    tok = AutoTokenizer.from_pretrained(folder)
    proc = AutoProcessor.from_pretrained(folder, backend="pil")
    image_id = tok.convert_tokens_to_ids("<image>")
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUERY}]}]
    placeholder = [{"role": "user", "content": "<image>\n" + QUERY}]
    want = ref.prompt_token_ids
    assert want[0] == vlm.tokenizer.bos_id and want.count(vlm.tokenizer.bos_id) == 1
    for msgs in (parts, placeholder):
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        vllm_ids = tok(rendered, add_special_tokens=False).input_ids  # vLLM's chat tokenization
        assert collapse_image_tokens(vllm_ids, image_id) == want
        one_step = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        one_step = one_step["input_ids"] if not isinstance(one_step, list) else one_step
        assert collapse_image_tokens(one_step, image_id) == want
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        two_step = proc(images=image, text=text, return_tensors="pt")["input_ids"][0].tolist()
        assert collapse_image_tokens(two_step, image_id) == want
    one = proc.apply_chat_template(parts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   images=[image], return_tensors="pt")
    assert collapse_image_tokens(one["input_ids"][0].tolist(), image_id) == want
    # text-only chat as well; text that bypasses the template gets no BOS (the model card says to add <s>)
    msgs = [{"role": "user", "content": "Hello there"}]
    text_ref = vlm.tokenizer.encode(render_prompt(msgs, "vicuna_v1"))
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok(rendered, add_special_tokens=False).input_ids == text_ref == tok(rendered).input_ids
    assert tok("Hello").input_ids == vlm.tokenizer.encode("Hello", add_bos=False)
