"""The Qwen3-VL half of ``gracevlm export``: a transformers ``Qwen3VLForConditionalGeneration`` folder with dense
weights (``qwen3-vl-hf``) or with the integer codes repacked as compressed-tensors ``pack-quantized``
(``compressed-tensors``: W4A16 from W4 QAT / GRACE AWQ / a W4A16 export, W8A16 from W8 QAT / a W8A16 export).

Both folders hold what a transformers save of the model holds: config.json (the source's, without GRACE's ``qat`` /
``awq_packing`` blocks, dtype set; compressed-tensors adds its ``quantization_config``), generation_config.json
(the source's; the embedding rows past the tokenizer - padding, never sampled by gracevlm - are added to
``suppress_tokens``), the tokenizer and processor files copied, ``chat_template.jinja`` and the weights under
transformers' key names (``model.visual.*``, ``model.language_model.*``, ``lm_head.weight`` only when untied: a
tied head stays the one embedding tensor).

Weights. Dense tensors that are not quantized are cast to ``dtype`` (bf16 sources to bf16 or fp32: exact). A
quantized linear is dequantized exactly in float32 - W4: ``(u - z) * s`` with the AWQ fp16 scales (gracevlm's exact
reference INT4 path), W8: ``q * s`` with ``s = exp(float32(log_scale))`` - then cast once to ``dtype``: float32 keeps it
exact; bf16 (the default, as the releases) rounds it to nearest even (for a W8 QAT source this is the baked
``W_q`` exactly; the report gives the max/mean rounding). compressed-tensors keeps the codes: ``weight_packed``
holds ``q + 2^(bits-1)`` as sequential nibbles (W4) or bytes (W8) along the input dim (``formats.compressed_tensors``,
``formats.w8``), ``weight_scale`` the scales in the dtype they are stored in (fp16 for W4, fp32 for W8), so the
file is exact whatever ``dtype``; a peer that runs in bf16 rounds them when it loads (transformers and vLLM create
``weight_scale`` in the model dtype).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import CheckpointError, InputError
from ...formats.awq import dequantize_awq, unpack_awq
from ...formats.checkpoint import ShardWriter, is_ignored_key, write_json_atomic
from ...formats.compressed_tensors import codes_to_ct, ct_quantization_config
from ...formats.w8 import to_compressed_tensors_w8
from ..checkpoint import OpenedCheckpoint
from ..registry import ExportFacts
from .chat import load_chat_template
from .tokenizer import QwenTokenizer
from .weights import hf_to_ours, ours_to_hf

FORMATS = ("qwen3-vl-hf", "compressed-tensors")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# compressed-tensors ``ignore`` (``match_name``: plain = equality, ``re:`` = re.match): the vision tower and its
# mergers are ``model.visual.*`` in transformers and ``visual.*`` in vLLM; the head ``lm_head`` /
# ``language_model.lm_head``. The decoder linears match ``targets: ["Linear"]``.
CT_IGNORE = ("lm_head", "re:.*lm_head", "re:.*visual.*")
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "preprocessor_config.json", "processor_config.json",
                "video_preprocessor_config.json", "chat_template.json")
GRACE_CONFIG_KEYS = ("qat", "awq_packing", "quantization_config")
QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "weight", "log_scale", "bias", "weight_packed", "weight_scale",
                      "weight_shape", "weight_zero_point")


@dataclass
class _Error:
    max_abs: float = 0.0
    total: float = 0.0
    count: int = 0

    def add(self, written: torch.Tensor, exact: torch.Tensor) -> None:
        d = (written.double() - exact.double()).abs()
        if d.numel():
            self.max_abs, self.total, self.count = max(self.max_abs, float(d.max())), self.total + float(d.sum()), \
                self.count + d.numel()

    @property
    def mean_abs(self) -> float:
        return self.total / self.count if self.count else 0.0


def check_export_request(opened: OpenedCheckpoint, fmt: str, dtype: str) -> None:
    """One-line InputErrors for a request this family cannot write."""
    if fmt not in FORMATS:
        raise InputError(f"{opened.folder} is a Qwen3-VL checkpoint; it exports to {', '.join(FORMATS)}, not {fmt!r}")
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported for Qwen3-VL exports; choose {', '.join(DTYPES)}")
    if fmt == "compressed-tensors" and opened.quantized.method is None:
        raise InputError(f"{opened.folder} is a dense Qwen3-VL checkpoint: it has no integer codes to repack; export "
                         "it with --format qwen3-vl-hf, or export a GRACE QAT / AWQ checkpoint to compressed-tensors")


def _dense_linear(opened: OpenedCheckpoint, name: str) -> torch.Tensor:
    """The exact float32 weight [O, I] of quantized linear ``name`` (W4: (u - z) * s; W8: q * s)."""
    if opened.quantized.bits == 8:
        c = opened.int8_codes(name)
        o, i = c.qweight.shape
        return (c.qweight.float().view(o, -1, c.group_size) * c.scales.unsqueeze(-1)).view(o, i)
    t = opened.awq_tensors(name)
    return dequantize_awq(t.qweight, t.qzeros, t.scales, t.group_size).t().contiguous()


def _ct_linear(opened: OpenedCheckpoint, name: str, symmetric: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of quantized linear ``name`` (suffix -> tensor); ``symmetric``: the scheme of
    the whole export (an asymmetric one gives every W4 layer its ``weight_zero_point``)."""
    if opened.quantized.bits == 8:
        return to_compressed_tensors_w8(opened.int8_codes(name))
    t = opened.awq_tensors(name)
    codes, zeros = unpack_awq(t.qweight, t.qzeros)  # [I, O], [I/g, O]
    z = zeros.t().contiguous()
    if symmetric and not bool((z == 8).all()):
        raise CheckpointError(f"{opened.folder}: {name} has zero points other than 8 in a symmetric checkpoint")
    ct = codes_to_ct(codes.t().contiguous(), None if symmetric else z, t.scales.t().contiguous())
    out = {"weight_packed": ct.weight_packed, "weight_scale": ct.weight_scale, "weight_shape": ct.weight_shape}
    if ct.weight_zero_point is not None:
        out["weight_zero_point"] = ct.weight_zero_point
    return out


