"""Qwen3-VL modules against transformers' Qwen3VLForConditionalGeneration on tiny random configs (fp32):
config parsing, 3-axis positions, M-RoPE tables, vision features + deepstack, full logits, greedy tokens."""
import json

import pytest
import torch

from gracevlm.errors import CheckpointError, InputError
from gracevlm.models.qwen3_vl.chat import ChatPrompt
from gracevlm.models.qwen3_vl.config import Qwen3VLConfig
from gracevlm.models.qwen3_vl.model import Qwen3VLModel, greedy_generate
from gracevlm.models.qwen3_vl.processing import ImageProcessorConfig, process_images
from gracevlm.models.qwen3_vl.rope import MRotary, decode_positions, mrope_positions
from gracevlm.models.qwen3_vl.weights import load_hf_state_dict

pytest.importorskip("transformers")
from qwen3_vl_helpers import CONVERSATIONS, SIZES, random_image, reference_processor, write_folder  # noqa: E402

ATOL = 2e-5


def _randomize(model, seed):
    """Weights far from transformers' small init, so every term of the forward matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.15 * noise)


def _build(tmp_path_factory, name, seed, **config_kw):
    from transformers import Qwen3VLForConditionalGeneration

    folder = tmp_path_factory.mktemp(name)
    cfg = write_folder(folder, **config_kw)
    hf = Qwen3VLForConditionalGeneration(cfg).eval()
    _randomize(hf, seed)
    ours = Qwen3VLModel(Qwen3VLConfig.from_file(folder)).eval()
    load_hf_state_dict(ours, hf.state_dict())
    return folder, hf, ours


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _build(tmp_path_factory, "qwen3vl_tied", 1, tie=True, deepstack=(0, 1))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _build(tmp_path_factory, "qwen3vl_untied", 2, tie=False, deepstack=(2, 0), num_pos=16)


@pytest.fixture(scope="module")
def processors(tied):
    folder = tied[0]
    return reference_processor(folder), ChatPrompt.from_folder(folder), ImageProcessorConfig.from_folder(folder)


def _inputs(processors, name, seed=0):
    ref, prompt, img_cfg = processors
    images = [random_image(w, h, seed + i) for i, (w, h) in enumerate(SIZES[name])]
    text = ref.apply_chat_template(CONVERSATIONS[name], tokenize=False, add_generation_prompt=True)
    hf_in = ref(text=[text], images=images or None, return_tensors="pt")
    pixels, grids = process_images(images, img_cfg) if images else (None, None)
    ids = prompt.ids(CONVERSATIONS[name], grids.tolist() if images else [])
    assert ids == hf_in["input_ids"][0].tolist()
    return hf_in, ids, (torch.from_numpy(pixels) if images else None), grids


def test_config_fields_and_errors(tied):
    folder, hf, _ = tied
    raw = json.loads((folder / "config.json").read_text())
    cfg = Qwen3VLConfig.from_dict(raw)
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.mrope_section) == \
        (64, 4, 2, 16, [3, 3, 2])
    assert (v.depth, v.patch_size, v.grid_side, v.deepstack_visual_indexes) == (3, 4, 6, [0, 1])
    assert cfg.image_token_id == hf.config.image_token_id and cfg.tie_word_embeddings is True
    assert cfg.qat is None and cfg.awq_packing is None

    def broken(edit):
        d = json.loads(json.dumps(raw))
        edit(d)
        return d

    cases = [
        (lambda d: d["text_config"].pop("hidden_size"), "text_config.hidden_size is missing"),
        (lambda d: d.pop("image_token_id"), "image_token_id is missing"),
        (lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[4, 4, 4]), "mrope_section"),
        (lambda d: d["text_config"]["rope_parameters"].update(mrope_interleaved=False), "chunked"),
        (lambda d: d["vision_config"].update(num_position_embeddings=35), "square"),
        (lambda d: d["vision_config"].update(deepstack_visual_indexes=[5]), "deepstack"),
        (lambda d: d["vision_config"].update(out_hidden_size=32), "out_hidden_size"),
        (lambda d: d.update(model_type="llava"), "model_type"),
        (lambda d: d.update(qat={"bits": 3, "group_size": 128}), "qat.bits"),
        (lambda d: d.update(awq_packing={"bits": 4, "group_size": 128, "zero_point": 8}), "qat block"),
        (lambda d: d["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    ]
    for edit, message in cases:
        with pytest.raises(CheckpointError, match=message):
            Qwen3VLConfig.from_dict(broken(edit))
    qat = Qwen3VLConfig.from_dict(broken(lambda d: d.update(
        qat={"bits": 4, "group_size": 128, "skip_keywords": ["visual"], "num_replaced": 21},
        awq_packing={"bits": 4, "group_size": 128, "zero_point": 8, "version": "gemm"})))
    assert (qat.qat.bits, qat.qat.num_replaced, qat.awq_packing.zero_point) == (4, 21, 8)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_position_ids_equal_get_rope_index(tied, processors, name):
    hf = tied[1]
    hf_in, ids, _, grids = _inputs(processors, name)
    if grids is None:  # text only: transformers uses plain arange positions
        ref_pos, ref_delta = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1), torch.tensor([[0]])
    else:
        ref_pos, ref_delta = hf.model.get_rope_index(hf_in["input_ids"], hf_in["mm_token_type_ids"],
                                                     image_grid_thw=hf_in["image_grid_thw"])
    pos, delta = mrope_positions(ids, [] if grids is None else grids.tolist(), hf.config.image_token_id, 2)
    assert torch.equal(pos, ref_pos[:, 0])
    assert delta == int(ref_delta)
    if grids is not None:
        assert delta < 0  # text after an image resumes at p0 + max(h, w) / m, not p0 + token count


def test_position_errors(tied):
    image = tied[1].config.image_token_id
    with pytest.raises(InputError, match="needs 4 consecutive"):
        mrope_positions([1, image, image, 2], [(1, 4, 4)], image, 2)
    with pytest.raises(InputError, match="more image tokens"):
        mrope_positions([1, image], [], image, 2)
    with pytest.raises(InputError, match="2 image"):
        mrope_positions([1, image], [(1, 2, 2), (1, 2, 2)], image, 2)


def test_mrope_tables_equal_rotary_embedding(tied):
    hf = tied[1]
    gen = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 300, (3, 2, 9), generator=gen)
    ref_cos, ref_sin = hf.model.language_model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    cfg = Qwen3VLConfig.from_dict(hf.config.to_dict())
    cos, sin = MRotary(cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section)(positions)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    dec = decode_positions(torch.tensor([[7], [9]]), torch.tensor([-3, 2]))
    assert dec[:, :, 0].tolist() == [[4, 11]] * 3


@pytest.mark.parametrize("sizes", [[(40, 28)], [(20, 52)], [(64, 64)], [(31, 95), (50, 18)]])
def test_vision_features_and_deepstack_equal(tied, processors, sizes):
    _, hf, ours = tied
    images = [random_image(w, h, i + 11) for i, (w, h) in enumerate(sizes)]
    ref_in = processors[0].image_processor(images=images, return_tensors="pt")
    pixels, grids = process_images(images, processors[2])
    assert torch.equal(torch.from_numpy(pixels), ref_in["pixel_values"])
    with torch.no_grad():
        ref = hf.model.visual(ref_in["pixel_values"], grid_thw=ref_in["image_grid_thw"])
        embeds, deepstack = ours.visual(torch.from_numpy(pixels), torch.from_numpy(grids))
    assert embeds.shape == ref.pooler_output.shape == (sum(t * h * w for t, h, w in grids.tolist()) // 4, 64)
    torch.testing.assert_close(embeds, ref.pooler_output, atol=ATOL, rtol=1e-5)
    assert len(deepstack) == len(ref.deepstack_features) == 2
    for a, b in zip(deepstack, ref.deepstack_features):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def test_two_images_do_not_attend_to_each_other(tied, processors):
    ours = tied[2]
    a, b = random_image(40, 28, 1), random_image(20, 52, 2)
    pa, ga = process_images([a], processors[2])
    both, gboth = process_images([a, b], processors[2])
    with torch.no_grad():
        alone = ours.visual(torch.from_numpy(pa), torch.from_numpy(ga))[0]
        joint = ours.visual(torch.from_numpy(both), torch.from_numpy(gboth))[0]
    torch.testing.assert_close(joint[:alone.shape[0]], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_logits_equal_transformers(tied, processors, name):
    _, hf, ours = tied
    hf_in, ids, pixels, grids = _inputs(processors, name)
    with torch.no_grad():
        ref = hf(**hf_in).logits[0]
        prompt = ours.prepare(ids, pixels, None if grids is None else torch.from_numpy(grids))
        cache = ours.language_model.new_cache(1, prompt.length)
        logits = ours.prefill(prompt, cache, logits_for="all")[0]
    torch.testing.assert_close(logits, ref, atol=5e-5, rtol=1e-5)
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


@pytest.mark.parametrize("name", ["two images", "text only"])
def test_untied_head_and_other_deepstack_order(untied, processors, name):
    folder, hf, ours = untied
    assert ours.language_model.lm_head.weight.data_ptr() != ours.language_model.embed_tokens.weight.data_ptr()
    hf_in, ids, pixels, grids = _inputs(processors, name)
    with torch.no_grad():
        ref = hf(**hf_in).logits[0, -1]
        prompt = ours.prepare(ids, pixels, None if grids is None else torch.from_numpy(grids))
        logits = ours.prefill(prompt, ours.language_model.new_cache(1, prompt.length))[0]
    torch.testing.assert_close(logits, ref, atol=5e-5, rtol=1e-5)


def test_greedy_generation_equals_transformers_generate(tied, processors):
    _, hf, ours = tied
    eos = processors[1].tokenizer.eos_id
    for name in ("one image", "two turns", "text only"):
        hf_in, ids, pixels, grids = _inputs(processors, name, seed=5)
        with torch.no_grad():
            ref = hf.generate(**hf_in, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        ref_new = ref[0, len(ids):].tolist()
        got = greedy_generate(ours, ids, pixels, None if grids is None else torch.from_numpy(grids),
                              max_new_tokens=6, eos_ids=(eos,))
        assert got == ref_new, name


def test_tied_head_is_one_copy_and_weight_errors(tied, untied):
    _, hf, ours = tied
    lm = ours.language_model
    assert lm.lm_head.weight is lm.embed_tokens.weight
    state = hf.state_dict()
    fresh = Qwen3VLModel(ours.config)
    with pytest.raises(CheckpointError, match="lacks 1 tensor"):
        load_hf_state_dict(fresh, {k: v for k, v in state.items() if "blocks.1.attn.qkv.weight" not in k})
    with pytest.raises(CheckpointError, match="not part of Qwen3-VL"):
        load_hf_state_dict(fresh, {**state, "something.else": torch.zeros(1)})
    bad = dict(state)
    bad["model.language_model.norm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match="checkpoint shape"):
        load_hf_state_dict(fresh, bad)
    untied_state = {k: v for k, v in untied[1].state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match="untied lm_head"):
        load_hf_state_dict(Qwen3VLModel(untied[2].config), untied_state)


def test_int4_linears_plug_in(tied, processors):
    """Packed INT4 decoder linears compute what the dense model computes with their dequantized weights."""
    from int4_helpers import random_int4_layer

    from gracevlm.formats.awq import dequantize_awq

    _, hf, ours = tied
    model = Qwen3VLModel(ours.config).eval()
    model.load_state_dict(ours.state_dict())
    dense = Qwen3VLModel(ours.config).eval()
    dense.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(9)
    layer = model.language_model.layers[1]
    for parent, name in ((layer.self_attn, "q_proj"), (layer.mlp, "down_proj")):
        lin = getattr(parent, name)
        q = random_int4_layer(lin.in_features, lin.out_features, 32, False, True, gen)
        setattr(parent, name, q)
        w = dequantize_awq(q.qweight, q.qzeros, q.scales, 32).t().contiguous()
        getattr(dict(dense.named_modules())["language_model.layers.1." + ("self_attn" if name == "q_proj"
                                                                          else "mlp")], name).weight.data.copy_(w)
    _, ids, pixels, grids = _inputs(processors, "one image")
    with torch.no_grad():
        a = model.prefill(model.prepare(ids, pixels, torch.from_numpy(grids)),
                          model.language_model.new_cache(1, len(ids)))
        b = dense.prefill(dense.prepare(ids, pixels, torch.from_numpy(grids)),
                          dense.language_model.new_cache(1, len(ids)))
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_batched_decode_rows_carry_their_own_offsets(tied, processors):
    """Two prompts (different lengths and rope offsets) in two cache slots: a batched decode step gives each
    row the logits it gets alone; the cache-free forward equals the cached prefill."""
    ours = tied[2]
    prompts = []
    for name in ("two images", "text only"):
        _, ids, pixels, grids = _inputs(processors, name)
        prompts.append(ours.prepare(ids, pixels, None if grids is None else torch.from_numpy(grids)))
    assert prompts[0].delta < 0 and prompts[1].delta == 0
    tokens = torch.tensor([5, 9])
    lengths = torch.tensor([p.length for p in prompts])
    deltas = torch.tensor([p.delta for p in prompts])
    with torch.no_grad():
        cache = ours.language_model.new_cache(2, int(lengths.max()) + 1)
        for slot, p in enumerate(prompts):
            ours.prefill(p, cache, slot=slot)
        batched = ours.decode_step(tokens, lengths, deltas, cache)
        for row, p in enumerate(prompts):
            alone_cache = ours.language_model.new_cache(1, p.length + 1)
            ours.prefill(p, alone_cache)
            alone = ours.decode_step(tokens[row:row + 1], lengths[row:row + 1], p.delta, alone_cache)
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)
        p = prompts[0]
        cached = ours.prefill(p, ours.language_model.new_cache(1, p.length), logits_for="all")
        free = ours.language_model(p.embeds.unsqueeze(0), torch.arange(p.length).unsqueeze(0), None,
                                   logits_for="all", rope_positions=p.rope_positions.unsqueeze(1), visual=p.visual)
    torch.testing.assert_close(free, cached, atol=1e-5, rtol=1e-5)


def test_stop_ids_from_generation_config_and_answer_text(tied, processors):
    from gracevlm.models.qwen3_vl.tokenizer import answer_text, stop_token_ids

    folder, hf, ours = tied
    tok = processors[1].tokenizer
    stops = stop_token_ids(folder, tok)
    assert stops == [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]
    hf_in, ids, pixels, grids = _inputs(processors, "one image", seed=8)
    with torch.no_grad():
        ref = hf.generate(**hf_in, max_new_tokens=5, do_sample=False, eos_token_id=stops, pad_token_id=stops[1])
    got = greedy_generate(ours, ids, pixels, torch.from_numpy(grids), max_new_tokens=5, eos_ids=tuple(stops))
    assert got == ref[0, len(ids):].tolist()
    new = tok.encode(" Two cats.<|im_end|>")
    assert answer_text(tok, new) == processors[0].post_process_image_text_to_text([new])[0].strip() == "Two cats."
    (folder / "bad").mkdir(exist_ok=True)
    (folder / "bad" / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(CheckpointError, match="eos_token_id"):
        stop_token_ids(folder / "bad", tok)


def test_multi_frame_grid_attends_per_frame(tied):
    """A grid with t = 2 (two temporal patches): position table repeated per frame, attention per frame."""
    _, hf, ours = tied
    grid = torch.tensor([[2, 4, 6], [1, 2, 2]])
    pixels = torch.randn(2 * 4 * 6 + 4, ours.visual.patch_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grid)
        embeds, deepstack = ours.visual(pixels, grid)
    torch.testing.assert_close(embeds, ref.pooler_output, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(deepstack[1], ref.deepstack_features[1], atol=ATOL, rtol=1e-5)
    with pytest.raises(InputError, match="pixel_values must be"):
        ours.visual(pixels[:-1], grid)
    with pytest.raises(InputError, match="multiples of the merge size"):
        ours.visual(pixels[:15], torch.tensor([[1, 3, 5]]))


def test_weights_from_a_saved_transformers_folder(tied, processors, tmp_path):
    """``save_pretrained`` writes the on-disk key layout (tied head omitted); bf16 tensors are cast."""
    from safetensors.torch import load_file

    _, hf, ours = tied
    hf.save_pretrained(tmp_path, safe_serialization=True)
    state = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        state.update(load_file(f))
    assert any(k.startswith("model.visual.patch_embed.proj.") for k in state)
    assert any(k.startswith("model.language_model.layers.") for k in state)
    fresh = Qwen3VLModel(Qwen3VLConfig.from_file(tmp_path)).eval()
    load_hf_state_dict(fresh, state)
    _, ids, pixels, grids = _inputs(processors, "one image")
    with torch.no_grad():
        a = fresh.prefill(fresh.prepare(ids, pixels, torch.from_numpy(grids)),
                          fresh.language_model.new_cache(1, len(ids)))
        b = ours.prefill(ours.prepare(ids, pixels, torch.from_numpy(grids)), ours.language_model.new_cache(1, len(ids)))
    assert torch.equal(a, b)
    half = Qwen3VLModel(fresh.config)
    load_hf_state_dict(half.to(torch.bfloat16), {k: v.to(torch.bfloat16) for k, v in state.items()})
    assert half.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
