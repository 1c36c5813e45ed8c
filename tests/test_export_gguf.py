"""GGUF export: Q4_0 blocks equal the checkpoint's codes and scales, tokenizer metadata round-trips, and a numpy
llama.cpp-style forward pass over the file (adjacent-pair RoPE on the permuted rows) reproduces gracevlm's logits."""
import json

import numpy as np
import pytest

import torch
from PIL import Image

import gracevlm
from gracevlm.export import export_model
from gracevlm.export.chat_template import chat_template
from gracevlm.export.check import probe_image
from gracevlm.export.source import SourceModel
from gracevlm.formats.gguf_q4 import q4_0_from_codes, q4_0_to_codes, qk_row_permutation
from gracevlm.models.llava.gguf_names import llama_tensor_name

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def src(tiny_awq):
    return tiny_awq


@pytest.fixture(scope="module")
def exported(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "out"
    report = export_model(src, "gguf", out)
    return out, report


def reader(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def test_q4_0_blocks_are_the_codes_and_scales(src, exported):
    out, report = exported
    assert report.exact and report.files == ["README.md", "ggml-model-q4_0.gguf", "mmproj-model-f16.gguf",
                                            "gracevlm_export.json"]
    source = SourceModel(src)
    r, tensors = reader(out / "ggml-model-q4_0.gguf")
    heads = {"q_proj": 4, "k_proj": 4}
    for name in source.quantized:
        codes = source.linear(name)
        t = tensors[llama_tensor_name(name + ".weight")]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, name
        kind = name.rsplit(".", 1)[-1]
        perm = qk_row_permutation(codes.shape[0], heads[kind]) if kind in heads else torch.arange(codes.shape[0])
        u, d = q4_0_to_codes(np.asarray(t.data), codes.shape[1])
        assert torch.equal(u, codes.u[perm]), name
        assert torch.equal(d, codes.scales[perm].repeat_interleave(128 // 32, dim=1)), name
        # ggml's own dequantizer (gguf-py reference) gives exactly (u - 8) * s
        deq = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q4_0)
        assert np.array_equal(deq, codes.dequantize()[perm].numpy()), name
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # the vocabulary is trimmed to the 1000 tokenizer pieces (the source's 24 rows past them are never sampled)
    assert np.array_equal(np.asarray(tensors["output.weight"].data), source.tensor("lm_head.weight")[:1000].numpy())
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data),
                          source.tensor("model.embed_tokens.weight")[:1000].numpy())


def test_q4_0_packing_round_trips_any_codes():
    g = torch.Generator().manual_seed(3)
    u = torch.randint(0, 16, (8, 256), dtype=torch.uint8, generator=g)
    s = (torch.rand(8, 4, generator=g) * 0.01).half()
    raw = q4_0_from_codes(u, s, 64)
    back, d = q4_0_to_codes(raw, 256)
    assert torch.equal(back, u) and torch.equal(d, s.repeat_interleave(2, dim=1))
    assert raw.shape == (8, 256 // 32 * 18)
    # byte j of a block = u[j] | u[j + 16] << 4, after the fp16 scale
    assert raw[0, 2] == (int(u[0, 0]) | int(u[0, 16]) << 4)
    with pytest.raises(ValueError):
        q4_0_from_codes(u, s, 48)


def test_row_permutation_turns_half_rope_into_pair_rope():
    """llama.cpp rotates adjacent pairs (2j, 2j+1); HF LLaMA rotates halves (j, j + d/2). Rows permuted as the
    export does make the two agree, so the permutation is the RoPE layout change and nothing else."""
    n_head, hd, t = 3, 8, 5
    g = torch.Generator().manual_seed(0)
    q = torch.randn(t, n_head * hd, generator=g, dtype=torch.float64)
    pos = torch.arange(t, dtype=torch.float64).unsqueeze(1)
    theta = pos * 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # [t, hd/2]
    cos, sin = theta.cos(), theta.sin()
    x = q.view(t, n_head, hd)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    neox = torch.cat([x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]], -1)
    perm = qk_row_permutation(n_head * hd, n_head)
    y = q[:, perm].view(t, n_head, hd // 2, 2)
    a, b = y[..., 0], y[..., 1]
    pairs = torch.stack([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)
    assert torch.allclose(pairs.reshape(t, -1), neox.reshape(t, -1)[:, perm])


def _f(t):
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)


def gguf_llama_logits(path, ids):
    """A float32 numpy forward of a GGUF llama as llama.cpp defines it (no activation quantization)."""
    r, T = reader(path)
    meta = lambda k: r.fields[k].contents()  # noqa: E731
    n_layer, n_head = meta("llama.block_count"), meta("llama.attention.head_count")
    eps, base = meta("llama.attention.layer_norm_rms_epsilon"), meta("llama.rope.freq_base")
    x = _f(T["token_embd.weight"])[ids]
    hd = x.shape[1] // n_head
    pos = np.arange(len(ids))[:, None]
    theta = pos * base ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v):
        v = v.reshape(len(ids), n_head, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(len(ids), n_head, hd)

    mask = np.triu(np.full((len(ids), len(ids)), -np.inf), 1)
    for i in range(n_layer):
        w = lambda n: _f(T[f"blk.{i}.{n}.weight"])  # noqa: E731
        h = norm(x, w("attn_norm"))
        q, k = rope(h @ w("attn_q").T), rope(h @ w("attn_k").T)
        v = (h @ w("attn_v").T).reshape(len(ids), n_head, hd)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(len(ids), -1) @ w("attn_output").T
        h = norm(x, w("ffn_norm"))
        gate = h @ w("ffn_gate").T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    return norm(x, _f(T["output_norm.weight"])) @ _f(T["output.weight"]).T


def test_gguf_forward_reproduces_gracevlm_logits(src, exported):
    out, _ = exported
    vlm = gracevlm.load(src, device="cpu")
    ids = vlm.tokenizer.encode("USER: Hello there, how are you? ASSISTANT:")
    lm = vlm.model.language_model
    with torch.inference_mode():
        cache = vlm.model.new_cache(1, len(ids), torch.float32)
        ours = lm(lm.embed(torch.tensor([ids]), torch.float32), torch.arange(len(ids)).unsqueeze(0), cache,
                  logits_for="all")[0].numpy()
    theirs = gguf_llama_logits(out / "ggml-model-q4_0.gguf", ids)
    ours = ours[:, : theirs.shape[1]]  # gracevlm samples only the tokenizer's 1000 rows; the file has those
    assert theirs.shape[1] == vlm.tokenizer.vocab_size == 1000
    assert np.abs(theirs - ours).max() < 1e-4 * max(1.0, np.abs(ours).max())
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_tokenizer_and_chat_metadata_round_trip(src, exported):
    import sentencepiece as spm

    out, _ = exported
    r, _ = reader(out / "ggml-model-q4_0.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    n = sp.GetPieceSize()
    # one token per embedding row, every one a piece (no id without text)
    rows = reader(out / "ggml-model-q4_0.gguf")[1]["token_embd.weight"].shape
    assert len(tokens) == n == 1000 and tokens == [sp.IdToPiece(i) for i in range(n)] and 1000 in rows
    assert r.fields["llama.vocab_size"].contents() == 1000
    assert np.allclose(scores, [sp.GetScore(i) for i in range(n)])
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE and tokens[3] == "<0x00>"
    assert types[300] == gguf.TokenType.NORMAL
    meta = {k: r.fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
                                                 "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                                                 "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                                                 "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
                                                 "general.architecture", "llama.context_length",
                                                 "llama.rope.dimension_count", "general.file_type")}
    assert meta == {"tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1,
                    "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                    "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
                    "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": True,
                    "general.architecture": "llama", "llama.context_length": 2048,
                    "llama.rope.dimension_count": 32, "general.file_type": 2}
    assert r.fields["tokenizer.chat_template"].contents() == chat_template("vicuna_v1")


def test_mmproj_holds_the_tower_and_projector_as_llama_cpp_reads_them(src, exported):
    out, _ = exported
    source = SourceModel(src)
    r, T = reader(out / "mmproj-model-f16.gguf")
    meta = lambda k: r.fields[k].contents()  # noqa: E731
    assert meta("general.architecture") == "clip" and meta("clip.projector_type") == "mlp"
    assert meta("clip.has_vision_encoder") is True and meta("clip.use_gelu") is False
    assert (meta("clip.vision.image_size"), meta("clip.vision.patch_size"), meta("clip.vision.block_count"),
            meta("clip.vision.embedding_length"), meta("clip.vision.attention.head_count")) == (56, 14, 3, 128, 2)
    assert "clip.vision.feature_layer" not in r.fields  # default = block_count - 1 layers = LLaVA's layer -2
    assert np.allclose(meta("clip.vision.image_mean"), [0.48145466, 0.4578275, 0.40821073])
    assert not any(n.startswith("v.post_ln") for n in T)
    # no class embedding (see llama_cpp_llava_features); the position rows of the 16 patches only
    assert "v.class_embd" not in T
    pos = source.tensor("model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight")
    assert np.array_equal(np.asarray(T["v.position_embd.weight"].data, dtype=np.float32).reshape(16, 128),
                          pos[1:].float().numpy())
    vt = "model.vision_tower.vision_tower.vision_model."
    pairs = {"v.blk.1.ffn_up.weight": vt + "encoder.layers.1.mlp.fc1.weight",
             "v.blk.1.ffn_down.bias": vt + "encoder.layers.1.mlp.fc2.bias",
             "v.blk.2.attn_out.weight": vt + "encoder.layers.2.self_attn.out_proj.weight",
             "v.patch_embd.weight": vt + "embeddings.patch_embedding.weight",
             "v.pre_ln.weight": vt + "pre_layrnorm.weight",
             "mm.0.weight": "model.mm_projector.0.weight", "mm.2.bias": "model.mm_projector.2.bias"}
    for name, key in pairs.items():
        assert np.array_equal(np.asarray(T[name].data, dtype=np.float32).reshape(-1),
                              source.tensor(key).float().numpy().reshape(-1)), name
    assert len([n for n in T if n.startswith("v.blk.")]) == 3 * 16


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def llama_cpp_llava_features(T, meta, pixels):
    """llama.cpp's llava image graph (``tools/mtmd/models/llava.cpp`` and the ``PROJECTOR_TYPE_MLP`` inputs in
    ``clip.cpp``, read in llama-cpp-python 0.3.36's vendored llama.cpp) in float32 numpy: patch tokens in raster
    order, ``ggml_concat(patches, v.class_embd)`` when the file has a class embedding (CLS *last*), position
    rows ``0..n_pos-1`` added in that order, pre-LN, ``block_count - 1`` layers, then rows ``1..N`` (``patches[i]
    = i + 1`` when there is a class embedding, else ``i``) through ``mm.0`` -> ``ggml_gelu`` (tanh form) ->
    ``mm.2``."""
    d, p = meta("clip.vision.embedding_length"), meta("clip.vision.patch_size")
    heads, eps = meta("clip.vision.attention.head_count"), meta("clip.vision.attention.layer_norm_epsilon")
    g = pixels.shape[-1] // p
    w = lambda n: _f(T[n]) if not isinstance(T[n], np.ndarray) else T[n]  # noqa: E731
    patches = pixels.reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, -1)
    x = patches @ w("v.patch_embd.weight").reshape(d, -1).T
    offset = 0
    if "v.class_embd" in T:
        x, offset = np.concatenate([x, w("v.class_embd").reshape(1, d)]), 1
    x = x + w("v.position_embd.weight").reshape(-1, d)[: len(x)]
    x = _ln(x, w("v.pre_ln.weight"), w("v.pre_ln.bias"), eps)
    hd = d // heads
    for i in range(meta("clip.vision.block_count") - 1):
        b = lambda n: w(f"v.blk.{i}.{n}")  # noqa: E731
        h = _ln(x, b("ln1.weight"), b("ln1.bias"), eps)
        q, k, v = ((h @ b(f"attn_{n}.weight").T + b(f"attn_{n}.bias")).reshape(len(x), heads, hd) for n in "qkv")
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(len(x), d) @ b("attn_out.weight").T + b("attn_out.bias")
        h = _ln(x, b("ln2.weight"), b("ln2.bias"), eps) @ b("ffn_up.weight").T + b("ffn_up.bias")
        h = h / (1 + np.exp(-1.702 * h))  # clip.use_gelu false: quick_gelu
        x = x + h @ b("ffn_down.weight").T + b("ffn_down.bias")
    x = x[offset: offset + g * g]
    h = x @ w("mm.0.weight").T + w("mm.0.bias")
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return h @ w("mm.2.weight").T + w("mm.2.bias")


def test_llama_cpp_graph_reads_the_mmproj_in_llava_order(src, exported):
    """Through llama.cpp's llava graph, our mmproj gives gracevlm's image features but for the missing CLS
    token (relative L2 < 0.1); the layout llama.cpp's own converter writes (``v.class_embd`` + all 17 position
    rows) is read with CLS appended and patch 0 dropped, and is far off."""
    from gracevlm.models.llava.processing import preprocess_images

    out, _ = exported
    vlm = gracevlm.load(src, device="cpu")
    image = probe_image()
    pixels = preprocess_images([image], vlm.runtime.image_spec)
    ours = vlm.model.encode_images(pixels)[0].numpy()
    r, T = reader(out / "mmproj-model-f16.gguf")
    meta = lambda k: r.fields[k].contents()  # noqa: E731
    got = llama_cpp_llava_features(T, meta, pixels[0].numpy())
    rel = np.linalg.norm(got - ours) / np.linalg.norm(ours)
    assert got.shape == ours.shape == (16, 128) and rel < 0.1, rel
    # what llama.cpp's converter writes: the class embedding and all 17 position rows
    vt = "model.vision_tower.vision_tower.vision_model.embeddings."
    source = SourceModel(src)
    converted = {n: _f(t) for n, t in T.items()}
    converted["v.class_embd"] = source.tensor(vt + "class_embedding").float().numpy()
    converted["v.position_embd.weight"] = source.tensor(vt + "position_embedding.weight").float().numpy()
    converter_layout = llama_cpp_llava_features(converted, meta, pixels[0].numpy())
    assert np.linalg.norm(converter_layout - ours) / np.linalg.norm(ours) > 0.5
    # the best a class embedding can do: position rows permuted to llama.cpp's token order make every hidden
    # state LLaVA's, but the graph's output rows 1..N drop patch 0 and end with CLS - one slot early
    pos = converted["v.position_embd.weight"]
    converted["v.position_embd.weight"] = np.concatenate([pos[1:], pos[:1]])
    permuted = llama_cpp_llava_features(converted, meta, pixels[0].numpy())
    assert np.linalg.norm(permuted[:-1] - ours[1:]) / np.linalg.norm(ours[1:]) < 2e-3
    assert np.linalg.norm(permuted - ours) / np.linalg.norm(ours) > 0.5


def test_llama_cpp_runs_the_export(src, exported, tmp_path):
    """llama-cpp-python (when installed; a subprocess, see ``export.llama_cpp_probe``) loads both files. Text
    only: its tokenizer from our metadata gives gracevlm's ids and every greedy token agrees. With the probe
    image: >= 20 of 24 greedy tokens agree and, fed gracevlm's tokens, llama.cpp disagrees only where
    gracevlm's own margin is below llama.cpp's logit error at that step (Q8_0 activations, its own bicubic
    resize - the probe's features are ~0.7 off - and the patches attending to no CLS token; numbers printed).
    A square picture at the tower's size (no resize): llama.cpp's image embeddings are our numpy emulation of
    its graph over the file (< 2e-3) and gracevlm's features but for the missing CLS token (< 0.1)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; the files are checked above with "
                        "gguf-py and numpy forward passes of llama.cpp's graphs instead")
    from gracevlm.export.check import check_export

    out, _ = exported
    result = check_export(out, "llama_cpp", model=src)
    assert result.status == "ok", result.reason
    print("\n".join(result.lines()))
    text, image = result.cases
    assert text.tokenizer_agrees
    assert text.agree == len(text.reference) and text.forced_agree == len(text.forced_argmax)
    assert image.agree >= 20 and len(image.reference) == 24 and image.feature_error is not None
    for d in image.disagreements():
        assert d["gracevlm_margin"] < 2 * d["logit_error"], d
    import gracevlm.export.check as check
    from gracevlm.models.llava.processing import preprocess_images

    square = Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8))
    vlm = gracevlm.load(src, device="cpu")
    ref = check.gracevlm_references(vlm, None, 4, [("square", check.PROBE_QUERY, square)])
    (case,) = check.check_llama_cpp(out, ref, 4, embeddings_dir=tmp_path)
    r, T = reader(out / "mmproj-model-f16.gguf")
    pixels = preprocess_images([square], vlm.runtime.image_spec)[0].numpy()
    emulated = llama_cpp_llava_features(T, lambda k: r.fields[k].contents(), pixels)
    print(f"square picture: {case.line()}")
    embd = np.load(tmp_path / "square.npy")
    assert np.linalg.norm(embd - emulated) / np.linalg.norm(emulated) < 2e-3
    assert case.feature_error < 0.1


def test_gguf_report_and_cli(src, exported, tmp_path, capsys):
    import argparse

    from gracevlm.export.cli import register

    out, report = exported
    assert json.loads((out / "gracevlm_export.json").read_text())["exact"] is True
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--model", str(src), "--format", "gguf", "--out", str(tmp_path / "g"),
                              "--json"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["exact"] and printed["format"] == "gguf" and (tmp_path / "g" / "ggml-model-q4_0.gguf").is_file()
