"""Checks every family's loading runs, each turning a broken checkpoint into one ``CheckpointError`` (what,
where, how to fix) instead of a traceback:

* ``check_folder_readable(folder)``: every file of the folder may be opened by this user.
* ``check_quantized_module_names(names, layers, source)``: the packed-module list names only the seven
  linears of existing decoder layers (never ``embed_tokens`` or ``lm_head``).
* ``check_finite_scales(layers, source)``: no NaN/inf scale (it would make every answer NaN logits).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import CheckpointError

_MODULE = re.compile(r"(?:model\.|model\.language_model\.)layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")


def check_quantized_module_names(names: Iterable[str], num_layers: int, source: str) -> None:
    for name in names:
        m = _MODULE.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise CheckpointError(f"{source}: the quantized-module list names {name!r}, which is not one of a "
                                  "decoder layer's seven linears (model.layers.N.self_attn.q_proj ... "
                                  "mlp.down_proj); fix the list")
        if int(m.group(1)) >= num_layers:
            raise CheckpointError(f"{source}: the quantized-module list names {name!r} but the config has "
                                  f"{num_layers} layers; fix the list or num_hidden_layers")


def check_finite_scales(layers: Mapping[str, Any], source: str) -> None:
    """``layers``: module name -> Int4Linear (AWQ tensors still present)."""
    import torch

    for name, layer in layers.items():
        scales = layer.scales
        if scales is not None and not bool(torch.isfinite(scales).all()):
            bad = int((~torch.isfinite(scales)).sum())
            raise CheckpointError(f"{source}: {name}.scales holds {bad} NaN/inf values; the checkpoint is "
                                  "corrupt (re-download or re-export it)")


def check_folder_readable(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
        for entry in entries:
            if entry.is_file():
                with open(entry.path, "rb"):
                    pass
    except PermissionError as exc:
        where = exc.filename or folder
        raise CheckpointError(f"{where}: permission denied; the checkpoint must be readable by this user "
                              f"(e.g. chmod -R a+rX {folder})") from None
