"""Qwen3-VL prompts against transformers: template rendering, image pad expansion, token ids."""
import json

import pytest

from gracevlm.errors import CheckpointError, InputError
from gracevlm.models.qwen3_vl.chat import ChatPrompt, load_chat_template, render_chat
from gracevlm.models.qwen3_vl.config import Qwen3VLConfig
from gracevlm.models.qwen3_vl.processing import ImageProcessorConfig, process_images
from gracevlm.models.qwen3_vl.tokenizer import QwenTokenizer

pytest.importorskip("transformers")
from qwen3_vl_helpers import (CHAT_TEMPLATE, CONVERSATIONS, SIZES, random_image,  # noqa: E402
                              reference_processor, write_folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3vl_chat")
    write_folder(path)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    return reference_processor(folder)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_ids_equal_transformers_processor(folder, reference, name):
    messages = CONVERSATIONS[name]
    images = [random_image(w, h, i) for i, (w, h) in enumerate(SIZES[name])]
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = reference(text=[text], images=images or None, return_tensors="np")
    prompt = ChatPrompt.from_folder(folder)
    assert prompt.text(messages) == text
    grids = process_images(images, ImageProcessorConfig.from_folder(folder))[1].tolist() if images else []
    ids = prompt.ids(messages, grids)
    assert ids == ref["input_ids"][0].tolist()
    image_id = prompt.config.image_token_id
    assert ids.count(image_id) == sum(t * h * w // 4 for t, h, w in grids)
    tok_ids = reference.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    tok_ids = tok_ids["input_ids"] if isinstance(tok_ids, dict) or hasattr(tok_ids, "keys") else tok_ids
    assert prompt.ids(messages, [(1, 2, 2)] * len(grids)) == list(tok_ids)  # one pad per image unexpanded


def test_rendered_text_is_the_qwen_layout(folder):
    prompt = ChatPrompt.from_folder(folder)
    assert prompt.text(CONVERSATIONS["two images"]) == (
        "<|im_start|>system\nBe brief. Answer in English.<|im_end|>\n<|im_start|>user\nCompare "
        "<|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_tojson_and_image_objects(reference):
    tools = [{"name": "météo", "description": "weather <b>"}]
    messages = [{"role": "user", "content": [{"type": "image", "image": random_image(8, 8, 0)},
                                             {"type": "text", "text": "hi"}]}]
    ours = render_chat(CHAT_TEMPLATE, messages, tools=tools)
    assert ours == reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "météo" in ours and "<b>" in ours


def test_tokenizer_round_trip_and_special_ids(folder, reference):
    tok = QwenTokenizer.from_folder(folder)
    hf = reference.tokenizer
    text = "<|im_start|>user\nCafé  naïve, 1234 apples!\n\n<|im_end|>"
    assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=False)
    assert (tok.eos_id, tok.pad_id) == (hf.eos_token_id, hf.pad_token_id)
    assert tok.vocab_size == len(hf)


def test_errors(folder, tmp_path):
    prompt = ChatPrompt.from_folder(folder)
    with pytest.raises(InputError, match="1 image placeholder.*2 image"):
        prompt.ids(CONVERSATIONS["one image"], [(1, 4, 4), (1, 4, 4)])
    with pytest.raises(InputError, match="messages must be"):
        prompt.ids([{"content": "no role"}])
    with pytest.raises(CheckpointError, match="no chat template"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(CheckpointError, match="does not compile"):
        render_chat(load_chat_template(tmp_path), [{"role": "user", "content": "x"}])
    raw = json.loads((folder / "config.json").read_text())
    raw["image_token_id"] = raw["vision_end_token_id"]
    with pytest.raises(CheckpointError, match="image_token_id"):
        ChatPrompt(prompt.template, prompt.tokenizer, Qwen3VLConfig.from_dict(raw)).check_token_ids()


def test_build_inputs_equals_processor_apply_chat_template_tokenize(folder, reference):
    from gracevlm.models.qwen3_vl.chat import build_inputs

    messages = [{"role": "system", "content": "Look closely."},
                {"role": "user", "content": [{"type": "image", "image": random_image(40, 28, 0)},
                                             {"type": "text", "text": "and"},
                                             {"type": "image", "image": random_image(20, 52, 1)},
                                             {"type": "text", "text": " which is brighter?"}]}]
    ref = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                        return_tensors="np")
    got = build_inputs(ChatPrompt.from_folder(folder), ImageProcessorConfig.from_folder(folder), messages)
    assert got.ids == ref["input_ids"][0].tolist()
    assert got.grid_thw.tolist() == ref["image_grid_thw"].tolist()
    assert (got.pixel_values == ref["pixel_values"]).all()
    text_only = build_inputs(ChatPrompt.from_folder(folder), ImageProcessorConfig.from_folder(folder),
                             CONVERSATIONS["text only"])
    assert text_only.pixel_values is None and text_only.ids == reference.apply_chat_template(
        CONVERSATIONS["text only"], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"][0]
