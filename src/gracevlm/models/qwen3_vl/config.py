"""``Qwen3VLConfig``: the fields of a transformers Qwen3-VL ``config.json`` the runtime uses.

Parsed by hand from the JSON dict (no ``AutoConfig``); every shape comes from the file. Shape-defining
fields and the special token ids are required (a ``CheckpointError`` names the missing or invalid
field); only numerics with a transformers default that is not a model choice (eps, act, rope base of the
vision tower) fall back to that default. GRACE additions: the ``qat`` and ``awq_packing`` blocks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import CheckpointError
from ...formats.checkpoint import read_json_object

VISION_ACTS = ("gelu_pytorch_tanh", "gelu", "quick_gelu", "silu")


class _Fields:
    """Reads fields of one JSON object with errors that name the file and the dotted field."""

    def __init__(self, d: dict, where: str, source: str):
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: {where or 'the config'} must be a JSON object")
        self.d, self.where, self.source = d, where, source

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {self.name(key)} {problem}")

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        v = self.d.get(key, default)
        if v is None:
            raise self.fail(key, "is missing; is this a transformers Qwen3-VL config.json?")
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"must be an integer, got {v!r}")
        if v < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {v}")
        return v

    def float(self, key: str, default: float | None = None) -> float:
        v = self.d.get(key, default)
        if v is None:
            raise self.fail(key, "is missing")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise self.fail(key, f"must be a positive number, got {v!r}")
        return float(v)

    def ints(self, key: str, minimum: int = 0) -> list[int]:
        v = self.d.get(key)
        if v is None:
            raise self.fail(key, "is missing")
        if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x < minimum
                                                    for x in v):
            raise self.fail(key, f"must be a list of integers >= {minimum}, got {v!r}")
        return list(v)


@dataclass
class Qwen3VLTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    mrope_section: list[int]
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128000

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "Qwen3VLTextConfig":
        f = _Fields(d, "text_config", source)
        heads = f.int("num_attention_heads")
        hidden = f.int("hidden_size")
        kv = f.int("num_key_value_heads", default=heads)
        head_dim = f.int("head_dim", default=hidden // heads if hidden % heads == 0 else None)
        if heads % kv:
            raise f.fail("num_key_value_heads", f"({kv}) must divide num_attention_heads ({heads})")
        if head_dim % 2:
            raise f.fail("head_dim", f"must be even for rotary embeddings, got {head_dim}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise f.fail("hidden_act", f"is {act!r}; the Qwen3 decoder uses 'silu'")
        if d.get("attention_bias", False):
            raise f.fail("attention_bias", "is true; Qwen3-VL attention has no biases")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        r = _Fields(rope, "text_config." + ("rope_parameters" if "rope_parameters" in d else "rope_scaling"),
                    source)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise r.fail("rope_type", f"is {rope_type!r}; only the default (unscaled) M-RoPE is supported")
        if rope.get("mrope_interleaved", True) is not True:
            raise r.fail("mrope_interleaved", "is not true: the chunked (Qwen2-VL) M-RoPE layout is another model")
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is None:
            raise r.fail("rope_theta", "is missing (neither rope_parameters.rope_theta nor text_config.rope_theta)")
        theta = r.float("rope_theta", theta)
        section = r.ints("mrope_section", minimum=0)
        if len(section) != 3 or sum(section) != head_dim // 2:
            raise r.fail("mrope_section", f"must be three sizes summing to head_dim/2 = {head_dim // 2}, "
                                          f"got {section}")
        return cls(vocab_size=f.int("vocab_size"), hidden_size=hidden, intermediate_size=f.int("intermediate_size"),
                   num_hidden_layers=f.int("num_hidden_layers"), num_attention_heads=heads, num_key_value_heads=kv,
                   head_dim=head_dim, rope_theta=theta, mrope_section=section,
                   rms_norm_eps=f.float("rms_norm_eps", 1e-6),
                   max_position_embeddings=f.int("max_position_embeddings", 128000))


@dataclass
class Qwen3VLVisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: list[int]
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        """Side ``n`` of the learned ``n x n`` position table."""
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "Qwen3VLVisionConfig":
        f = _Fields(d, "vision_config", source)
        hidden, heads = f.int("hidden_size"), f.int("num_heads", default=d.get("num_attention_heads"))
        depth = f.int("depth", default=d.get("num_hidden_layers"))
        if hidden % heads or (hidden // heads) % 4:
            raise f.fail("num_heads", f"({heads}) must split hidden_size ({hidden}) into heads whose size is a "
                                      "multiple of 4 (2-D rotary embedding)")
        n = f.int("num_position_embeddings")
        if math.isqrt(n) ** 2 != n:
            raise f.fail("num_position_embeddings", f"must be a square (an n x n grid), got {n}")
        deepstack = f.ints("deepstack_visual_indexes", minimum=0)
        if any(k >= depth for k in deepstack) or len(set(deepstack)) != len(deepstack):
            raise f.fail("deepstack_visual_indexes", f"must be distinct block indexes below depth {depth}, "
                                                     f"got {deepstack}")
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        if act not in VISION_ACTS:
            raise f.fail("hidden_act", f"is {act!r}; supported: {', '.join(VISION_ACTS)}")
        rope = d.get("rope_parameters") or {}
        theta = _Fields(rope, "vision_config.rope_parameters", source).float("rope_theta", 10000.0)
        return cls(depth=depth, hidden_size=hidden, intermediate_size=f.int("intermediate_size"), num_heads=heads,
                   patch_size=f.int("patch_size"), temporal_patch_size=f.int("temporal_patch_size"),
                   spatial_merge_size=f.int("spatial_merge_size"), out_hidden_size=f.int("out_hidden_size"),
                   num_position_embeddings=n, deepstack_visual_indexes=deepstack,
                   in_channels=f.int("in_channels", 3), hidden_act=act, rope_theta=theta)


@dataclass
class QatBlock:
    """``config.qat`` of a GRACE QAT / AWQ checkpoint."""

    bits: int
    group_size: int
    skip_keywords: list[str] = field(default_factory=list)
    num_replaced: int | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "QatBlock":
        f = _Fields(d, "qat", source)
        bits = f.int("bits")
        if bits not in (4, 8):
            raise f.fail("bits", f"must be 4 or 8, got {bits}")
        skip = d.get("skip_keywords", [])
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise f.fail("skip_keywords", f"must be a list of strings, got {skip!r}")
        replaced = f.int("num_replaced", minimum=0) if d.get("num_replaced") is not None else None
        return cls(bits=bits, group_size=f.int("group_size"), skip_keywords=skip, num_replaced=replaced)


@dataclass
class AwqPackingBlock:
    """``config.awq_packing`` of a GRACE AWQ checkpoint (symmetric codes, constant zero point)."""

    bits: int
    group_size: int
    zero_point: int
    version: str

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "AwqPackingBlock":
        f = _Fields(d, "awq_packing", source)
        bits, zero = f.int("bits"), f.int("zero_point", minimum=0)
        version = d.get("version", "gemm")
        if bits != 4:
            raise f.fail("bits", f"must be 4 (the AWQ GEMM layout is 4-bit), got {bits}")
        if version != "gemm":
            raise f.fail("version", f"is {version!r}; only 'gemm' is defined")
        if zero >= 1 << bits:
            raise f.fail("zero_point", f"{zero} does not fit {bits} bits")
        return cls(bits=bits, group_size=f.int("group_size"), zero_point=zero, version=version)


@dataclass
class Qwen3VLConfig:
    text: Qwen3VLTextConfig
    vision: Qwen3VLVisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool = False
    qat: QatBlock | None = None
    awq_packing: AwqPackingBlock | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Qwen3VLConfig":
        top = _Fields(d, "", source)
        model_type = d.get("model_type")
        if model_type != "qwen3_vl":
            raise top.fail("model_type", f"is {model_type!r}, expected 'qwen3_vl'")
        for block in ("text_config", "vision_config"):
            if not isinstance(d.get(block), dict):
                raise top.fail(block, "is missing or not an object")
        text = Qwen3VLTextConfig.from_dict(d["text_config"], source)
        vision = Qwen3VLVisionConfig.from_dict(d["vision_config"], source)
        if vision.out_hidden_size != text.hidden_size:
            raise CheckpointError(f"{source}: vision_config.out_hidden_size ({vision.out_hidden_size}) must equal "
                                  f"text_config.hidden_size ({text.hidden_size})")
        ids = {k: top.int(k, minimum=0) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")}
        for k, v in ids.items():
            if v >= text.vocab_size:
                raise top.fail(k, f"({v}) is outside the vocabulary ({text.vocab_size} rows)")
        tie = d.get("tie_word_embeddings", d["text_config"].get("tie_word_embeddings", False))
        if not isinstance(tie, bool):
            raise top.fail("tie_word_embeddings", f"must be true or false, got {tie!r}")
        qat = QatBlock.from_dict(d["qat"], source) if d.get("qat") is not None else None
        awq = AwqPackingBlock.from_dict(d["awq_packing"], source) if d.get("awq_packing") is not None else None
        if awq is not None and (qat is None or (qat.bits, qat.group_size) != (awq.bits, awq.group_size)):
            raise top.fail("awq_packing", "must come with a qat block of the same bits and group_size")
        return cls(text=text, vision=vision, tie_word_embeddings=tie, qat=qat, awq_packing=awq, raw=d, **ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Qwen3VLConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: a Qwen3-VL checkpoint folder needs its config.json")
        return cls.from_dict(read_json_object(path), str(path))
