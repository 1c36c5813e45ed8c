"""CUDA-only: the Triton kernels compiled for the GPU, and ``--device cuda`` end to end on a tiny synthesized
checkpoint (load straight to the GPU, generation parity with the CPU, the scheduler). Skipped without a GPU
(``benchmarks/gpu_check.sh`` runs them on one). Tolerances as in test_triton_kernels.py, plus the GPU's own
fp32 sum order."""
import sys
from pathlib import Path

import pytest
import torch

from gracevlm import kernels
from gracevlm.kernels import triton_w4a16

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(triton_w4a16.triton_version() is None, reason="triton is not installed"),
              pytest.mark.skipif(triton_w4a16.interpreting(), reason="TRITON_INTERPRET is set")]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_helpers import random_int4_layer  # noqa: E402

CUDA = torch.device("cuda")
REF = kernels.get_backend("reference")


@pytest.mark.parametrize("shape", [(256, 128, 128, False, True), (4096, 4096, 128, False, True),
                                   (11008, 512, 128, True, False), (512, 200, 64, True, True),
                                   (256, 96, 32, False, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 33, 512])
def test_kernel_on_device_matches_reference(shape, dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    layer = random_int4_layer(*shape, gen).to(CUDA)
    layer.backend = "triton"
    x = torch.randn(rows, shape[0], generator=gen).to(dtype).to(CUDA)
    ref = REF.matmul(layer, x.to(torch.float32))
    state = kernels.get_backend("triton")._prepare(layer)
    y32 = triton_w4a16.w4a16_matmul(state, x, layer.group_size, out_dtype=torch.float32)
    assert float((y32 - ref).norm() / ref.norm()) <= 2e-6
    y = layer(x)
    assert y.dtype == dtype and y.device.type == "cuda"
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-6}[dtype]
    assert float((y.float() - ref.to(dtype).float()).abs().max() / ref.abs().max()) <= 2 * ulp


def test_both_kernels_and_split_k_on_device():
    gen = torch.Generator().manual_seed(3)
    layer = random_int4_layer(4096, 1024, 128, True, True, gen).to(CUDA)
    state = kernels.get_backend("triton")._prepare(layer)
    for kind, rows in (("gemv", 1), ("gemv", 8), ("gemm", 1), ("gemm", 64)):
        x = torch.randn(rows, 4096, generator=gen).half().to(CUDA)
        ref = REF.matmul(layer, x.float())
        for split in (None, 1, 5, 32):
            y = triton_w4a16.w4a16_matmul(state, x, 128, out_dtype=torch.float32, kernel=kind, split_k=split)
            again = triton_w4a16.w4a16_matmul(state, x, 128, out_dtype=torch.float32, kernel=kind, split_k=split)
            assert torch.equal(y, again), (kind, rows, split)
            assert float((y - ref).norm() / ref.norm()) <= 2e-6, (kind, rows, split)


def test_release_on_device_rebuilds_awq_exactly():
    gen = torch.Generator().manual_seed(5)
    for sym in (True, False):
        layer = random_int4_layer(512, 256, 128, True, sym, gen).to(CUDA)
        before = layer.to_awq()
        assert kernels.select_backend(layer.device, 1).name == "triton"
        assert kernels.get_backend("triton").release_awq(layer) and layer.awq_released
        after = layer.to_awq()
        for n in ("qweight", "qzeros", "scales", "bias"):
            assert torch.equal(getattr(before, n), getattr(after, n)), n
        x = torch.randn(3, 512, generator=gen).half().to(CUDA)
        ref = REF.matmul(layer, x.float())
        assert float((layer(x).float() - ref).norm() / ref.norm()) <= 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gracevlm.synth.checkpoint import synthesize

    return synthesize(tmp_path_factory.mktemp("tiny") / "tiny-awq", "tiny", "awq", seed=7, progress=False)


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 40), (200, 30, 30))


def test_load_straight_to_gpu(tiny):
    import gracevlm
    from gracevlm.nn import Int4Linear

    vlm = gracevlm.load(tiny, device="cuda")
    for name, t in list(vlm.model.named_parameters()) + list(vlm.model.named_buffers()):
        assert t.device.type == "cuda", name
    layers = [m for m in vlm.model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.awq_released and "triton" in m.kernel_cache for m in layers)
    assert next(vlm.model.vision_tower.parameters()).dtype == torch.float16
    assert vlm.model.new_cache(1, 8).device.type == "cuda"


def test_cuda_greedy_tokens_equal_cpu(tiny):
    import gracevlm

    cpu = gracevlm.load(tiny, device="cpu")
    gpu32 = gracevlm.load(tiny, device="cuda", dtype=torch.float32)
    for prompt, images in (("Describe the image.", [_image()]), ("Tell me a story.", [])):
        want = cpu.generate(prompt, images=images, max_new_tokens=12)
        got = gpu32.generate(prompt, images=images, max_new_tokens=12)
        assert got.token_ids == want.token_ids, prompt
    gpu16 = gracevlm.load(tiny, device="cuda")  # fp16 everywhere: next-token logits close to the CPU's fp32
    want, got = _next_logits(cpu, "Tell me a story."), _next_logits(gpu16, "Tell me a story.").cpu()
    assert float((got - want).norm() / want.norm()) <= 1e-2
    assert int(want.argmax()) in got.topk(5).indices.tolist()


def _next_logits(vlm, text):
    from gracevlm.engine.prepare import prepare_prompt

    ids = prepare_prompt(vlm, text).prompt_ids
    lm = vlm.model.language_model
    with torch.inference_mode():
        embeds = vlm.model.embed_prompt(ids, None)[None]
        cache = vlm.model.new_cache(1, embeds.shape[1] + 1)
        pos = torch.arange(embeds.shape[1], device=embeds.device)[None]
        return lm(embeds, pos, cache)[0].float()


def test_scheduler_on_gpu_batches_like_sequential(tiny):
    import gracevlm
    from gracevlm.engine.sampling import SamplingParams
    from gracevlm.engine.scheduler import BatchScheduler

    vlm = gracevlm.load(tiny, device="cuda", dtype=torch.float32)
    prompts = ["Hi", "Describe the weather", "Count to five", "zzz"]
    want = [vlm.generate(p, max_new_tokens=6).token_ids for p in prompts]
    with BatchScheduler(vlm, max_batch_size=4) as sched:
        handles = [sched.submit_chat([{"role": "user", "content": p}], SamplingParams(max_new_tokens=6))
                   for p in prompts]
        got = [h.result(timeout=120).token_ids for h in handles]
    assert got == want


def test_seeded_sampling_on_gpu_equals_cpu(tiny):
    import gracevlm

    cpu = gracevlm.load(tiny, device="cpu")
    gpu = gracevlm.load(tiny, device="cuda", dtype=torch.float32)
    kw = dict(max_new_tokens=5, temperature=0.7, top_p=0.9, seed=3)
    assert gpu.generate("Hi there", **kw).token_ids == cpu.generate("Hi there", **kw).token_ids
