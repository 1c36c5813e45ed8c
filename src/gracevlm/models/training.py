"""Types shared by every family's training data path (the front end ``gracevlm.train`` drives them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of positions that are not supervised (torch's cross-entropy default)


@dataclass
class Example:
    """One tokenized training conversation: ids with one image marker per image (not yet expanded to the
    image's feature rows), labels (``IGNORE_INDEX`` where not supervised), and the image path or None."""

    input_ids: list[int]
    labels: list[int]
    image: str | None


@dataclass
class BatchOutput:
    """What ``Family.forward_batch`` returns: ``logits [N, V]`` fp32 at the supervised positions (position ``t``
    predicts ``labels[t + 1]``), their ``targets [N]``, and the hidden state at the requested layer over each
    image's token positions: ``[n_images, P, D]`` when every image has ``P`` tokens (LLaVA), a list of ``[P_i, D]``
    when the count depends on the image (Qwen3-VL); None without images or without a requested layer."""

    logits: torch.Tensor
    targets: torch.Tensor
    image_hidden: "torch.Tensor | list[torch.Tensor] | None"
