"""GGUF export: Q4_0 blocks equal the checkpoint's codes and scales, tokenizer metadata round-trips, and a numpy
llama.cpp-style forward pass over the file (adjacent-pair RoPE on the permuted rows) reproduces gracevlm's logits."""
import json

import numpy as np
import pytest

import torch

import gracevlm
from gracevlm.engine.generate import Generation
from gracevlm.export import export_model
from gracevlm.export.chat_template import chat_template
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
    assert report.exact and report.files[:2] == ["ggml-model-q4_0.gguf", "mmproj-model-f16.gguf"]
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
    assert np.array_equal(np.asarray(tensors["output.weight"].data), source.tensor("lm_head.weight").numpy())


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
    assert len(tokens) == 1024 and tokens[:n] == [sp.IdToPiece(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 1024)]
    assert np.allclose(scores[:n], [sp.GetScore(i) for i in range(n)])
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE and tokens[3] == "<0x00>" and types[n] == gguf.TokenType.UNUSED
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
    vt = "model.vision_tower.vision_tower.vision_model."
    pairs = {"v.blk.1.ffn_up.weight": vt + "encoder.layers.1.mlp.fc1.weight",
             "v.blk.1.ffn_down.bias": vt + "encoder.layers.1.mlp.fc2.bias",
             "v.blk.2.attn_out.weight": vt + "encoder.layers.2.self_attn.out_proj.weight",
             "v.patch_embd.weight": vt + "embeddings.patch_embedding.weight",
             "v.class_embd": vt + "embeddings.class_embedding", "v.pre_ln.weight": vt + "pre_layrnorm.weight",
             "mm.0.weight": "model.mm_projector.0.weight", "mm.2.bias": "model.mm_projector.2.bias"}
    for name, key in pairs.items():
        assert np.array_equal(np.asarray(T[name].data, dtype=np.float32).reshape(-1),
                              source.tensor(key).float().numpy().reshape(-1)), name
    assert len([n for n in T if n.startswith("v.blk.")]) == 3 * 16


LLAMA_CPP_SCRIPT = r"""
import ctypes, json, sys
import numpy as np
import llama_cpp
import llama_cpp.llama as L
import llama_cpp.mtmd_cpp as M

default_params = llama_cpp.llama_model_default_params
def params():  # no AMX/repacked weight buffers: some sandboxes trap AMX tiles (illegal instruction)
    p = default_params(); p.use_extra_bufts = False; return p
L.llama_cpp.llama_model_default_params = params
model, mmproj, before, after, image, n_new = sys.argv[1:7]
before, after, n_new = json.loads(before), json.loads(after), int(n_new)
llm = llama_cpp.Llama(model_path=model, n_ctx=512, verbose=False, n_threads=1, logits_all=True)
n_image = 0
if mmproj:
    p = M.mtmd_context_params_default(); p.use_gpu = False; p.n_threads = 1; p.print_timings = False
    ctx = M.mtmd_init_from_file(mmproj.encode(), llm.model, p)
    data = open(image, "rb").read()
    bmp = M.mtmd_helper_bitmap_init_from_buf(ctx, (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data)),
                                             len(data), False)
    text = M.mtmd_input_text(); marker = M.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
    chunks = M.mtmd_input_chunks_init()
    assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * 1)(bmp), 1) == 0
llm.reset()
llm.eval(before)
if mmproj:
    for i in range(M.mtmd_input_chunks_size(chunks)):
        ch = M.mtmd_input_chunks_get(chunks, i)
        if M.mtmd_input_chunk_get_type(ch) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            n_image = M.mtmd_input_chunk_get_n_tokens(ch)
            past = llama_cpp.llama_pos(0)
            assert M.mtmd_helper_eval_chunk_single(ctx, llm._ctx.ctx, ch, llama_cpp.llama_pos(llm.n_tokens),
                                                   llama_cpp.llama_seq_id(0), llm.n_batch, False,
                                                   ctypes.byref(past)) == 0
            llm.n_tokens = past.value
llm.eval(after)
out = []
for _ in range(n_new):
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    if tok == llm.token_eos():
        break
    out.append(tok)
    llm.eval([tok])
print(json.dumps({"tokens": out, "n_image_tokens": n_image,
                  "tokenize": llm.tokenize(b"USER: Hello there, how are you? ASSISTANT:", add_bos=True)}))
"""


def test_llama_cpp_runs_the_export(src, exported, tmp_path):
    """llama-cpp-python (when installed) loads both files and greedy-decodes like gracevlm. ggml quantizes
    activations to Q8_0 and resamples images with its own bicubic, so on this random tiny model only a prefix of
    the tokens is expected to agree (8 of 8 text-only, 7 and 5 of 8 with images in the run that set these
    bounds). Run in a subprocess: a crash in native code must not take pytest down."""
    import subprocess
    import sys

    from PIL import Image

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; the files are checked above with "
                        "gguf-py and a numpy forward pass instead")
    script = tmp_path / "run_llama_cpp.py"
    script.write_text(LLAMA_CPP_SCRIPT)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(image)
    vlm = gracevlm.load(src, device="cpu")

    def run(before, after, with_image):
        p = subprocess.run([sys.executable, str(script), str(out / "ggml-model-q4_0.gguf"),
                            str(out / "mmproj-model-f16.gguf") if with_image else "", json.dumps(before),
                            json.dumps(after), str(image), "8"], capture_output=True, text=True, timeout=120)
        if p.returncode < 0:
            pytest.skip(f"llama.cpp died with signal {-p.returncode} in this environment")
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    out, _ = exported
    prompt = "USER: Hello there, how are you? ASSISTANT:"
    ids = vlm.tokenizer.encode(prompt)
    text_ref = Generation("", [], [], "length")
    for _ in vlm.generate_raw(prompt, result=text_ref, max_new_tokens=8):
        pass
    got = run(ids, [], False)
    assert got["tokenize"] == ids  # llama.cpp's SPM tokenizer from our metadata = gracevlm's tokenizer
    assert got["tokens"][:4] == text_ref.token_ids[:4]
    ref = vlm.generate("What is shown in this image?", images=[image], max_new_tokens=8)
    k = ref.prompt_token_ids.index(-200)
    got = run(ref.prompt_token_ids[:k], ref.prompt_token_ids[k + 1:], True)
    assert got["n_image_tokens"] == 16
    assert got["tokens"][:3] == ref.token_ids[:3]


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