def _config(opened: OpenedCheckpoint, dtype: str, qc: dict | None) -> dict:
    cfg = {k: v for k, v in opened.raw_config.items() if k not in GRACE_CONFIG_KEYS}
    cfg["architectures"] = ["Qwen3VLForConditionalGeneration"]
    cfg["dtype"] = cfg["torch_dtype"] = dtype  # transformers 5 reads dtype, 4.x (vLLM, SGLang) torch_dtype
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict) and "dtype" in cfg[sub]:
            cfg[sub] = {**cfg[sub], "dtype": dtype}
    if qc is not None:
        cfg["quantization_config"] = qc
    return cfg


def _processor_files(opened: OpenedCheckpoint, out: Path, vocab_rows: int) -> list[str]:
    folder, notes = opened.folder, []
    for name in COPIED_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
    (out / "chat_template.jinja").write_text(load_chat_template(folder), encoding="utf-8")
    tokens = QwenTokenizer.from_folder(folder).vocab_size
    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else {}
    if vocab_rows > tokens:
        pad = list(range(tokens, vocab_rows))
        gen["suppress_tokens"] = sorted(set(gen.get("suppress_tokens") or []) | set(pad))
        notes.append(f"embedding rows {tokens}..{vocab_rows - 1} have no token (padding): they are in "
                     "generation_config.suppress_tokens, as gracevlm never samples them")
    write_json_atomic(out / "generation_config.json", gen)
    return notes


def write_qwen3_vl_export(opened: OpenedCheckpoint, fmt: str, out: Path, dtype: str = "bfloat16",
                          progress: bool = False) -> ExportFacts:
    """Write the ``fmt`` export of ``opened`` into the (empty, temporary) folder ``out``."""
    from tqdm import tqdm

    check_export_request(opened, fmt, dtype)
    q, cfg = opened.quantized, opened.config
    tdtype, compressed = DTYPES[dtype], fmt == "compressed-tensors"
    facts = ExportFacts(len(q.names), q.group_size if q.names else None, q.bits if q.names else None)
    quantized = set(q.names)
    writer = ShardWriter(out, max_shard_bytes=4 * 1024**3)
    rounding, cast, symmetric = _Error(), _Error(), q.symmetric or q.bits == 8
    for name in tqdm(q.names, desc=f"export {fmt}", unit="layer", disable=not progress):
        hf = ours_to_hf(hf_to_ours(name + ".weight"), cfg)[: -len(".weight")]
        if compressed:
            for suffix, t in _ct_linear(opened, name, symmetric).items():
                writer.add(f"{hf}.{suffix}", t)
        else:
            exact = _dense_linear(opened, name)
            written = exact.to(tdtype)
            rounding.add(written, exact)
            writer.add(f"{hf}.weight", written)
        if f"{name}.bias" in opened.store:
            writer.add(f"{hf}.bias", opened.store.get(f"{name}.bias").to(tdtype))
    rows = cfg.text.vocab_size
    seen: dict[str, str] = {}
    for key in opened.store.keys():
        module, _, suffix = key.rpartition(".")
        ours = None if is_ignored_key(key) else hf_to_ours(key)
        if ours is None or (module in quantized and suffix in QUANTIZED_SUFFIXES):
            continue
        if ours == "language_model.lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a stored duplicate of the tied matrix: the embedding is the one tensor
        target = ours_to_hf(ours, cfg)
        if target is None:
            raise CheckpointError(f"{opened.folder}: {key} has no transformers name")
        if target in seen:
            raise CheckpointError(f"{opened.folder}: tensors {seen[target]} and {key} both map to {target}")
        seen[target] = key
        t = opened.store.get(key)
        written = t.to(tdtype) if t.dtype.is_floating_point else t
        if t.dtype.is_floating_point:
            cast.add(written, t)
        writer.add(target, written)
    writer.close()
    qc = None
    if compressed:
        qc = ct_quantization_config(q.group_size, list(CT_IGNORE), symmetric, q.bits)
        scale = "fp16" if q.bits == 4 else "fp32"
        facts.notes.append(f"W{q.bits}A16 pack-quantized, group {q.group_size}, "
                           f"{'symmetric' if symmetric else 'asymmetric (weight_zero_point)'}: weight_packed = the "
                           f"source codes + {2 ** (q.bits - 1)}, weight_scale = the {scale} scales as stored; lm_head, "
                           "vision tower and embeddings dense")
    else:
        facts.rounding = {"dtype": dtype, "rule": f"W = {'q * s' if q.bits == 8 else '(u - z) * s'} exact in "
                          f"float32, then one cast to {dtype} (round to nearest even)" if q.names else
                          f"dense source tensors cast to {dtype}", "max_abs": rounding.max_abs,
                          "mean_abs": rounding.mean_abs}
    if cast.max_abs:
        facts.notes.append(f"dense tensors cast to {dtype} changed by up to {cast.max_abs:.3g}")
    facts.notes.append("lm_head tied to embed_tokens (one tensor, no lm_head.weight)" if cfg.tie_word_embeddings
                       else "lm_head untied (lm_head.weight written)")
    write_json_atomic(out / "config.json", _config(opened, dtype, qc))
    facts.notes += _processor_files(opened, out, rows)
    return facts
