"""LSQLinear (forward, gradients, scale layout and initialization), prepare() and the QAT/AWQ exports."""
import math

import pytest
import torch
from torch import nn

from gracevlm.formats.awq import GRACE_ZERO_WORD
from gracevlm.formats.qat import SIDECAR_NAME, qat_to_awq, read_qat_sidecar
from gracevlm.nn import LSQLinear
from gracevlm.nn.lsq import LOG_SCALE_MIN, lsq_fake_quantize, mse_scale_init
from gracevlm.train import export_awq, checkpoint_config, lsq_layers, prepare


def _linear(out_f, in_f, seed=0, bias=False):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


def test_shares_weight_and_flat_scale_layout():
    lin = _linear(8, 256)
    q = LSQLinear(lin)
    assert q.weight is lin.weight and q.bias is None
    assert q.log_scale.shape == (8 * 256 // 128,) and q.log_scale.dtype == torch.float32
    # distinct scale per (row, group) in the flat layout o * (I/g) + i // g
    with torch.no_grad():
        q.log_scale.copy_(torch.log(torch.arange(1, 17, dtype=torch.float32) * 0.01))
    s = q.scales()
    for o in range(8):
        for i in (0, 127, 128, 255):
            assert s[o, i // 128].item() == pytest.approx((o * 2 + i // 128 + 1) * 0.01, rel=1e-6)
    wq = q.quantized_weight()
    s_full = s.repeat_interleave(128, dim=1)
    want = torch.clamp(torch.round(lin.weight / s_full), -8, 7) * s_full
    torch.testing.assert_close(wq, want, rtol=0, atol=0)
    x = torch.randn(3, 256)
    torch.testing.assert_close(q(x), x @ want.T)
    with torch.no_grad():
        lin.weight.mul_(2)  # shared: the wrapper sees the change
    assert not torch.equal(q.quantized_weight(), wq)


def test_one_group_per_row_when_not_divisible():
    q = LSQLinear(_linear(16, 96))
    assert q.group_size == 96 and q.log_scale.numel() == 16
    assert q.codes().abs().max() <= 8


def test_ste_gradient_of_weight():
    w = torch.tensor([[0.05, 0.69, 0.71, -0.79, -0.81, 1.5, -2.0, 0.0]]).repeat(8, 16)  # [8, 128]
    scale = torch.full((8, 1), 0.1)
    w.requires_grad_(True)
    out = lsq_fake_quantize(w, scale)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    x = w.detach() / 0.1
    inside = (x >= -8) & (x <= 7)
    assert inside.sum() < inside.numel()  # some values are clamped
    torch.testing.assert_close(w.grad, upstream * inside)


def test_scale_gradient_matches_lsq_formula():
    torch.manual_seed(1)
    lin = _linear(8, 256)
    q = LSQLinear(lin)
    with torch.no_grad():
        q.log_scale.sub_(0.7)  # shrink scales so that some weights clamp
    wq = q.quantized_weight()
    upstream = torch.randn_like(wq)
    (wq * upstream).sum().backward()
    s = q.scales().detach()
    x = lin.weight.detach().view(8, 2, 128) / s.unsqueeze(-1)
    qv = torch.round(x).clamp(-8, 7)
    inside = (x >= -8) & (x <= 7)
    assert (~inside).any()
    ds = (upstream.view(8, 2, 128) * torch.where(inside, qv - x, qv)).sum(-1)
    factor = 1.0 / math.sqrt(128 * 7)
    assert q.grad_factor == pytest.approx(factor)
    want = (ds * factor * s).reshape(-1)  # chain rule through s = exp(log_scale)
    torch.testing.assert_close(q.log_scale.grad, want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(lin.weight.grad, upstream * inside.view(8, 256))


def test_scale_gradient_against_autograd_reference():
    """A plain-autograd LSQ (round STE + gradient-scale trick) gives the same scale gradient."""
    torch.manual_seed(2)
    w = torch.randn(16, 128) * 0.05
    log_s = torch.log(torch.rand(16, 1) * 0.01 + 0.004).requires_grad_(True)
    s = log_s.exp()
    f = 1.0 / math.sqrt(128 * 7)
    s_scaled = s * f + (s - s * f).detach()
    xv = torch.clamp(w / s_scaled, -8, 7)
    ref = ((xv.round() - xv).detach() + xv) * s_scaled
    up = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), log_s)
    log_s2 = log_s.detach().clone().requires_grad_(True)
    out = lsq_fake_quantize(w, log_s2.exp(), grad_factor=f)
    (g,) = torch.autograd.grad((out * up).sum(), log_s2)
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-8)


def test_log_scale_clamped_in_forward():
    q = LSQLinear(_linear(8, 128))
    with torch.no_grad():
        q.log_scale.fill_(-100.0)
    assert torch.allclose(q.scales(), torch.full((8, 1), math.exp(LOG_SCALE_MIN)))
    q.quantized_weight().sum().backward()
    assert torch.equal(q.log_scale.grad, torch.zeros_like(q.log_scale))


