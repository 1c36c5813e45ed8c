"""Types shared by every family's training data path (the front end ``gracevlm.train`` drives them)."""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label of positions that are not supervised (torch's cross-entropy default)


@dataclass
class Example:
    """One tokenized training conversation: ids with one image marker per image (not yet expanded to the
    image's feature rows), labels (``IGNORE_INDEX`` where not supervised), and the image path or None."""

    input_ids: list[int]
    labels: list[int]
    image: str | None
