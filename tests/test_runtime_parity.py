"""Logits parity with transformers' own LLaVA classes, built from the same (dequantized) weights."""
import pytest
import torch
from PIL import Image

from gracevlm.engine.vlm import load
from gracevlm.formats.awq import dequantize_awq
from gracevlm.models.llava.chat import IMAGE_TOKEN_INDEX
from gracevlm.nn import Int4Linear


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.png"
    img = Image.new("RGB", (90, 50), (20, 200, 30))
    img.paste((200, 10, 10), (10, 10, 40, 40))
    img.save(path)
    return path


def hf_llava_from(vlm):
    """transformers' LlavaForConditionalGeneration holding the same weights (INT4 linears dequantized).
    The vocabulary gets one extra row for the image token (transformers embeds it before splicing)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = vlm.config
    tower = vlm.model.vision_tower
    vocab = cfg.vocab_size
    n_patches = (tower.config.image_size // tower.config.patch_size) ** 2
    text = LlamaConfig(vocab_size=vocab + 1, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                       max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(**tower.config.to_dict())
    hf_cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=vocab,
                         vision_feature_layer=cfg.mm_vision_select_layer, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", multimodal_projector_bias=True, image_seq_length=n_patches,
                         tie_word_embeddings=False)
    hf = LlavaForConditionalGeneration(hf_cfg).eval()
    lm = vlm.model.language_model
    sd = {}
    fused_parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    for name, mod in lm.named_modules():
        if isinstance(mod, Int4Linear):
            prefix, _, leaf = name[len("model."):].rpartition(".")
            leaves = fused_parts.get(leaf, [leaf])
            parts = mod.split_awq([mod.out_features // len(leaves)] * len(leaves))
            for part_name, t in zip(leaves, parts):
                sd[f"model.language_model.{prefix}.{part_name}.weight"] = dequantize_awq(
                    t.qweight, t.qzeros, t.scales, t.group_size).t()
    for name, t in lm.named_parameters():
        if name.startswith("model.") and name != "model.embed_tokens.weight":
            sd[f"model.language_model.{name[len('model.'):]}"] = t.float()
    emb = lm.model.embed_tokens.weight.float()
    sd["model.language_model.embed_tokens.weight"] = torch.cat([emb, torch.zeros(1, emb.shape[1])])
    head = lm.lm_head.weight.float()
    sd["lm_head.weight"] = torch.cat([head, torch.zeros(1, head.shape[1])])
    for name, t in tower.state_dict().items():
        sd[f"model.vision_tower.{name}"] = t.float()
    proj = vlm.model.projector
    for i, j in ((0, 1), (2, 2)):
        sd[f"model.multi_modal_projector.linear_{j}.weight"] = proj[i].weight.float()
        sd[f"model.multi_modal_projector.linear_{j}.bias"] = proj[i].bias.float()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)
    return hf, n_patches


def our_logits(vlm, ids, features):
    embeds = vlm.model.embed_prompt(ids, features)
    cache = vlm.model.new_cache(1, embeds.shape[0])
    with torch.inference_mode():
        return vlm.model.language_model(embeds[None], torch.arange(embeds.shape[0])[None], cache,
                                        logits_for="all")[0]


def test_logits_match_transformers_llava(tiny_awq, image):
    vlm = load(tiny_awq, device="cpu", backend="reference")
    hf, n_patches = hf_llava_from(vlm)
    gen = vlm.generate("What is in the picture?", images=[image], max_new_tokens=1)
    ids = gen.prompt_token_ids
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    from gracevlm.models.llava.processing import preprocess_images
    pixels = preprocess_images([image], vlm.runtime.image_spec)
    features, _ = vlm.encode_images([image])
    ours = our_logits(vlm, ids, features)
    hf_ids = []
    for t in ids:
        hf_ids.extend([vlm.config.vocab_size] * n_patches if t == IMAGE_TOKEN_INDEX else [t])
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([hf_ids]), pixel_values=pixels).logits[0, :, :vlm.config.vocab_size]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # generation agrees: our greedy first token equals transformers' argmax at the last position
    assert gen.token_ids[:1] == [int(theirs[-1].argmax())] or gen.finish_reason == "stop"


def test_text_only_logits_match(tiny_awq):
    vlm = load(tiny_awq, device="cpu", backend="reference")
    hf, _ = hf_llava_from(vlm)
    gen = vlm.generate("Count to three.", max_new_tokens=1)
    ids = gen.prompt_token_ids
    ours = our_logits(vlm, ids, None)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids])).logits[0, :, :vlm.config.vocab_size]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_kv_cache_decode_matches_full_forward(tiny_awq, image):
    """Greedy tokens from the cached decode loop equal argmax of a fresh full forward at every step (over the
    tokenizer's ids: embedding rows past it are padding and never sampled)."""
    vlm = load(tiny_awq, device="cpu", backend="reference")
    vocab = vlm.tokenizer.vocab_size
    gen = vlm.generate("Describe it.", images=[image], max_new_tokens=8)
    features, _ = vlm.encode_images([image])
    ids = list(gen.prompt_token_ids)
    for tok in gen.token_ids:
        logits = our_logits(vlm, ids, features)
        assert int(logits[-1, :vocab].argmax()) == tok
        ids.append(tok)


def test_fast_backend_agrees_with_reference_on_greedy_tokens(tiny_awq, image):
    ref = load(tiny_awq, device="cpu", backend="reference").generate("What?", images=[image], max_new_tokens=12)
    fast = load(tiny_awq, device="cpu").generate("What?", images=[image], max_new_tokens=12)
    assert fast.token_ids == ref.token_ids and fast.text == ref.text
