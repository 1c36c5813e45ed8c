"""The demo recipe's vision stage: the CLIP tower learns to see before the language model reads it.

A from-scratch ViT and LM trained together on question answering collapse to the text-only answer prior
(the image is ignored). This stage gives the tower dense, cheap supervision from the world's ground truth
instead: a small auxiliary head reads the tower's selected hidden state (the rows the projector sees) and
predicts, for each quadrant of the picture, the shape (or none), colour (or none) and size (or none) of the
object there. Pictures are drawn on the fly at the training views (``world.train_view``: 64-256 px, square
and 4:3 / 3:4, padded as LLaVA pads), so the tower sees every size it will be asked about. Afterwards the
head is dropped; only the CLIP tower (still a plain ``CLIPVisionModel``) is kept.
"""
from __future__ import annotations

import math
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .world import COLORS, SHAPES, SIZES, Scene, draw_scene, make_scene, train_view

TARGETS = ("shape", "color", "size")
CLASSES = {"shape": 1 + len(SHAPES), "color": 1 + len(COLORS), "size": 1 + len(SIZES)}  # 0 = no object


def scene_targets(scene: Scene) -> torch.Tensor:
    """``[3, 4]`` class ids (rows: shape, colour, size; columns: quadrants); 0 where a quadrant is empty."""
    out = torch.zeros(3, 4, dtype=torch.long)
    for o in scene.objects:
        out[0, o.quadrant] = 1 + SHAPES.index(o.shape)
        out[1, o.quadrant] = 1 + tuple(COLORS).index(o.color)
        out[2, o.quadrant] = 1 + tuple(SIZES).index(o.size)
    return out


class QuadrantHead(nn.Module):
    """Four learned queries attend over the patch rows (one per quadrant), then linear classifiers."""

    def __init__(self, dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(4, dim) * 0.02)
        self.keys = nn.Linear(dim, dim)
        self.classifiers = nn.ModuleList(nn.Linear(dim, CLASSES[t]) for t in TARGETS)

    def forward(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """``[B, P, D]`` -> per target ``[B, 4, classes]`` logits."""
        attn = torch.einsum("qd,bpd->bqp", self.queries, self.keys(feats)) / math.sqrt(feats.shape[-1])
        pooled = torch.einsum("bqp,bpd->bqd", attn.softmax(-1), feats)
        return [c(pooled) for c in self.classifiers]


class PatchHead(nn.Module):
    """Linear classifiers on every patch row: the shape / colour / size of the object in that patch's quadrant.

    LLaVA's pad-to-square is symmetric, so a picture's midlines are the square's and the quadrant of a patch is
    its half of the grid in each direction at every view. Dense targets make each patch row carry its quadrant's
    object linearly, which is what the language model reads."""

    def __init__(self, dim: int):
        super().__init__()
        self.classifiers = nn.ModuleList(nn.Linear(dim, CLASSES[t]) for t in TARGETS)

    def forward(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """``[B, P, D]`` -> per target ``[B, P, classes]`` logits."""
        return [c(feats) for c in self.classifiers]


def patch_quadrants(n_patches: int) -> torch.Tensor:
    """``[P]`` quadrant (0 top left, 1 top right, 2 bottom left, 3 bottom right) of each row-major patch."""
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches or grid % 2:
        raise ValueError(f"{n_patches} patches do not form an even square grid")
    rows, cols = torch.arange(n_patches) // grid, torch.arange(n_patches) % grid
    return (rows >= grid // 2).long() * 2 + (cols >= grid // 2).long()


def dense_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``PatchHead`` logits against each patch's quadrant targets (``targets [B, 3, 4]``)."""
    quad = patch_quadrants(logits[0].shape[1])
    return sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[:, i][:, quad].reshape(-1))
               for i, lg in enumerate(logits))


def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The tower rows the projector sees: hidden state ``select_layer``, CLS dropped for ``patch``."""
    feats = model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.select_layer]
    return feats[:, 1:] if model.select_feature == "patch" else feats


def draw_batch(rng: random.Random, n: int, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh scenes at random training views -> (pixels ``[n, 3, S, S]``, targets ``[n, 3, 4]``)."""
    pixels, targets = [], []
    for _ in range(n):
        scene = make_scene(rng)
        pixels.append(preprocess(draw_scene(scene, *train_view(rng))))
        targets.append(scene_targets(scene))
    return torch.stack(pixels), torch.stack(targets)


def head_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[:, i].reshape(-1))
               for i, lg in enumerate(logits))


@torch.no_grad()
def head_accuracy(model, head: QuadrantHead, pixels: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Per target, the fraction of quadrants classified right (empty quadrants included)."""
    logits = head(tower_features(model, pixels))
    return {t: round(float((lg.argmax(-1) == targets[:, i]).float().mean()), 4)
            for i, (t, lg) in enumerate(zip(TARGETS, logits))}


def cosine_multiplier(step: int, steps: int, warmup: int) -> float:
    """The learning-rate factor at 0-based ``step``: linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_auxiliary(name: str, params: list, batch_loss, accuracy, steps: int, lr: float, warmup: int,
                    weight_decay: float, clip: float | None, log_every: int, progress: bool) -> list[dict]:
    """``steps`` AdamW steps on ``params`` (``cosine_multiplier`` schedule; gradient norm clipped to ``clip``
    unless None) of ``batch_loss()`` (draws its own batch). Returns the log: the loss every ``log_every`` steps and
    at the last, where ``accuracy()`` is added; ``progress`` prints each record as ``[demo] <name> ...``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    log, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine_multiplier(step, steps, warmup)
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"step": step + 1, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - t0, 1)}
            if step + 1 == steps:
                record["accuracy"] = accuracy()
            log.append(record)
            if progress:
                print(f"[demo] {name} {record}", file=sys.stderr, flush=True)
    return log


def pretrain_vision(model, preprocess, steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                    warmup: int = 30, log_every: int = 50, progress: bool = True,
                    dense_weight: float = 0.0) -> list[dict]:
    """Train ``model.vision_tower`` (in place) with a fresh ``QuadrantHead`` for ``steps`` AdamW steps
    (linear warm-up, cosine decay); ``preprocess``: PIL image -> ``[3, S, S]`` (the checkpoint's own
    preprocessing). ``dense_weight`` > 0 adds a ``PatchHead`` loss with that weight. Returns the log: loss per
    ``log_every`` steps and the head's accuracy on 256 held-back scenes (a stream of their own) at the end.
    Deterministic for a seed and thread count."""
    torch.manual_seed(seed)
    tower = model.vision_tower.train().requires_grad_(True)
    head = QuadrantHead(tower.config.hidden_size)
    patch_head = PatchHead(tower.config.hidden_size) if dense_weight > 0 else None
    params = list(tower.parameters()) + list(head.parameters())
    if patch_head is not None:
        params += list(patch_head.parameters())
    rng, check = random.Random(seed * 7919 + 11), random.Random(seed * 7919 + 13)
    check_pixels, check_targets = draw_batch(check, 256, preprocess)

    def batch_loss() -> torch.Tensor:
        pixels, targets = draw_batch(rng, batch_size, preprocess)
        feats = tower_features(model, pixels)
        loss = head_loss(head(feats), targets)
        if patch_head is not None:
            loss = loss + dense_weight * dense_loss(patch_head(feats), targets)
        return loss

    log = train_auxiliary("vision", params, batch_loss, lambda: head_accuracy(model, head, check_pixels, check_targets),
                          steps, lr, warmup, weight_decay=0.01, clip=1.0, log_every=log_every, progress=progress)
    tower.eval().requires_grad_(False)
    return log
