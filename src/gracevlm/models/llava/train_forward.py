"""Differentiable, cache-free forward of a ``LlavaModel`` over a padded training batch (``Family.forward_batch``)."""
from __future__ import annotations

import torch

from ..training import IGNORE_INDEX, BatchOutput
from .chat import IMAGE_TOKEN_INDEX
from .model import LlavaModel


def n_image_tokens(model: LlavaModel) -> int:
    """Feature rows one image contributes (patches, plus the CLS row for ``cls_patch``)."""
    if model.vision_tower is None:
        return 0
    c = model.vision_tower.config
    n = (c.image_size // c.patch_size) ** 2
    return n if model.select_feature == "patch" else n + 1


def image_features(model: LlavaModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[N, 3, S, S]`` -> projected features ``[N, P, hidden]``: tower hidden state ``select_layer``,
    CLS dropped for ``patch``, then the projector (the same selection as ``LlavaModel.encode_images``)."""
    tower_dtype = next(model.vision_tower.parameters()).dtype
    out = model.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True)
    feats = out.hidden_states[model.select_layer]
    if model.select_feature == "patch":
        feats = feats[:, 1:]
    return model.projector(feats.to(model.projector[0].weight.dtype))


def forward_batch(model: LlavaModel, batch: dict, hidden_layer: int | None = None) -> BatchOutput:
    """Run the model on a collated batch (``input_ids`` with expanded image markers, ``labels``,
    ``attention_mask``, ``pixel_values``). Logits are computed only where a label is supervised."""
    lm = model.language_model
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    is_image = ids == IMAGE_TOKEN_INDEX
    embeds = lm.model.embed_tokens(ids.clamp_min(0)).to(model.compute_dtype)
    n_img = int(is_image.sum())
    if n_img:
        if batch.get("pixel_values") is None:
            raise ValueError("batch has image positions but no pixel_values")
        feats = image_features(model, batch["pixel_values"]).to(embeds.dtype)
        if feats.shape[0] * feats.shape[1] != n_img:
            raise ValueError(f"{n_img} image positions but {feats.shape[0]} images x {feats.shape[1]} features")
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
    hidden, states = lm.forward_train(embeds, mask, output_hidden_states=hidden_layer is not None)
    sel = labels[:, 1:] != IGNORE_INDEX
    rows = hidden[:, :-1][sel]
    logits = lm.lm_head(rows.to(lm.lm_head.weight.dtype)).to(torch.float32)
    image_hidden = None
    if hidden_layer is not None and n_img:
        h = states[hidden_layer]
        image_hidden = h[is_image].view(-1, n_image_tokens(model), h.shape[-1])
    return BatchOutput(logits, labels[:, 1:][sel], image_hidden)
