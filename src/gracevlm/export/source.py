"""The model being exported, read straight from its checkpoint tensors (never from the fused in-memory model).

Every supported input layout (GRACE AWQ, GRACE QAT, plain fp16, AutoAWQ, compressed-tensors, llava-hf) is
presented with LLaVA-original key names; each quantized LM linear is given as integer codes
``u [O, I]`` (0..15), zero points and scales ``[O, I/g]`` - the exact quantities every target stores.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..formats.awq import GRACE_ZERO_WORD, unpack_awq
from ..formats.checkpoint import TensorStore, is_ignored_key
from ..formats.hub import resolve_model_path
from ..models.checkpoint import open_checkpoint
from ..models.llava.config import IGNORED_KEYS, PROJECTOR_PREFIX, VISION_PREFIX, vision_config_dict


@dataclass
class LinearCodes:
    """One quantized linear: ``W[o, i] = (u[o, i] - z[o, i // g]) * s[o, i // g]``.

    ``zeros`` is None when every zero point is 8 (symmetric GRACE codes, ``q = u - 8``)."""

    name: str
    u: torch.Tensor          # uint8 [O, I]
    zeros: torch.Tensor | None  # uint8 [O, I/g]
    scales: torch.Tensor     # [O, I/g], dtype as stored (fp16 for every GRACE checkpoint)
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.u.shape)

    def dequantize(self) -> torch.Tensor:
        """``(u - z) * s`` in float32. Exact: |u - z| <= 15 times an fp16 (or bf16) scale needs at most
        15 significant bits, which float32's 24 hold."""
        out_f, in_f = self.u.shape
        z = 8.0 if self.zeros is None else self.zeros.to(torch.float32).repeat_interleave(self.group_size, 1)
        s = self.scales.to(torch.float32).repeat_interleave(self.group_size, 1)
        return (self.u.to(torch.float32) - z) * s


class _PrefixStore:
    """A CLIP checkpoint folder (``vision_model.*`` keys) seen under the GRACE tower prefix."""

    def __init__(self, store: TensorStore, prefix: str):
        self.store, self.prefix = store, prefix
        self._keys = {VISION_PREFIX + k[len(prefix):]: k for k in store.keys() if k.startswith(prefix)}

    def keys(self):
        return sorted(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def get(self, key):
        return self.store.get(self._keys[key])

    def get_slice_shape(self, key):
        return self.store.get_slice_shape(self._keys[key])


class SourceModel:
    """A LLaVA checkpoint opened for export (``models.checkpoint.open_checkpoint``). ``tensor(key)`` reads any
    non-quantized tensor by its LLaVA-original name; ``linear(name)`` gives a quantized LM linear's codes;
    ``dense_keys()`` lists everything else."""

    def __init__(self, model: str | os.PathLike):
        self.opened = open_checkpoint(model)
        if "llava-hf" not in self.opened.family.export_formats:
            raise CheckpointError(f"{self.opened.folder} is a {self.opened.family.name} checkpoint; these exports "
                                  "write LLaVA-1.5 layouts")
        self.folder, self.format = self.opened.folder, self.opened.format
        self.config, self.store = self.opened.config, self.opened.store
        self.quantized = self.opened.quantized.names
        self.group_size = self.opened.quantized.group_size
        self._qat = self.opened.quantized.sidecar
        self._asym: list[str] | None = None
        quantized_keys = {f"{m}.{s}" for m in self.quantized
                          for s in ("qweight", "qzeros", "scales", "weight", "log_scale")}
        self._dense = [k for k in self.store.keys() if k not in quantized_keys and not is_ignored_key(k)
                       and k not in IGNORED_KEYS]
        biased = [m for m in self.quantized if f"{m}.bias" in self.store]
        if biased:
            raise CheckpointError(f"{biased[0]} has a bias; LLaMA linears have none and the export targets "
                                  "(llava-hf LlamaConfig, GGUF llama) would drop it")
        self.vision = self._vision_source()

    # -- vision tower ------------------------------------------------------------------------------
    def _vision_source(self):
        if any(k.startswith(VISION_PREFIX) for k in self._dense):
            return self.store
        if PROJECTOR_PREFIX + "0.weight" not in self.store or not self.config.mm_vision_tower:
            return None
        try:
            path = resolve_model_path(self.config.mm_vision_tower, base=self.folder)
        except CheckpointError as exc:
            raise CheckpointError(f"the checkpoint does not bundle its vision tower and mm_vision_tower "
                                  f"{self.config.mm_vision_tower!r} cannot be found ({exc}); the exports need "
                                  "the CLIP weights") from exc
        clip = TensorStore(path)
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip.keys()) else ""
        return _PrefixStore(clip, prefix)

    def vision_keys(self) -> list[str]:
        if self.vision is None:
            return []
        return [k for k in self.vision.keys() if k.startswith(VISION_PREFIX) and not k.endswith("position_ids")]

    def vision_config(self) -> dict:
        if self.vision is None:
            raise CheckpointError(f"{self.folder} has no vision tower")
        return vision_config_dict(self.config, self.vision.keys(), self.vision.get_slice_shape, base=self.folder)

    # -- tensors ---------------------------------------------------------------------------------------
    def dense_keys(self) -> list[str]:
        """Non-quantized tensors of the language model and projector (the tower is in ``vision_keys``)."""
        return [k for k in self._dense if not k.startswith(VISION_PREFIX)]

    def tensor(self, key: str) -> torch.Tensor:
        if key.startswith(VISION_PREFIX) and self.vision is not None and self.vision is not self.store:
            return self.vision.get(key)
        return self.store.get(key)

    def linear(self, name: str) -> LinearCodes:
        packed = self.opened.awq_tensors(name)
        codes, zeros = unpack_awq(packed.qweight, packed.qzeros)
        z = zeros.t().contiguous()
        return LinearCodes(name, codes.t().contiguous(), None if bool((z == 8).all()) else z,
                           packed.scales.t().contiguous(), packed.group_size)

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a quantized linear, from metadata only."""
        return self.opened.linear_shape(name)

    def asymmetric_layers(self) -> list[str]:
        """Quantized layers with a zero point other than 8 (checked on the small qzeros tensors)."""
        if self._qat is not None:
            return []
        if self._asym is None:
            self._asym = [m for m in self.quantized
                          if not bool((self.store.get(f"{m}.qzeros") == GRACE_ZERO_WORD).all())]
        return self._asym

    @property
    def symmetric(self) -> bool:
        return not self.asymmetric_layers()

    def dense_linear_weight(self, name: str) -> torch.Tensor:
        return self.store.get(f"{name}.weight")

    @property
    def lm_linears(self) -> list[str]:
        """Names of the 7 LLaMA linears of every layer, quantized or not."""
        out = []
        for i in range(self.config.num_hidden_layers):
            for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                out.append(f"model.layers.{i}.{lin}")
        return out

    def tokenizer_file(self) -> Path:
        path = self.folder / "tokenizer.model"
        if not path.is_file():
            raise CheckpointError(f"{path} not found; the exports need the SentencePiece tokenizer.model")
        return path
