"""Writers for the transformers layouts: dense ``llava-hf`` and W4A16 ``compressed-tensors``.

Both produce a folder that ``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor`` load:
classic llava-hf tensor names (``models.llava.weights``), config.json, generation_config.json, tokenizer
(tokenizer.model + tokenizer.json with ``<image>`` added), processor and chat template.

Image token and vocabulary. LLaVA-1.5 has no ``<image>`` token (the original code splices features at a
-200 marker); transformers embeds ``input_ids`` before scattering image features, so the image token id must
be a row of the embedding. We add ``<image>`` as a special token right after the SentencePiece pieces (id =
number of pieces, 32000 for LLaVA-1.5 - as llava-hf does). ``embed_tokens`` and ``lm_head`` get exactly one
row per tokenizer entry: the pieces' rows unchanged, a zero row for ``<image>``, and any source rows past the
tokenizer dropped (they have no text; gracevlm samples ``logits[:tokenizer.vocab_size]`` and never reads
them, so dropping them is exact) - no peer can sample or report an id without text. ``<image>`` is in
generation_config's ``suppress_tokens`` (transformers never samples it); vLLM/SGLang do not read that, but its
logit is exactly 0, so it could only win against a model whose every real logit is negative.

BOS. gracevlm's prompt ids start with one BOS. vLLM's and SGLang's OpenAI chat render the chat template and
tokenize the text *without* special tokens, and so does transformers' ``tokenizer.apply_chat_template(...,
tokenize=True)``; the processor's two-step form (``apply_chat_template`` to text, then ``processor(text=...)``)
tokenizes *with* them. So the template writes the BOS text itself and the tokenizer does not add one
(``add_bos_token`` false, tokenizer.json's post-processor without BOS): every chat path gives BOS once and
text that bypasses the template needs a leading ``<s>`` (the model card says so).

Preprocessing. ``preprocessor_config.json`` is a ``LlavaImageProcessor`` with ``do_pad=True`` (pad to a
square with the CLIP mean colour, resize the short side to 336 bicubic, centre crop, normalise), which
in transformers 5.23 with the PIL backend reproduces ``gracevlm.models.llava.processing`` bit for bit (checked
by the tests). The torchvision backend (the default when torchvision is installed) may differ slightly;
load with ``AutoProcessor.from_pretrained(dir, backend="pil")`` for exact parity.

Weights. llava-hf: each LM linear is ``W = (u - z) * s`` computed exactly in float32, then cast once to
``dtype``: fp16 rounds to nearest even (relative error <= 2^-11, the same value the AWQ fp16 kernels
compute), float32 is exact; the report gives the max/mean rounding. compressed-tensors: the codes are
repacked (``weight_packed`` = sequential nibbles of ``u``), scales copied (must be exact in ``dtype``),
asymmetric zero points go to ``weight_zero_point``; the tower, projector, embeddings and lm_head stay
dense. A dense source (plain fp16 checkpoint) has no codes: compressed-tensors export then needs
``allow_lossy`` and quantizes round-to-nearest W4G128. Note that compressed-tensors (0.20) decompresses
``(q - zp) * s`` in the scale's dtype: with fp16 scales transformers' dense weight is fp16((u - z) * s), the
same single rounding as the AWQ fp16 kernels (Marlin in vLLM keeps the exact codes and scales);
``dtype="float32"`` writes fp32 scales and the decompressed weight is exact.

What vLLM and SGLang read (they cannot run here; checked by reading their loaders through the code index,
and mirrored by ``tests/test_export_hf.py::test_names_and_shapes_follow_the_vllm_and_sglang_loaders``):

* vLLM ``vllm/model_executor/models/llava.py`` (read @0004c540; newer versions add an ``hf_to_vllm_mapper``
  from the transformers-5 names to the same tree): ``LlavaForConditionalGeneration`` has ``vision_tower``
  (CLIP built only up to the feature layer, ``require_post_norm=False``: post_layernorm and later layers
  are skipped), ``multi_modal_projector.linear_{1,2}`` and ``language_model`` (``LlamaForCausalLM``:
  ``language_model.model.*``, ``language_model.lm_head``); weights go through ``AutoWeightsLoader`` by
  name; ``image_token_index``, ``vision_feature_layer``, ``vision_feature_select_strategy``,
  ``projector_hidden_act``, ``multimodal_projector_bias`` come from config.json; the prompt's
  ``<image>`` is expanded to ``image_token_index`` ids via the HF ``LlavaProcessor``.
* vLLM ``.../quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py`` (@02637af7 and later
  revisions): ``weight_packed`` int32 ``[O, I/8]`` (packed_dim 1), ``weight_scale`` ``[O, I/g]`` in the
  model dtype, ``weight_shape`` int64 ``[2]``, ``weight_zero_point`` int32 ``[O/8, I/g]`` (packed_dim 0)
  only when ``symmetric`` is false, ``weight_g_idx`` only with ``actorder``; the config's groups are parsed
  with compressed-tensors' ``QuantizationArgs`` (our config validates with that model), targets match
  ``LinearBase`` as ``Linear``, and ``ignore`` goes through compressed-tensors' ``match_name`` (plain entry =
  equality, ``re:`` = ``re.match``), hence the regex ignores (see ``models.llava.weights.CT_IGNORE``).
* SGLang ``python/sglang/srt/models/llava.py`` (@00adcbe5 and a later revision with
  ``LlavaForConditionalGeneration``): ``load_weights`` strips a leading ``language_model.`` /
  ``vision_tower.`` and hands the rest to its ``LlamaForCausalLM`` / ``CLIPVisionModel`` loaders, every other
  name (the projector) must equal a parameter name - so the classic names are required; it reads
  ``torch_dtype``, ``image_aspect_ratio`` (``anyres`` when absent - we write ``pad``),
  ``mm_patch_merge_type``, ``image_token_index``, ``vision_feature_layer`` and
  ``vision_feature_select_strategy`` from config.json, and uses ``quantization_config`` via the same
  compressed-tensors scheme as vLLM.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..formats.checkpoint import ShardWriter, write_json_atomic
from ..formats.compressed_tensors import codes_to_ct, ct_quantization_config
from ..models.llava.weights import CT_IGNORE, llava_hf_config, original_to_hf
from ..formats.rtn import rtn_quantize
from ..models.llava.processing import ImageSpec
from ..models.llava.chat import default_conv_mode
from .chat_template import chat_template
from .source import LinearCodes, SourceModel

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
IMAGE_TOKEN = "<image>"


def vocab_layout(n_pieces: int, rows: int) -> tuple[int, int]:
    """(image token id, embedding rows written): one row per SentencePiece piece plus ``<image>``, whatever
    the source has (``rows``): rows past the tokenizer have no text and gracevlm never samples or reads them,
    so dropping them is exact."""
    return n_pieces, n_pieces + 1


def vocab_rows(weight: torch.Tensor, image_id: int) -> torch.Tensor:
    """The first ``image_id`` rows (one per piece) and a zero row for ``<image>`` (as input its row is
    replaced by image features; as output its logit is exactly 0, and it is in ``suppress_tokens``)."""
    keep = weight[:image_id]
    if keep.shape[0] < image_id:  # fewer rows than pieces: the missing pieces get zero rows (never sampled)
        keep = torch.cat([keep, keep.new_zeros(image_id - keep.shape[0], keep.shape[1])])
    return torch.cat([keep, keep.new_zeros(1, keep.shape[1])])


def _sp_pieces(path: Path) -> int:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(path))
    return sp.GetPieceSize()


def write_tokenizer_and_processor(src: SourceModel, out: Path, image_id: int, vision: dict,
                                  conv_mode: str) -> None:
    """tokenizer (+``<image>``), LlavaImageProcessor (pad to square), LlavaProcessor and chat template."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer as HFLlamaTokenizer

    staging = out / ".tokenizer-src"
    staging.mkdir()
    for name in TOKENIZER_FILES:
        if (src.folder / name).is_file():
            shutil.copy2(src.folder / name, staging / name)
    tok = HFLlamaTokenizer.from_pretrained(str(staging), add_bos_token=False)  # BOS comes from the template
    shutil.rmtree(staging)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    got = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if got != image_id:
        raise CheckpointError(f"the tokenizer gives {IMAGE_TOKEN} id {got}, expected {image_id} (the first id "
                              "after the SentencePiece pieces); the source tokenizer has unexpected added tokens")
    template = chat_template(conv_mode, bos=tok.bos_token)
    # tokenizer.json from transformers (the fast tokenizer all readers prefer); the other files are written
    # by hand in the layout of llava-hf/llava-1.5-7b-hf, which transformers 4.x (vLLM, SGLang) and 5.x read
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    shutil.copy2(src.tokenizer_file(), out / "tokenizer.model")
    tok_cfg = {}
    if (src.folder / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((src.folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("added_tokens_decoder", "chat_template", "extra_special_tokens", "auto_map"):
        tok_cfg.pop(key, None)
    decoder = {}
    for token_id, added in sorted(tok.added_tokens_decoder.items()):
        decoder[str(token_id)] = {"content": added.content, "lstrip": added.lstrip, "normalized": added.normalized,
                                  "rstrip": added.rstrip, "single_word": added.single_word, "special": added.special}
    tok_cfg.update({"added_tokens_decoder": decoder, "tokenizer_class": "LlamaTokenizer",
                    "processor_class": "LlavaProcessor", "add_bos_token": False, "add_eos_token": False,
                    "legacy": tok_cfg.get("legacy", True), "chat_template": template,
                    "model_max_length": src.config.tokenizer_model_max_length})
    tok_cfg.setdefault("pad_token", "<unk>")
    write_json_atomic(out / "tokenizer_config.json", tok_cfg)
    specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token,
                "pad_token": tok_cfg["pad_token"] if isinstance(tok_cfg["pad_token"], str) else tok.unk_token}
    write_json_atomic(out / "special_tokens_map.json", specials)
    spec = ImageSpec.from_llava_config(src.config.raw or {"image_aspect_ratio": src.config.image_aspect_ratio},
                                       size=vision["image_size"])
    side = spec.output_size
    write_json_atomic(out / "preprocessor_config.json", {
        "image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor",
        "do_pad": spec.aspect == "pad", "do_resize": True, "size": {"shortest_edge": spec.size},
        "resample": int(spec.resample), "do_center_crop": True, "crop_size": {"height": side, "width": side},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(spec.mean),
        "image_std": list(spec.std), "do_convert_rgb": True})
    write_json_atomic(out / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": vision["patch_size"],
        "vision_feature_select_strategy": "default" if src.config.mm_vision_select_feature == "patch" else "full",
        "num_additional_image_tokens": 1})
    write_json_atomic(out / "chat_template.json", {"chat_template": template})
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")  # for vLLM's --chat-template


def _dense_to_codes(name: str, weight: torch.Tensor, group: int) -> LinearCodes:
    from ..formats.awq import unpack_awq

    packed = rtn_quantize(weight, group)
    codes, _ = unpack_awq(packed.qweight, packed.qzeros)
    return LinearCodes(name, codes.t().contiguous(), None, packed.scales.t().contiguous(), group)


def write_llava_hf(src: SourceModel, out: Path, report, err, reasons: list[str], allow_lossy: bool,
                   compressed: bool, dtype: str, progress: bool = False) -> None:
    from tqdm import tqdm

    from . import LossyExportError, WeightError

    cfg = src.config
    tdtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
    vision = src.vision_config()
    image_id, rows = vocab_layout(_sp_pieces(src.tokenizer_file()), cfg.vocab_size)
    lm_linears = set(src.lm_linears)
    dense_linears = [k[: -len(".weight")] for k in src.dense_keys()
                     if k.endswith(".weight") and k[: -len(".weight")] in lm_linears]
    if compressed and dense_linears:
        reasons.append(f"{src.folder} holds dense LM weights ({len(dense_linears)} linears, format "
                       f"{src.format!r}); compressed-tensors needs integer codes, so they would be quantized "
                       "round-to-nearest W4G128")
        if not allow_lossy:
            raise LossyExportError("cannot export exactly: " + reasons[-1] + ". Pass --allow-lossy to quantize")
    quantized = set(src.quantized)
    symmetric = src.symmetric  # one scheme for all layers: asymmetric -> every layer gets weight_zero_point
    rounding = WeightError()
    inexact_scales = 0
    writer = ShardWriter(out, max_shard_bytes=4 * 1024**3)
    names = [*src.quantized, *dense_linears] if compressed else src.quantized
    for name in tqdm(names, desc=f"export {'compressed-tensors' if compressed else 'llava-hf'}", unit="layer",
                     disable=not progress):
        hf = original_to_hf(name)
        if name in quantized:
            codes = src.linear(name)
        else:  # compressed export of a dense source (allow_lossy): RTN codes, error against the source weight
            weight = src.dense_linear_weight(name)
            codes = _dense_to_codes(name, weight, 128)
            err.add(codes.dequantize(), weight.float())
        if compressed:
            scales = codes.scales.to(tdtype)
            if not torch.equal(scales.to(codes.scales.dtype), codes.scales):  # e.g. bf16 scales below fp16 range
                inexact_scales += 1
                err.add(LinearCodes(name, codes.u, codes.zeros, scales, codes.group_size).dequantize(),
                        codes.dequantize())
            zeros = codes.zeros
            if zeros is None and not symmetric:
                zeros = torch.full(codes.scales.shape, 8, dtype=torch.uint8)
            ct = codes_to_ct(codes.u, zeros, scales)
            writer.add(f"{hf}.weight_packed", ct.weight_packed)
            writer.add(f"{hf}.weight_scale", ct.weight_scale)
            writer.add(f"{hf}.weight_shape", ct.weight_shape)
            if ct.weight_zero_point is not None:
                writer.add(f"{hf}.weight_zero_point", ct.weight_zero_point)
        else:
            exact = codes.dequantize()
            written = exact.to(tdtype)
            rounding.add(written, exact)
            writer.add(f"{hf}.weight", written)
    if inexact_scales:
        reasons.append(f"the scales of {inexact_scales} layers are not representable in {dtype}")
    dense_cast = WeightError()
    skip = {f"{n}.weight" for n in dense_linears} if compressed else set()
    keys = [k for k in src.dense_keys() if k not in skip] + src.vision_keys()
    have_head = "lm_head.weight" in keys
    for key in keys:
        t = src.tensor(key)
        written = t.to(tdtype)
        if t.dtype != tdtype:
            dense_cast.add(written, t)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            written = vocab_rows(written, image_id)
        writer.add(original_to_hf(key), written)
        if key == "model.embed_tokens.weight" and not have_head:  # tied embeddings: write the head explicitly
            writer.add("language_model.lm_head.weight", written)
    writer.close()
    if dense_cast.max_abs:
        report.notes.append(f"dense tensors cast to {dtype} changed by up to {dense_cast.max_abs:.3g}")
    if not compressed:
        report.rounding = {"dtype": dtype, "rule": "W = (u - z) * s exact in float32, then one cast to "
                           f"{dtype} (round to nearest even)", "max_abs": rounding.max_abs,
                           "mean_abs": rounding.mean_abs}
    qc = None
    if compressed:
        qc = ct_quantization_config(src.group_size if src.quantized else 128, CT_IGNORE, symmetric)
        if not symmetric:
            report.notes.append("asymmetric zero points written as weight_zero_point (symmetric: false)")
    conv_mode = cfg.conv_mode or default_conv_mode(cfg.raw or {})
    write_json_atomic(out / "config.json", llava_hf_config(cfg, vision, rows, image_id, dtype, qc))
    n_pieces = image_id
    write_json_atomic(out / "generation_config.json", {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "do_sample": False, "suppress_tokens": list(range(n_pieces, rows))})
    write_tokenizer_and_processor(src, out, image_id, vision, conv_mode)
    report.notes.append(f"<image> = token {image_id} (zero row); embedding rows {cfg.vocab_size} -> {rows}: one per "
                        f"tokenizer entry (rows past the tokenizer dropped, gracevlm never samples them); id "
                        f"{image_id} is in generation_config.suppress_tokens")
    report.notes.append("BOS: written by the chat template; the tokenizer does not add it (add_bos_token false), "
                        "so text tokenized without the template needs a leading <s>")
    report.notes.append(f"chat template: gracevlm {conv_mode!r}")
