"""The config of a bundled CLIP tower comes from ``mm_vision_tower`` when that folder resolves (heads are not in
the weights); the tensors are checked against it; without it the head count is assumed with a warning."""
import json
import logging
import shutil

import pytest
import torch

import gracevlm
from gracevlm.errors import CheckpointError
from gracevlm.export import export_model
from gracevlm.formats.checkpoint import TensorStore
from gracevlm.models.llava.config import VISION_PREFIX

HEADS = 8  # tiny preset: vision hidden 128, so head dim 16 (the synthesized tower has 2 heads of 64)


def _checkpoint(tiny_awq, root, tower_cfg: dict | None):
    """The tiny checkpoint without ``mm_vision_config``; ``mm_vision_tower`` names the folder ``clip`` next to
    the checkpoint's files holding ``tower_cfg`` (None: a Hub id that is not cached)."""
    ckpt = root / "ckpt"
    shutil.copytree(tiny_awq, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["mm_vision_config"]
    if tower_cfg is None:
        cfg["mm_vision_tower"] = "nobody/not-a-cached-clip"
    else:
        (ckpt / "clip").mkdir()
        (ckpt / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **tower_cfg}))
        cfg["mm_vision_tower"] = "clip"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def _tower_cfg(**over):
    cfg = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": HEADS,
           "image_size": 56, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    cfg.update(over)
    return cfg


def _reference_features(ckpt, heads: int, pixels: torch.Tensor) -> torch.Tensor:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    store = TensorStore(ckpt)
    model = CLIPVisionModel(CLIPVisionConfig(**{**_tower_cfg(), "num_attention_heads": heads})).eval()
    state = {k[len(VISION_PREFIX):]: store.get(k).float() for k in store.keys() if k.startswith(VISION_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    with torch.no_grad():
        return model(pixels, output_hidden_states=True).hidden_states[-2]


def test_heads_come_from_the_mm_vision_tower_folder(tiny_awq, tmp_path):
    ckpt = _checkpoint(tiny_awq, tmp_path, _tower_cfg())
    vlm = gracevlm.load(ckpt)
    assert vlm.model.vision_tower.config.num_attention_heads == HEADS
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = vlm.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    right, wrong = _reference_features(ckpt, HEADS, pixels), _reference_features(ckpt, 2, pixels)
    assert torch.allclose(ours, right, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, wrong, atol=1e-2)  # the old guess (head size 64) answers differently
    report = export_model(ckpt, "llava-hf", tmp_path / "hf", dtype="float32")
    assert report.exact
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["vision_config"]["num_attention_heads"] == HEADS


def test_bundled_tensors_are_checked_against_the_folder_config(tiny_awq, tmp_path):
    ckpt = _checkpoint(tiny_awq, tmp_path, _tower_cfg(intermediate_size=512))
    with pytest.raises(CheckpointError, match="intermediate_size=256 but .*says 512"):
        gracevlm.load(ckpt)


def test_without_a_tower_config_heads_are_assumed_with_a_warning(tiny_awq, tmp_path, caplog):
    ckpt = _checkpoint(tiny_awq, tmp_path, None)
    with caplog.at_level(logging.WARNING, logger="gracevlm.models.llava.config"):
        vlm = gracevlm.load(ckpt)
    assert vlm.model.vision_tower.config.num_attention_heads == 2
    lines = [r.getMessage() for r in caplog.records if "assuming" in r.getMessage()]
    assert len(lines) == 1 and "assuming 2 attention heads of size 64" in lines[0] and "\n" not in lines[0]
