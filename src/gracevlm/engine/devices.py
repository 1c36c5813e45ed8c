"""``parse_device``: a ``--device`` / ``device=`` string checked into a ``torch.device`` (one clear error)."""
from __future__ import annotations

import torch

from ..errors import InputError

SUPPORTED = ("auto", "cpu", "cuda", "cuda:N")


def parse_device(device: str | torch.device) -> torch.device:
    """"auto" (CUDA if available, else CPU), "cpu" or "cuda[:n]"; ``InputError`` for anything else, or for
    CUDA where this torch build or machine has none."""
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise InputError(f"unknown device {device!r}; choose one of {', '.join(SUPPORTED)}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {str(dev)!r} is not supported; choose one of {', '.join(SUPPORTED)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(dev)!r} requested but CUDA is not available in this torch build "
                             "or on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return dev
