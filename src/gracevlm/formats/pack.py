"""QAT checkpoint -> GRACE AWQ checkpoint, verified bit-exact, one layer at a time."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import CheckpointError, InputError
from .awq import dequantize_awq, unpack_awq
from .checkpoint import AWQ_MODULES_NAME, ShardWriter, replace_folder, TensorStore, write_json_atomic
from .publish import discard_temp_folder, new_temp_folder
from .qat import SIDECAR_NAME, qat_to_awq, read_qat_sidecar

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "added_tokens.json", "generation_config.json", "preprocessor_config.json", "chat_template.json",
                   "chat_template.jinja", "processor_config.json", "video_preprocessor_config.json", "vocab.json",
                   "merges.txt")


@dataclass
class PackReport:
    layers: int
    max_code_error: int
    max_grid_residual: float
    qat_bytes: int
    awq_bytes: int

    def as_dict(self) -> dict:
        return dict(layers=self.layers, max_code_error=self.max_code_error,
                    max_grid_residual=self.max_grid_residual, qat_bytes=self.qat_bytes, awq_bytes=self.awq_bytes,
                    size_ratio=round(self.awq_bytes / max(1, self.qat_bytes), 4))


def pack_qat_checkpoint(qat_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False,
                        progress: bool = True) -> PackReport:
    """Convert a GRACE QAT checkpoint folder into the GRACE AWQ release layout.

    Every layer is verified after packing: the unpacked nibbles minus 8 equal the recovered codes and the
    dequantized weight equals ``q * fp16(s)``. Written to a temporary folder renamed into place at the end.
    """
    src, out = Path(qat_dir), Path(out_dir)
    sidecar_path = src / SIDECAR_NAME
    if not sidecar_path.is_file():
        raise CheckpointError(f"{src} has no {SIDECAR_NAME}; exact packing needs the QAT sidecar with the "
                              "learned scales (the baked weights alone do not carry them)")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} exists and is not empty; pass --force to replace it")
    try:
        cfg = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{src / 'config.json'} not found") from None
    group = int((cfg.get("qat") or {}).get("group_size", 128))
    layers = read_qat_sidecar(sidecar_path)
    store = TensorStore(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_folder(out)  # stale ones from killed runs are removed first
    try:
        writer = ShardWriter(tmp)
        quantized_keys = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers}
        for key in store.keys():
            if key not in quantized_keys:
                writer.add(key, store.get(key))
        max_err, max_res, group_sizes = 0, 0.0, set()
        for name, layer in tqdm(layers.items(), desc="pack", unit="layer", disable=not progress):
            if f"{name}.weight" in store and not torch.equal(store.get(f"{name}.weight"), layer.weight):
                raise CheckpointError(f"{name}.weight in the safetensors differs from the sidecar's; the "
                                      "checkpoint and its sidecar come from different runs")
            packed = qat_to_awq(layer.weight, layer.log_scale, layer.bias, group_size=group, name=name)
            codes, _ = unpack_awq(packed.qweight, packed.qzeros)
            out_f, in_f = layer.weight.shape
            s = packed.scales.float().t().repeat_interleave(packed.group_size, dim=1)
            q = torch.round(layer.weight.float() / torch.exp(layer.log_scale.float()).view(out_f, -1)
                            .repeat_interleave(packed.group_size, dim=1))
            if not torch.equal(codes.t().float() - 8, q):
                raise CheckpointError(f"{name}: packed codes do not round-trip (internal error)")
            if not torch.equal(dequantize_awq(packed.qweight, packed.qzeros, packed.scales, packed.group_size).t(),
                               q * s):
                raise CheckpointError(f"{name}: dequantized weight differs from q * s (internal error)")
            max_err, max_res = max(max_err, packed.max_code_error), max(max_res, packed.max_grid_residual)
            group_sizes.add(packed.group_size)
            for suffix in ("qweight", "qzeros", "scales", "bias"):
                tensor = getattr(packed, suffix)
                if tensor is not None:
                    writer.add(f"{name}.{suffix}", tensor)
        writer.close()
        if len(group_sizes) > 1:
            raise CheckpointError(f"layers use different group sizes {sorted(group_sizes)}; the AWQ module list "
                                  "holds one group size")
        for fname in TOKENIZER_FILES:
            if (src / fname).is_file():
                shutil.copy2(src / fname, tmp / fname)
        cfg["awq_packing"] = {"bits": 4, "group_size": group_sizes.pop() if group_sizes else group,
                              "zero_point": 8, "version": "gemm"}
        cfg.pop("quantization_config", None)
        write_json_atomic(tmp / "config.json", cfg)
        write_json_atomic(tmp / AWQ_MODULES_NAME, {"bits": 4, "group_size": cfg["awq_packing"]["group_size"],
                                                   "modules": sorted(layers)})
        report = PackReport(len(layers), max_err, max_res, store.file_bytes(),
                            sum(p.stat().st_size for p in tmp.glob("*.safetensors")))
        replace_folder(tmp, out)
    except BaseException:
        discard_temp_folder(tmp)
        raise
    return report


