"""The demo recipe's vision stage: ground-truth targets agree with the pictures, the pretraining is
deterministic, changes only the CLIP tower, and the recipe stage writes a checkpoint that loads as LLaVA."""
import json
import random

import pytest
import torch

from gracevlm.demo.model_def import DemoArch, build_model
from gracevlm.demo.vision_pretrain import CLASSES, QuadrantHead, draw_batch, pretrain_vision, scene_targets
from gracevlm.demo.world import COLORS, QUADRANTS, SHAPES, SIZES, draw_scene, make_scene
from gracevlm.models.llava.processing import ImageSpec, preprocess_image

MICRO = DemoArch(hidden=128, intermediate=128, layers=1, heads=2, vocab=320, max_positions=256, vision_hidden=32,
                 vision_intermediate=64, vision_layers=2, vision_heads=2, image_size=32, patch_size=16)
SPEC = ImageSpec(size=32, aspect="pad")


def _preprocess(img):
    return preprocess_image(img, SPEC)


def test_targets_name_what_the_picture_shows():
    rng = random.Random(5)
    for _ in range(40):
        scene = make_scene(rng)
        t = scene_targets(scene)
        assert t.shape == (3, 4) and int((t[0] > 0).sum()) == len(scene.objects)
        assert ((t[0] > 0) == (t[1] > 0)).all() and ((t[0] > 0) == (t[2] > 0)).all()
        img = draw_scene(scene)
        for q in range(4):
            if t[0, q] == 0:
                continue
            o = next(o for o in scene.objects if o.quadrant == q)
            # the quadrant's colour class is the colour of the pixel at the object's centre
            assert img.getpixel((o.cx, o.cy)) == COLORS[tuple(COLORS)[t[1, q] - 1]]
            assert SHAPES[t[0, q] - 1] == o.shape and tuple(SIZES)[t[2, q] - 1] == o.size
            x, y = o.cx // 32, o.cy // 32
            assert QUADRANTS[q] == f"{('top', 'bottom')[y]} {('left', 'right')[x]}"


def test_head_shapes_and_batches():
    pixels, targets = draw_batch(random.Random(0), 3, _preprocess)
    assert pixels.shape == (3, 3, 32, 32) and targets.shape == (3, 3, 4)
    logits = QuadrantHead(32)(torch.randn(3, 4, 32))
    assert [tuple(lg.shape) for lg in logits] == [(3, 4, CLASSES[t]) for t in ("shape", "color", "size")]


def _pretrained(seed):
    torch.set_num_threads(1)
    model = build_model(MICRO, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = pretrain_vision(model, _preprocess, steps=4, batch_size=4, lr=1e-3, seed=seed, warmup=2, log_every=2,
                          progress=False)
    return model, before, log


def test_pretraining_is_deterministic_and_changes_only_the_tower():
    a, before, log = _pretrained(seed=1)
    b, _, log_b = _pretrained(seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
        changed = not torch.equal(v, before[k])
        if not k.startswith("vision_tower."):
            assert not changed, k
    assert any(not torch.equal(v, before[k]) for k, v in a.state_dict().items() if k.startswith("vision_tower."))
    assert [r["step"] for r in log] == [2, 4] and log == [dict(r, seconds=x["seconds"]) for r, x in zip(log_b, log)]
    assert set(log[-1]["accuracy"]) == {"shape", "color", "size"}
    assert not any(p.requires_grad for p in a.vision_tower.parameters())
    c, _, _ = _pretrained(seed=2)
    assert not torch.equal(c.vision_tower.embeddings.patch_embedding.weight,
                           a.vision_tower.embeddings.patch_embedding.weight)


def test_vision_stage_writes_a_llava_checkpoint(tmp_path):
    from gracevlm.demo.recipe import RecipeConfig, prepare_workspace, vision_stage
    from gracevlm.models.loader import load_checkpoint

    cfg = RecipeConfig(work=str(tmp_path), n_train=8, n_heldout=2, arch=MICRO, tokenizer_vocab=320, tokenizer_lines=8,
                       vision_steps=2, vision_batch=2, threads=1, progress=False)
    paths = prepare_workspace(cfg)
    out = vision_stage(cfg, paths, force=False)
    log = json.loads((tmp_path / "vision" / "log.json").read_text())
    assert log[-1]["step"] == 2 and "accuracy" in log[-1]
    loaded = load_checkpoint(out, dtype=torch.float32)
    init = load_checkpoint(paths["init"], dtype=torch.float32)
    assert type(loaded.model.vision_tower).__name__ == "CLIPVisionTower"  # the CLIP architecture, as before
    tower = {k: v for k, v in loaded.model.state_dict().items() if k.startswith("vision_tower.")}
    assert any(not torch.equal(v, init.model.state_dict()[k]) for k, v in tower.items())
    assert torch.equal(loaded.model.language_model.lm_head.weight, init.model.language_model.lm_head.weight)
    assert vision_stage(cfg, paths, force=False) == out  # done already: skipped


def test_patch_quadrants_follow_the_grid_halves_at_every_padded_view():
    from gracevlm.demo.vision_pretrain import patch_quadrants

    assert patch_quadrants(4).tolist() == [0, 1, 2, 3]
    assert patch_quadrants(16).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        patch_quadrants(9)
    # LLaVA's symmetric padding keeps a picture's midlines on the square's: every object's pixels fall in the
    # patches patch_quadrants gives its quadrant, for square and non-square views alike
    spec = ImageSpec(size=64, aspect="pad")
    quad = patch_quadrants(16).view(4, 4)
    rng = random.Random(2)
    for view in ((64, 64), (200, 150), (150, 200), (256, 192)):
        for _ in range(10):
            scene = make_scene(rng)
            pixels = preprocess_image(draw_scene(scene, *view), spec)
            blank = preprocess_image(draw_scene(type(scene)(scene.background, ()), *view), spec)
            ys, xs = torch.nonzero((pixels - blank).abs().amax(0) > 0.3).unbind(1)  # where an object is drawn
            assert set(quad[ys // 16, xs // 16].tolist()) <= {o.quadrant for o in scene.objects}


def test_dense_loss_targets_each_patch_with_its_quadrants_object():
    from gracevlm.demo.vision_pretrain import PatchHead, dense_loss, patch_quadrants

    targets = scene_targets(make_scene(random.Random(4))).unsqueeze(0)  # [1, 3, 4]
    quad = patch_quadrants(16)
    # logits that put all mass on each patch's quadrant class give ~0 loss; on class 0 everywhere, more
    perfect = [torch.nn.functional.one_hot(targets[0, i][quad], CLASSES[t]).float().unsqueeze(0) * 50
               for i, t in enumerate(("shape", "color", "size"))]
    wrong = [torch.zeros_like(lg) for lg in perfect]
    assert float(dense_loss(perfect, targets)) < 1e-6 < float(dense_loss(wrong, targets))
    logits = PatchHead(32)(torch.randn(2, 16, 32))
    assert [tuple(lg.shape) for lg in logits] == [(2, 16, CLASSES[t]) for t in ("shape", "color", "size")]
    model = build_model(MICRO, seed=0)
    log = pretrain_vision(model, _preprocess, steps=2, batch_size=2, lr=1e-3, seed=0, warmup=1, log_every=1,
                          progress=False, dense_weight=1.0)
    assert len(log) == 2 and log[-1]["loss"] > 0
