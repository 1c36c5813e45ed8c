"""Tiny Qwen3-VL checkpoints for tests: a byte-level BPE tokenizer.json with the Qwen special tokens, a
Qwen3-VL-style chat template, tiny random transformers configs/models, transformers' reference processor."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CORPUS = [
    "Describe the image in one sentence. What is shown here? The cat sits on a red mat.",
    "How many apples are on the table? There are 3 apples, 12 pears and 0 plums.",
    "You are a helpful assistant. Answer briefly, in English or français: café, naïve, über!",
    "Compare the two pictures.\nLeft one is brighter; right one isn't. It's 2024-05-17 at 10:30.",
    "def f(x):\n    return x ** 2  # squares\n\tTabs and   spaces   matter.",
] * 4

# Written from the spec (shared/reference/qwen3-vl.md section 5): no default system prompt, parts rendered
# in order, image parts -> vision_start/image_pad/vision_end, system text parts concatenated.
CHAT_TEMPLATE = """{%- if tools %}<|im_start|>system
Tools: {{ tools | tojson }}<|im_end|>
{% endif -%}
{%- for message in messages -%}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string -%}
{{ message['content'] }}
{%- else -%}
{%- for part in message['content'] -%}
{%- if message['role'] != 'system' and (part['type'] == 'image' or 'image' in part or 'image_url' in part) -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif 'text' in part -%}
{{ part['text'] }}
{%- endif -%}
{%- endfor -%}
{%- endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


# Conversations used by the prompt, position and logits tests; SIZES: (w, h) of each one's images.
CONVERSATIONS = {
    "one image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    "two images": [{"role": "system", "content": [{"type": "text", "text": "Be brief. "},
                                                  {"type": "text", "text": "Answer in English."}]},
                   {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                                {"type": "text", "text": " and "}, {"type": "image"}]}],
    "two turns": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
                  {"role": "assistant", "content": "A red mat, café naïve über!"},
                  {"role": "user", "content": [{"type": "text", "text": "How many apples?\n\t 12 "}]}],
    "text only": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "It's 2024-05-17; what's   the date?"}],
}
SIZES = {"one image": [(40, 28)], "two images": [(20, 52), (64, 33)], "two turns": [(31, 31)], "text only": []}


def build_tokenizer_json(path) -> None:
    """Train a tiny byte-level BPE (Qwen2 split regex, NFC, ByteLevel without prefix space) and add the
    Qwen special tokens after the learned vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(path))


def write_text_files(folder) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json (with the chat template); returns the special token ids."""
    from tokenizers import Tokenizer

    build_tokenizer_json(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "add_bos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "chat_template": CHAT_TEMPLATE}))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIALS}


def hf_config(ids: dict[str, int], *, vocab=400, deepstack=(0, 1), tie=True, num_pos=36, patch=4):
    """A tiny transformers Qwen3VLConfig (head_dim 16, mrope_section [3, 3, 2], GQA 4/2)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=5000.0, mrope_section=[3, 3, 2],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=patch,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                           num_position_embeddings=num_pos, deepstack_visual_indexes=list(deepstack)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie)


def image_processor_kwargs(patch=4):
    return dict(patch_size=patch, merge_size=2, temporal_patch_size=2,
                size={"shortest_edge": 8 * 8 * 4, "longest_edge": 24 * 24 * 4}, image_mean=[0.5] * 3,
                image_std=[0.5] * 3)


def reference_processor(folder):
    """transformers' Qwen3VLProcessor built from its parts (no video processor: it needs torchvision)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class Processor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tok = AutoTokenizer.from_pretrained(folder)
    return Processor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder), tokenizer=tok,
                     video_processor=None, chat_template=CHAT_TEMPLATE)


def random_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_folder(folder, *, patch=4, **config_kw):
    """A checkpoint folder without weights: config.json, tokenizer files, preprocessor_config.json,
    generation_config.json (eos list + sampling defaults, as the Instruct releases).
    Returns the transformers config."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = write_text_files(folder)
    cfg = hf_config(ids, patch=patch, **config_kw)
    cfg.save_pretrained(folder)
    Qwen2VLImageProcessorPil(**image_processor_kwargs(patch)).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}))
    return cfg
