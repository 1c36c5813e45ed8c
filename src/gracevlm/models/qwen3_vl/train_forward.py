"""Differentiable, cache-free forward of a ``Qwen3VLModel`` over a padded training batch (``Family.forward_batch``).

The batch (``train.data.ConversationDataset.collate`` with ``Qwen3VLTrainingFormat``): ``input_ids [B, T]``
right-padded, each image's ``<|image_pad|>`` run expanded to its ``t*h*w/m^2`` tokens, ``labels``,
``attention_mask`` and ``pixel_values`` (an ``ImagePixels``: the batch's images concatenated in row order).
As the inference path: the vision tower's merged tokens replace the pad embeddings, the deepstack features are
added after the first decoder layers at the image positions, and every row gets its own 3-axis M-RoPE positions
(text after an image resumes at ``p0 + max(h, w)/m``).

Hidden states follow transformers' ``output_hidden_states``: ``L + 1`` tensors, entry 0 the input embeddings,
entry ``k`` (``1 <= k < L``) the output of decoder layer ``k - 1`` *before* its deepstack addition, entry ``L``
the final-normed output. So ``hidden_layer = -2`` is the output of layer ``L - 2`` (GRACE's RCKA layer, which
its teacher reads with a forward hook on ``layers[-2]``).
"""
from __future__ import annotations

import torch

from ...errors import InputError
from ..training import IGNORE_INDEX, BatchOutput
from .language import VisualInjection
from .model import ImagePixels, Qwen3VLModel
from .rope import mrope_positions


def row_grids(ids: torch.Tensor, grids: list[tuple[int, int, int]], marker: int, merge_size: int) -> list[list]:
    """The images' grids split among the rows of ``ids [B, T]`` (images are in row order)."""
    counts = (ids == marker).sum(-1).tolist()
    out, k = [], 0
    for b, n in enumerate(counts):
        mine = []
        while n > 0:
            if k >= len(grids):
                raise InputError(f"row {b} has more image tokens than the {len(grids)} image(s) of the batch cover")
            t, h, w = grids[k]
            n -= t * h * w // merge_size ** 2
            mine.append(grids[k])
            k += 1
        if n:
            raise InputError(f"row {b}: its image tokens do not match whole images")
        out.append(mine)
    if k != len(grids):
        raise InputError(f"{len(grids)} image(s) in the batch but image tokens for {k}")
    return out


def forward_train(model: Qwen3VLModel, embeds: torch.Tensor, rope_positions: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, visual: VisualInjection | None = None,
                  output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Cache-free causal decoder pass: ``embeds [B, T, D]``, ``rope_positions [3, B, T]``, ``attention_mask
    [B, T]`` (1 = real token) -> ``(final-normed hidden [B, T, D], hidden_states or None)`` (module docstring)."""
    lm = model.language_model
    b, t, _ = embeds.shape
    positions = torch.arange(t, device=embeds.device).unsqueeze(0).expand(b, t)
    mask = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril().unsqueeze(0)
    mask = mask & attention_mask.to(torch.bool).view(b, 1, t) if attention_mask is not None else mask.expand(b, t, t)
    cos, sin = lm.rotary(rope_positions)
    states = [embeds] if output_hidden_states else None
    n_inject = len(visual.features) if visual is not None else 0
    x = embeds
    for i, layer in enumerate(lm.layers):
        x = layer(x, cos, sin, None, i, None, mask)
        if states is not None:
            states.append(x)
        if i < n_inject:
            x = x.clone()
            x[visual.mask] = x[visual.mask] + visual.features[i].to(x.dtype)
    x = lm.norm(x)
    if states is not None:
        states[-1] = x
    return x, (tuple(states) if states is not None else None)


def forward_batch(model: Qwen3VLModel, batch: dict, hidden_layer: int | None = None) -> BatchOutput:
    """Run the model on a collated batch; logits only where a label is supervised (position ``t`` predicts
    ``labels[t + 1]``); ``image_hidden``: one ``[n_i, D]`` tensor per image, hidden state ``hidden_layer`` at
    that image's token positions."""
    cfg, lm = model.config, model.language_model
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    marker, merge = cfg.image_token_id, cfg.vision.spatial_merge_size
    is_image = ids == marker
    n_img = int(is_image.sum())
    pixels: ImagePixels | None = batch.get("pixel_values")
    grids = [] if pixels is None else [tuple(int(v) for v in g) for g in pixels.grid_thw.reshape(-1, 3).tolist()]
    if n_img and not grids:
        raise InputError("the batch has image positions but no pixel_values")
    per_row = row_grids(ids, grids, marker, merge)
    rope = torch.stack([mrope_positions(ids[r].cpu(), per_row[r], marker, merge)[0] for r in range(ids.shape[0])],
                       dim=1).to(ids.device)  # [3, B, T]
    embeds = lm.embed(ids, model.compute_dtype)
    visual = None
    if grids:
        image_embeds, deepstack = model.visual(pixels.pixel_values, grids)
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
        visual = VisualInjection(is_image, [f.to(embeds.dtype) for f in deepstack])
    hidden, states = forward_train(model, embeds, rope, mask, visual, output_hidden_states=hidden_layer is not None)
    sel = labels[:, 1:] != IGNORE_INDEX
    rows = hidden[:, :-1][sel]
    logits = lm.lm_head(rows.to(lm.lm_head.weight.dtype)).to(torch.float32)
    image_hidden = None
    if hidden_layer is not None and n_img:
        counts = [t * h * w // merge ** 2 for t, h, w in grids]
        image_hidden = list(states[hidden_layer][is_image].split(counts))
    return BatchOutput(logits, labels[:, 1:][sel], image_hidden)
