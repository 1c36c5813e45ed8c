"""Our CLIP vision tower against transformers' CLIPVisionModel (same weights), and loading CLIP folders
in the layouts found in the wild."""
import json

import pytest
import torch
from safetensors.torch import save_file

from gracevlm.errors import CheckpointError
from gracevlm.models.llava.vision import CLIPVisionSpec, load_clip_folder, tower_from_tensors

SPEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56,
            patch_size=14, layer_norm_eps=1e-5)


def hf_tower(act):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**SPEC, hidden_act=act)).eval()
    for p in model.parameters():  # non-trivial LayerNorm weights and biases too
        p.data.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hidden_states_match_transformers(act):
    ref = hf_tower(act)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    ours = tower_from_tensors(CLIPVisionSpec.from_dict({**SPEC, "hidden_act": act}), sd, torch.float32, "test")
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a = ref(pixels, output_hidden_states=True)
        b = ours(pixels, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == SPEC["num_hidden_layers"] + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=2e-5, rtol=1e-5)
    assert ours.config.to_dict()["hidden_act"] == act


@pytest.mark.parametrize("layout", ["flat-safetensors", "clipmodel-safetensors", "clipmodel-bin"])
def test_clip_folders(tmp_path, layout):
    ref = hf_tower("quick_gelu")
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    cfg = {**SPEC, "hidden_act": "quick_gelu", "model_type": "clip_vision_model"}
    if layout.startswith("clipmodel"):  # a whole CLIPModel: vision under vision_model., plus a text tower
        sd = {f"vision_model.{k}": v for k, v in sd.items()}
        sd["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 8)
        sd["logit_scale"] = torch.tensor(2.0)
        cfg = {"model_type": "clip", "vision_config": cfg, "text_config": {"hidden_size": 8}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if layout.endswith("bin"):
        torch.save(sd, tmp_path / "pytorch_model.bin")
    else:
        save_file(sd, str(tmp_path / "model.safetensors"))
    tower = load_clip_folder(tmp_path, torch.float32)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels, output_hidden_states=True).hidden_states[-2],
                                   ref(pixels, output_hidden_states=True).hidden_states[-2], atol=2e-5, rtol=1e-5)


def test_bad_towers_are_named(tmp_path):
    spec = CLIPVisionSpec.from_dict({**SPEC, "hidden_act": "quick_gelu"})
    sd = {k: v for k, v in hf_tower("quick_gelu").state_dict().items() if not k.endswith("position_ids")}
    with pytest.raises(CheckpointError, match="missing"):
        tower_from_tensors(spec, {k: v for k, v in sd.items() if "layers.2" not in k}, torch.float32, "t")
    with pytest.raises(CheckpointError, match="shape"):
        tower_from_tensors(spec, {**sd, "pre_layrnorm.weight": torch.ones(3)}, torch.float32, "t")
    with pytest.raises(CheckpointError, match="does not belong"):
        tower_from_tensors(spec, {**sd, "encoder.layers.9.mlp.fc1.weight": torch.ones(3)}, torch.float32, "t")
    with pytest.raises(CheckpointError, match="hidden_act"):
        CLIPVisionSpec.from_dict({**SPEC, "hidden_act": "relu6"})
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip_folder(tmp_path, torch.float32)
