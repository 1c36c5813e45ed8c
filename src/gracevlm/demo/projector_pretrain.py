"""The demo recipe's projector stage: the projector learns to hand the language model where each patch is.

After the vision stage the tower's patch rows say where they are (a linear probe reads a patch's grid
column and row from them exactly), but that is a small part of their variance, and a projector trained
only through the language model's answers kept the rows' top/bottom half and lost their left/right half:
the teacher then named the right row of an object always and its column by chance (`where`, `color_at`).
Rotary positions cannot stand in for it: a grid row's two halves alternate every grid/2 tokens, a period
no rotary frequency of the LM's heads matches.

This stage trains the projector alone, on the frozen tower, with three auxiliary heads on its output rows
(the image embeddings the LM reads): the patch's own quadrant, the shape / colour / size of the object in
that quadrant per row (``vision_pretrain.PatchHead``), and a pooled readout of each quadrant's object from
all rows (the vision stage's ``QuadrantHead``), so the rows keep what the tower could tell. The teacher stage
then trains the projector at a tenth of the LM's learning rate, so the LM learns to read these rows much as
they are. The heads are dropped; the projector is still LLaVA's two-layer GELU MLP.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from .vision_pretrain import (PatchHead, QuadrantHead, dense_loss, draw_batch, head_loss, patch_quadrants,
                              tower_features, train_auxiliary)


class ProjectedPatchHeads(nn.Module):
    """Heads on projected patch rows ``[B, P, D]``: own quadrant ``[B, P, 4]``, the quadrant's object per row
    (``PatchHead``: per target ``[B, P, classes]``) and per quadrant from all rows (``QuadrantHead``: per target
    ``[B, 4, classes]``, the vision stage's readout, so the rows keep all the tower could tell)."""

    def __init__(self, dim: int):
        super().__init__()
        self.quadrant = nn.Linear(dim, 4)
        self.attributes = PatchHead(dim)
        self.pooled = QuadrantHead(dim)

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        return self.quadrant(rows), self.attributes(rows), self.pooled(rows)


def quadrant_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of quadrant logits ``[B, P, 4]`` against each row-major patch's own quadrant."""
    b, p, _ = logits.shape
    return F.cross_entropy(logits.reshape(-1, 4), patch_quadrants(p).repeat(b))


def projector_loss(heads: ProjectedPatchHeads, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Own-quadrant, per-row and pooled quadrant-object cross-entropies (equal weights); ``targets [B, 3, 4]``."""
    quadrant, attributes, pooled = heads(rows)
    return quadrant_loss(quadrant) + dense_loss(attributes, targets) + head_loss(pooled, targets)


@torch.no_grad()
def projector_accuracy(model, heads: ProjectedPatchHeads, pixels: torch.Tensor,
                       targets: torch.Tensor) -> dict[str, float]:
    """Fraction of patch rows whose own quadrant, and whose quadrant's shape / colour / size, the heads get right
    (keys ``quadrant``, ``shape``, ...), and of quadrants the pooled head gets right (``pooled_shape``, ...)."""
    rows = model.projector(tower_features(model, pixels))
    quadrant, attributes, pooled = heads(rows)
    quad = patch_quadrants(rows.shape[1])
    out = {"quadrant": round(float((quadrant.argmax(-1) == quad).float().mean()), 4)}
    for i, name in enumerate(("shape", "color", "size")):
        out[name] = round(float((attributes[i].argmax(-1) == targets[:, i][:, quad]).float().mean()), 4)
        out[f"pooled_{name}"] = round(float((pooled[i].argmax(-1) == targets[:, i]).float().mean()), 4)
    return out


def pretrain_projector(model, preprocess, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                       warmup: int = 30, log_every: int = 50, progress: bool = True) -> list[dict]:
    """Train ``model.projector`` (in place; the tower frozen, the LM untouched) with fresh
    ``ProjectedPatchHeads`` for ``steps`` AdamW steps (no weight decay; linear warm-up, cosine decay) on
    fresh pictures at the training views; ``preprocess``: PIL image -> ``[3, S, S]``. Returns the log: loss
    per ``log_every`` steps and, at the end, ``projector_accuracy`` on 256 held-back scenes. Deterministic
    for a seed and thread count."""
    torch.manual_seed(seed)
    model.vision_tower.eval().requires_grad_(False)
    projector = model.projector.train().requires_grad_(True)
    heads = ProjectedPatchHeads(projector[-1].out_features)
    params = list(projector.parameters()) + list(heads.parameters())
    rng, check = random.Random(seed * 7919 + 17), random.Random(seed * 7919 + 19)
    check_pixels, check_targets = draw_batch(check, 256, preprocess)

    def batch_loss() -> torch.Tensor:
        pixels, targets = draw_batch(rng, batch_size, preprocess)
        with torch.no_grad():
            feats = tower_features(model, pixels)
        return projector_loss(heads, projector(feats), targets)

    log = train_auxiliary("projector", params, batch_loss,
                          lambda: projector_accuracy(model, heads, check_pixels, check_targets), steps, lr, warmup,
                          weight_decay=0.0, clip=None, log_every=log_every, progress=progress)
    projector.eval().requires_grad_(False)
    return log