def test_mse_init_beats_or_equals_max_scale():
    torch.manual_seed(3)
    w = torch.randn(32, 256) * 0.02
    w[0, 5] = 0.5  # an outlier makes clipping worthwhile for that group
    s_mse = mse_scale_init(w)
    s_max = mse_scale_init(w, ratios=(1.0,))
    torch.testing.assert_close(s_max, w.view(32, 2, 128).abs().amax(-1) / 7)

    def err(s):
        x = w.view(32, 2, 128) / s.unsqueeze(-1)
        return ((torch.round(x).clamp(-8, 7) * s.unsqueeze(-1) - w.view(32, 2, 128)) ** 2).sum(-1)

    assert (err(s_mse) <= err(s_max) + 1e-12).all()
    assert err(s_mse).sum() < err(s_max).sum()
    assert LSQLinear(nn.Linear(128, 8), init="max").log_scale.numel() == 8


def _tiny_model():
    from gracevlm.demo.model_def import DemoArch, build_model

    arch = DemoArch(hidden=128, intermediate=256, layers=2, heads=2, vocab=320, max_positions=256,
                    vision_hidden=128, vision_intermediate=256, vision_layers=2, vision_heads=2, image_size=32,
                    patch_size=16)
    return build_model(arch, seed=0)


def test_prepare_replaces_exactly_the_language_model_linears():
    model = _tiny_model()
    n = prepare(model)
    names = sorted(lsq_layers(model))
    assert n == 14 == len(names)
    assert all(name.startswith("language_model.model.layers.") for name in names)
    assert isinstance(model.language_model.lm_head, nn.Linear)
    assert type(model.projector[0]) is nn.Linear
    assert not any(isinstance(m, LSQLinear) for m in model.vision_tower.modules())
    assert prepare(model) == 0  # idempotent: already wrapped


def test_prepare_on_transformers_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=16),
                      text_config=LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                              num_attention_heads=2, vocab_size=300), image_token_index=299)
    model = LlavaForConditionalGeneration(cfg)
    assert prepare(model) == 14
    names = sorted(lsq_layers(model))
    assert all(".language_model.layers." in n for n in names)


def test_export_pack_load_matches_fake_quant_student(tmp_path):
    """Student (fake-quant, fp32) -> export_awq (gracevlm pack code path) -> gracevlm.load: same logits up to
    the fp16 rounding of the scales (the only change packing makes). Tolerance: max |diff| <= 2e-3 * max|logit|."""
    from gracevlm.demo.world import draw_scene, generate_split, sample_corpus
    from gracevlm.engine.vlm import load
    from gracevlm.models.llava.processing import ImageSpec, preprocess_images
    from gracevlm.models.llava.chat import render_prompt, tokenize_with_images
    from gracevlm.models.tokenizer import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok", sample_corpus(), 320)
    model = _tiny_model().eval()
    prepare(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lsq_layers(model).values():
            layer.log_scale.add_(0.1 * torch.randn(layer.log_scale.shape, generator=g))
    report = export_awq(model, tmp_path / "awq", checkpoint_config(model), tmp_path / "tok", dtype=torch.float32,
                        qat_dir=tmp_path / "qat")
    assert report.layers == 14 and report.max_code_error == 0

    # the sidecar is GRACE's: baked weight (= safetensors), flat fp32 log_scale, codes recoverable exactly
    side = read_qat_sidecar(tmp_path / "qat" / SIDECAR_NAME)
    assert sorted(side) == sorted(n.replace("language_model.", "", 1) for n in lsq_layers(model))
    for name, layer in lsq_layers(model).items():
        entry = side[name.replace("language_model.", "", 1)]
        assert entry.log_scale.dtype == torch.float32 and entry.log_scale.shape == layer.log_scale.shape
        assert torch.equal(entry.log_scale, layer.log_scale.detach())
        assert torch.equal(entry.weight, layer.quantized_weight().detach())
        packed = qat_to_awq(entry.weight, entry.log_scale)
        assert bool((packed.qzeros == GRACE_ZERO_WORD).all())

    vlm = load(tmp_path / "awq", device="cpu")
    assert vlm.loaded.stats.format == "grace-awq"
    record, scene = generate_split("heldout", 1, 0)[0]
    image = draw_scene(scene, 32)
    prompt = render_prompt([{"role": "user", "content": "<image>\n" + "What color is the circle?"}])
    ids = tokenize_with_images(prompt, tok)

    def logits(m):
        pix = preprocess_images([image], ImageSpec(size=32))
        emb = m.embed_prompt(ids, m.encode_images(pix)).unsqueeze(0)
        cache = m.new_cache(1, emb.shape[1])
        with torch.no_grad():
            return m.language_model(emb, torch.arange(emb.shape[1]).unsqueeze(0), cache, logits_for="all")

    ref, got = logits(model), logits(vlm.model)
    rel = float((got - ref).abs().max() / ref.abs().max())
    print("relative logit difference", rel)
    assert 0.0 < rel <= 2e-3, rel  # measured 2e-4: fp16 scales make it close, not bit-exact
