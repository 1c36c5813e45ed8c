"""The demo recipe's projector stage: its targets are each patch's own quadrant and that quadrant's object, the
pretraining is deterministic and changes only the projector, and the recipe stage writes a LLaVA checkpoint
(or is skipped with 0 steps)."""
import json
import random

import torch

from gracevlm.demo.model_def import DemoArch, build_model
from gracevlm.demo.projector_pretrain import (ProjectedPatchHeads, pretrain_projector, projector_loss,
                                              quadrant_loss)
from gracevlm.demo.vision_pretrain import CLASSES, cosine_multiplier, patch_quadrants, scene_targets
from gracevlm.demo.world import make_scene
from gracevlm.models.llava.processing import ImageSpec, preprocess_image

MICRO = DemoArch(hidden=128, intermediate=128, layers=1, heads=2, vocab=320, max_positions=256, vision_hidden=32,
                 vision_intermediate=64, vision_layers=2, vision_heads=2, image_size=32, patch_size=16)
SPEC = ImageSpec(size=32, aspect="pad")


def _preprocess(img):
    return preprocess_image(img, SPEC)


def test_quadrant_loss_targets_each_patchs_own_quadrant():
    quad = patch_quadrants(16)  # a 4 x 4 grid: rows 0-1 / 2-3, columns 0-1 / 2-3
    assert quad.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    perfect = torch.nn.functional.one_hot(quad, 4).float().unsqueeze(0).repeat(2, 1, 1) * 50
    swapped = perfect[:, :, [1, 0, 3, 2]]  # left and right halves exchanged
    assert float(quadrant_loss(perfect)) < 1e-6 < float(quadrant_loss(swapped))


@torch.no_grad()
def test_projector_loss_adds_the_quadrant_objects():
    heads = ProjectedPatchHeads(128)
    targets = torch.stack([scene_targets(make_scene(random.Random(s))) for s in range(3)])
    rows = torch.randn(3, 16, 128)
    quadrant, attributes, pooled = heads(rows)
    assert quadrant.shape == (3, 16, 4)
    assert [tuple(a.shape) for a in attributes] == [(3, 16, CLASSES[t]) for t in ("shape", "color", "size")]
    assert [tuple(a.shape) for a in pooled] == [(3, 4, CLASSES[t]) for t in ("shape", "color", "size")]
    assert float(projector_loss(heads, rows, targets)) > float(quadrant_loss(quadrant))


def test_cosine_multiplier_warms_up_then_decays_to_zero():
    assert [cosine_multiplier(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert cosine_multiplier(2, 10, 2) == 1.0 and abs(cosine_multiplier(10, 10, 2)) < 1e-12
    assert cosine_multiplier(6, 10, 2) == 0.5


def _pretrained(seed):
    torch.set_num_threads(1)
    model = build_model(MICRO, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = pretrain_projector(model, _preprocess, steps=4, batch_size=4, lr=1e-3, seed=seed, warmup=2, log_every=2,
                             progress=False)
    return model, before, log


def test_projector_pretraining_is_deterministic_and_changes_only_the_projector():
    a, before, log = _pretrained(seed=1)
    b, _, log_b = _pretrained(seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
        if not k.startswith("projector."):
            assert torch.equal(v, before[k]), k
    assert all(not torch.equal(v, before[k]) for k, v in a.state_dict().items() if k.startswith("projector."))
    assert [r["step"] for r in log] == [2, 4] and log == [dict(r, seconds=x["seconds"]) for r, x in zip(log_b, log)]
    assert set(log[-1]["accuracy"]) == {"quadrant", "shape", "color", "size", "pooled_shape", "pooled_color", "pooled_size"}
    assert not any(p.requires_grad for p in a.projector.parameters())
    assert not any(p.requires_grad for p in a.vision_tower.parameters())
    c, _, _ = _pretrained(seed=2)
    assert not torch.equal(c.projector[0].weight, a.projector[0].weight)


def test_projector_stage_writes_a_llava_checkpoint_and_zero_steps_skip_it(tmp_path):
    from gracevlm.demo.recipe import RecipeConfig, prepare_workspace, projector_stage
    from gracevlm.models.loader import load_checkpoint

    cfg = RecipeConfig(work=str(tmp_path), n_train=8, n_heldout=2, arch=MICRO, tokenizer_vocab=320, tokenizer_lines=8,
                       projector_steps=2, projector_batch=2, threads=1, progress=False)
    paths = prepare_workspace(cfg)
    out = projector_stage(cfg, paths["init"], paths, force=False)
    log = json.loads((tmp_path / "projector" / "log.json").read_text())
    assert log[-1]["step"] == 2 and "quadrant" in log[-1]["accuracy"]
    loaded = load_checkpoint(out, dtype=torch.float32).model.state_dict()
    init = load_checkpoint(paths["init"], dtype=torch.float32).model.state_dict()
    changed = {k.split(".")[0] for k, v in loaded.items() if not torch.equal(v, init[k])}
    assert changed == {"projector"}
    assert projector_stage(cfg, paths["init"], paths, force=False) == out  # done already: skipped
    cfg.projector_steps = 0
    assert projector_stage(cfg, paths["init"], paths, force=False) == paths["init"]
