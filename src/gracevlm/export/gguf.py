"""llama.cpp export: the LLaMA as a ``llama`` GGUF with Q4_0 LM linears written from the codes, and the
CLIP tower + projector as the ``clip`` "mmproj" GGUF that llama.cpp's LLaVA-1.5 support loads.

Files: ``ggml-model-q4_0.gguf`` (``ggml-model-f16.gguf`` for a dense source) and ``mmproj-model-f16.gguf``.
Run them with ``llama-mtmd-cli -m ggml-model-q4_0.gguf --mmproj mmproj-model-f16.gguf``.

LLM file: ``token_embd``/``output`` F16, norms F32, each quantized linear Q4_0 with ``d`` = the group's fp16
scale and nibbles = the codes (``formats.gguf_q4``); q/k rows permuted for llama.cpp's RoPE layout.
Tokenizer: SentencePiece pieces, scores and types, bos/eos/unk/pad ids, ``add_bos_token`` true,
``add_eos_token`` false, the normaliser's dummy-prefix / whitespace flags, and the chat template (the same
Jinja as the transformers export, without ``bos_token``: llama.cpp adds BOS itself). The embedding and the
head are trimmed to one row per piece: rows past the tokenizer have no text and gracevlm never samples or
reads them (``TokenStream`` samples ``logits[:tokenizer.vocab_size]``), so trimming is exact and llama.cpp
can no longer pick them.

mmproj file, checked against llama.cpp ``tools/mtmd`` (read in the copy llama-cpp-python 0.3.36 vendors,
llama.cpp @0c1e5709, and upstream @623ea2ba: ``clip.cpp`` ``load_hparams``/``load_tensors``/the
``PROJECTOR_TYPE_MLP`` inputs, ``clip-impl.h`` names, ``models/llava.cpp`` graph): ``clip.has_vision_encoder``,
``clip.projector_type = "mlp"`` (``clip.has_llava_projector`` too, for older readers), ``clip.vision.{image_size,
patch_size, embedding_length, feed_forward_length, projection_dim, block_count, attention.head_count,
attention.layer_norm_epsilon, image_mean, image_std}``, ``clip.use_gelu`` (false = quick_gelu); tensors
``v.patch_embd.weight``, ``v.position_embd.weight``, ``v.pre_ln.*``,
``v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,ln2,ffn_up,ffn_down}.*`` (fc1 = ffn_up, fc2 = ffn_down),
``mm.0.*``, ``mm.2.*``; no ``v.post_ln`` (the llava graph would apply it). The llava graph runs
``block_count - 1`` layers when no ``clip.vision.feature_layer`` is given, i.e. LLaVA's layer -2; other
select layers are written as ``feature_layer``. It pads images to a square with (122, 116, 104) before a
bicubic resize, LLaVA-1.5's preprocessing.

Token order (``models/llava.cpp`` and the ``PROJECTOR_TYPE_MLP`` inputs of ``clip_image_batch_encode``). The
graph builds ``[patch_0 .. patch_{N-1}]``, appends ``v.class_embd`` when the file has one (``ggml_concat``: CLS
*last*), adds position rows ``0..n_pos-1`` in that order and feeds rows ``patches[i] = i + 1`` (with a class
embedding; ``i`` without) to the projector. Attention is permutation-equivariant, so a class embedding plus the
position table permuted to that order (``[pos_1 .. pos_N, pos_0]``) does give every hidden state exactly as
LLaVA computes it - measured in llama.cpp: its image tokens 0..N-2 equal gracevlm's patch features 1..N-1 to
5e-4 - but the output rows still drop patch 0 and end with the CLS token, so every image token sits one slot
early (relative L2 1.14 against LLaVA's features; the selection is in code, no file can change it). Without
``v.class_embd`` (optional in ``load_tensors``) the graph takes all N patch tokens in order; we omit it and write
the patches' position rows only (LLaVA's rows ``1..N``): every image token is in LLaVA's slot with LLaVA's
position, and the one difference left is that the patches attend to no CLS token (tiny test model: relative
L2 0.040 in llama.cpp, which equals our numpy emulation of its graph to 4e-4). That is the closest layout:
on the tiny model's square test picture the permuted-CLS file has 3x the logit error (0.068 vs 0.024), on the
demo model 9/12 answers instead of 12/12. Pictures that need resizing differ further: llama.cpp resizes with
its own bicubic (not Pillow's antialiased filter, which LLaVA's processor and gracevlm use; the resize filter is
fixed per projector type, not read from the file): on the 64x40 noise probe the features are 0.70 off.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, FormatError
from ..formats.gguf_q4 import q4_0_from_codes, qk_row_permutation
from ..models.llava.gguf_names import clip_tensor_name, llama_tensor_name
from ..models.llava.processing import ImageSpec
from ..models.llava.chat import default_conv_mode
from .chat_template import chat_template
from .source import SourceModel

LLM_NAME_Q4 = "ggml-model-q4_0.gguf"
LLM_NAME_F16 = "ggml-model-f16.gguf"
MMPROJ_NAME = "mmproj-model-f16.gguf"


def _sp_piece_count(path: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path)).GetPieceSize()


def _sp_vocab(path: Path, rows: int):
    """(tokens, scores, types, add_dummy_prefix, remove_extra_whitespaces) padded to ``rows`` entries."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(path))
    n = sp.GetPieceSize()
    if n > rows:
        raise CheckpointError(f"the tokenizer has {n} pieces but the embedding only {rows} rows")
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.IsUnused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.IsByte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    for i in range(n, rows):
        tokens.append(f"[PAD{i}]".encode("utf-8"))
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    dummy, strip = True, False
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        dummy = proto.normalizer_spec.add_dummy_prefix
        strip = proto.normalizer_spec.remove_extra_whitespaces
    except Exception:  # noqa: BLE001 - protobuf missing or an old proto: keep LLaMA's values
        pass
    return tokens, scores, types, n, bool(dummy), bool(strip)


class _Plan:
    """Tensors announced up front (name, byte shape, dtype) and produced one at a time while writing."""

    def __init__(self):
        self.items: list[tuple[str, tuple, np.dtype, int, object, object]] = []

    def add(self, name, shape, dtype, raw_dtype, produce):
        import gguf

        if raw_dtype == gguf.GGMLQuantizationType.Q4_0:
            nbytes = shape[0] * shape[1]
        else:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.items.append((name, tuple(shape), np.dtype(dtype), nbytes, raw_dtype, produce))

    def write(self, path: Path, writer, progress: bool, desc: str) -> None:
        from tqdm import tqdm

        for name, shape, dtype, nbytes, raw, _ in self.items:
            writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, dtype, nbytes, raw, produce in tqdm(self.items, desc=desc, unit="tensor",
                                                             disable=not progress):
            arr = np.ascontiguousarray(produce())
            if arr.nbytes != nbytes or arr.dtype != dtype:
                raise FormatError(f"{name}: produced {arr.dtype} {arr.shape}, announced {dtype} {shape}")
            writer.write_tensor_data(arr)
        writer.close()


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).contiguous().numpy()


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).contiguous().numpy()


def write_gguf(src: SourceModel, out: Path, report, err, reasons: list[str], allow_lossy: bool,
               progress: bool = False) -> None:
    import gguf

    from . import LossyExportError

    cfg = src.config
    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    quantized = set(src.quantized)
    asym = set(src.asymmetric_layers())
    group = src.group_size
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    # -- decide, per quantized linear, whether Q4_0 holds it exactly --------------------------------
    lossy_layers: dict[str, str] = {}
    for name in src.quantized:
        in_f = src.linear_shape(name)[1]
        if name in asym:
            lossy_layers[name] = "asymmetric zero points (Q4_0 is symmetric: x = d * (u - 8))"
        elif group % 32:
            lossy_layers[name] = f"group size {group} is not a multiple of the 32-weight Q4_0 block"
        elif in_f % 32:
            lossy_layers[name] = f"in_features {in_f} is not a multiple of 32"
        elif src.format != "grace-qat" and src.store.meta(f"{name}.scales")[1] != "F16":
            scales = src.store.get(f"{name}.scales")
            if not torch.equal(scales.half().to(scales.dtype), scales):
                lossy_layers[name] = "scales not representable in fp16 (Q4_0 block scales are fp16)"
    if lossy_layers:
        kinds = sorted(set(lossy_layers.values()))
        reasons.append(f"{len(lossy_layers)} of {len(quantized)} layers cannot be Q4_0 exactly: " + "; ".join(kinds)
                       + " (with --allow-lossy they are requantized with ggml's Q4_0 rule, F16 if in_features "
                       "% 32 != 0)")
        if not allow_lossy:
            raise LossyExportError("cannot export exactly: " + reasons[-1])

    def permutation(name: str, rows: int):
        if name.endswith("self_attn.q_proj"):
            return qk_row_permutation(rows, n_head)
        if name.endswith("self_attn.k_proj"):
            return qk_row_permutation(rows, n_kv)
        return None

    def produce_q4(name: str):
        def run():
            codes = src.linear(name)
            perm = permutation(name, codes.u.shape[0])
            u, s = (codes.u, codes.scales) if perm is None else (codes.u[perm], codes.scales[perm])
            try:
                return q4_0_from_codes(u, s, codes.group_size)
            except FormatError as exc:  # scales not fp16-exact: only reachable for non-fp16 sources
                raise LossyExportError(f"{name}: {exc}") from exc
        return run

    def produce_lossy(name: str, as_q4: bool):
        def run():
            codes = src.linear(name)
            w = codes.dequantize()
            perm = permutation(name, w.shape[0])
            if perm is not None:
                w = w[perm]
            if as_q4:
                data = gguf.quants.quantize(w.numpy(), Q4_0)
                back = torch.from_numpy(gguf.quants.dequantize(data, Q4_0).reshape(w.shape))
            else:
                data = _f16(w)
                back = torch.from_numpy(data.astype(np.float32))
            err.add(back, w)
            return data
        return run

    # -- LLM ---------------------------------------------------------------------------------------
    plan = _Plan()
    lm_linears = set(src.lm_linears)
    src_rows = src.store.get_slice_shape("model.embed_tokens.weight")[0]
    rows = _sp_piece_count(src.tokenizer_file())  # embedding trimmed to the tokenizer (see module docstring)
    if rows > src_rows:
        raise CheckpointError(f"the tokenizer has {rows} pieces but the embedding only {src_rows} rows")
    vocab_keys = {"model.embed_tokens.weight", "lm_head.weight"}
    dense = src.dense_keys()
    keys = ["model.embed_tokens.weight"] + [k for k in dense if k.startswith("model.layers.")] + \
        ["model.norm.weight", "lm_head.weight" if "lm_head.weight" in dense else "model.embed_tokens.weight"]
    layer_keys: dict[int, list[tuple[str, str]]] = {}
    for name in src.quantized:
        layer_keys.setdefault(int(name.split(".")[2]), []).append((name, "q"))
    for key in keys:
        if key.startswith("model.layers."):
            layer_keys.setdefault(int(key.split(".")[2]), []).append((key, "d"))
    ordered = [("model.embed_tokens.weight", "d")]
    for i in sorted(layer_keys):
        ordered += sorted(layer_keys[i])
    ordered += [("model.norm.weight", "d"), (keys[-1], "head")]

    for key, kind in ordered:
        if kind == "q":
            out_f, in_f = src.linear_shape(key)
            gname = llama_tensor_name(f"{key}.weight")
            if key not in lossy_layers:
                plan.add(gname, (out_f, in_f // 32 * 18), np.uint8, Q4_0, produce_q4(key))
            elif in_f % 32 == 0:
                plan.add(gname, (out_f, in_f // 32 * 18), np.uint8, Q4_0, produce_lossy(key, True))
            else:
                plan.add(gname, (out_f, in_f), np.float16, None, produce_lossy(key, False))
            continue
        gname = "output.weight" if kind == "head" else llama_tensor_name(key)
        shape = src.store.get_slice_shape(key)
        if key in vocab_keys:
            plan.add(gname, (rows, shape[1]), np.float16, None, lambda key=key: _f16(src.tensor(key)[:rows]))
            continue
        module = key[: -len(".weight")] if key.endswith(".weight") else key
        if module in lm_linears:  # dense source: the linear goes out as F16 (exact for an fp16 checkpoint)
            perm = permutation(module, shape[0])
            plan.add(gname, shape, np.float16, None,
                     lambda key=key, perm=perm: _f16(src.tensor(key) if perm is None else src.tensor(key)[perm]))
        elif len(shape) == 1:
            plan.add(gname, shape, np.float32, None, lambda key=key: _f32(src.tensor(key)))
        else:
            plan.add(gname, shape, np.float16, None, lambda key=key: _f16(src.tensor(key)))

    exact_q4 = bool(quantized)
    llm_name = LLM_NAME_Q4 if exact_q4 else LLM_NAME_F16
    writer = gguf.GGUFWriter(path=None, arch="llama")
    writer.add_name(src.folder.name)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0 if exact_q4 else gguf.LlamaFileType.MOSTLY_F16))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(rows)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    tokens, scores, types, n_pieces, dummy, strip = _sp_vocab(src.tokenizer_file(), rows)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    from ..models.tokenizer import LlamaTokenizer

    ours = LlamaTokenizer.from_dir(src.folder)
    writer.add_unk_token_id(ours.unk_id)
    writer.add_pad_token_id(cfg.pad_token_id if cfg.pad_token_id is not None else ours.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(dummy)
    writer.add_remove_extra_whitespaces(strip)
    conv_mode = cfg.conv_mode or default_conv_mode(cfg.raw or {})
    writer.add_chat_template(chat_template(conv_mode))
    plan.write(out / llm_name, writer, progress, "gguf llm")

    # -- mmproj ------------------------------------------------------------------------------------
    vision_keys = src.vision_keys()
    proj_keys = [k for k in dense if k.startswith("model.mm_projector.")]
    if vision_keys and proj_keys:
        _write_mmproj(src, out / MMPROJ_NAME, vision_keys, proj_keys, progress)
        report.notes.append(f"run: llama-mtmd-cli -m {llm_name} --mmproj {MMPROJ_NAME}")
    else:
        report.notes.append("no vision tower/projector: only the language model was written")
    report.notes.append(f"tokenizer: {n_pieces} SentencePiece pieces, one per embedding row (rows {src_rows} -> "
                        f"{rows}: the rows past the tokenizer, which gracevlm never samples, are dropped); "
                        f"chat template gracevlm {conv_mode!r}")
    report.notes.append("q_proj/k_proj rows permuted per head (llama.cpp RoPE layout); codes and scales "
                        "unchanged otherwise")


def _write_mmproj(src: SourceModel, path: Path, vision_keys, proj_keys, progress: bool) -> None:
    import gguf

    cfg = src.config
    vision = src.vision_config()
    if cfg.mm_vision_select_feature != "patch":
        raise CheckpointError(f"mm_vision_select_feature {cfg.mm_vision_select_feature!r}: llama.cpp's llava "
                              "projector always drops the CLS token ('patch')")
    if cfg.mm_projector_type != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {cfg.mm_projector_type!r}: only mlp2x_gelu maps to "
                              "llama.cpp's 'mlp' projector")
    spec = ImageSpec.from_llava_config(cfg.raw or {"image_aspect_ratio": cfg.image_aspect_ratio},
                                       size=vision["image_size"])
    n_layers = vision["num_hidden_layers"]
    writer = gguf.GGUFWriter(path=None, arch="clip")
    writer.add_name(f"{src.folder.name} mmproj")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", vision["image_size"])
    writer.add_uint32("clip.vision.patch_size", vision["patch_size"])
    writer.add_uint32("clip.vision.embedding_length", vision["hidden_size"])
    writer.add_uint32("clip.vision.feed_forward_length", vision["intermediate_size"])
    writer.add_uint32("clip.vision.projection_dim", cfg.hidden_size)
    writer.add_uint32("clip.vision.block_count", n_layers)
    writer.add_uint32("clip.vision.attention.head_count", vision["num_attention_heads"])
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(vision.get("layer_norm_eps", 1e-5)))
    writer.add_array("clip.vision.image_mean", [float(m) for m in spec.mean])
    writer.add_array("clip.vision.image_std", [float(s) for s in spec.std])
    writer.add_bool("clip.use_gelu", vision.get("hidden_act", "quick_gelu") == "gelu")
    feature = n_layers + 1 + cfg.mm_vision_select_layer if cfg.mm_vision_select_layer < 0 \
        else cfg.mm_vision_select_layer
    if not 0 < feature <= n_layers:
        raise CheckpointError(f"mm_vision_select_layer {cfg.mm_vision_select_layer} is outside the tower's "
                              f"{n_layers} layers")
    if feature != n_layers - 1:
        writer.add_array("clip.vision.feature_layer", [int(feature)])
    plan = _Plan()
    for key in sorted(vision_keys) + sorted(proj_keys):
        name = clip_tensor_name(key)
        if name is None or name == "v.class_embd":  # no CLS token: see "Token order" in the module docstring
            continue
        shape = src.vision.get_slice_shape(key) if key in vision_keys else src.store.get_slice_shape(key)
        if name == "v.position_embd.weight":  # the patch rows only (row 0 is the CLS token's position)
            plan.add(name, (shape[0] - 1, shape[1]), np.float16, None, lambda key=key: _f16(src.tensor(key)[1:]))
            continue
        if key.endswith(".weight") and len(shape) >= 2:
            plan.add(name, shape, np.float16, None, lambda key=key: _f16(src.tensor(key)))
        else:
            plan.add(name, shape, np.float32, None, lambda key=key: _f32(src.tensor(key)))
    plan.write(path, writer, progress, "gguf mmproj")
