"""Run by test_triton_kernels.py in a subprocess with TRITON_INTERPRET=1 (the mode is fixed when triton is
imported, so it must not leak into the test process): the Triton W4A16 kernels on CPU tensors against the
exact reference. Prints one JSON object of measured errors and facts; the test asserts on them."""
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from int4_helpers import random_int4_layer  # noqa: E402

from gracevlm import kernels  # noqa: E402
from gracevlm.kernels.triton_w4a16 import w4a16_matmul  # noqa: E402

REF = kernels.get_backend("reference")
TRITON = kernels.get_backend("triton")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# (in_features, out_features, group, bias, symmetric): group 128, 32 and 64; N not a multiple of the tile
# (96, 200); zero points 8 (GRACE) and arbitrary.
SHAPES = [(256, 128, 128, False, True), (128, 96, 32, True, False), (192, 200, 64, False, False)]
# (kernel, rows, activation dtype): each kernel with each dtype, one and several rows
RUNS = [("gemv", 1, "float16"), ("gemv", 3, "bfloat16"), ("gemv", 8, "float32"),
        ("gemm", 1, "bfloat16"), ("gemm", 17, "float16"), ("gemm", 40, "float32")]


def _case(layer, state, kind, m, dname, gen, split_k=None, cast=False) -> dict:
    dtype = DTYPES[dname]
    x = torch.randn(m, layer.in_features, generator=gen).to(dtype)
    ref = REF.matmul(layer, x.to(torch.float32))  # x's values exactly, fp32 math
    y32 = w4a16_matmul(state, x, layer.group_size, out_dtype=torch.float32, kernel=kind, split_k=split_k)
    case = dict(shape=[layer.in_features, layer.out_features, layer.group_size], bias=layer.bias is not None,
                kernel=kind, rows=m, dtype=dname, split_k=split_k or 1,
                rel_l2=float((y32 - ref).norm() / ref.norm()))
    if cast:  # the output in x's dtype, cast in the kernel's epilogue (or the split-K reduction)
        y = w4a16_matmul(state, x, layer.group_size, kernel=kind, split_k=split_k)
        case["out_dtype"] = str(y.dtype).replace("torch.", "")
        case["cast_max_diff"] = float((y.float() - ref.to(dtype).float()).abs().max() / ref.abs().max())
    if split_k:
        again = w4a16_matmul(state, x, layer.group_size, out_dtype=torch.float32, kernel=kind, split_k=split_k)
        case["deterministic"] = bool(torch.equal(y32, again))
    return case


def kernel_cases(gen) -> list[dict]:
    out = []
    for i, (in_f, out_f, g, bias, sym) in enumerate(SHAPES):
        layer = random_int4_layer(in_f, out_f, g, bias, sym, gen)
        state = TRITON._prepare(layer)
        for j, (kind, m, dname) in enumerate(RUNS):
            out.append(_case(layer, state, kind, m, dname, gen, cast=(i + j) % 3 == 0))
    # split-K: 1024 inputs = 8 groups of 128, in 4 and 3 (uneven) splits, both kernels, reduction with bias
    layer = random_int4_layer(1024, 64, 128, True, True, gen)
    state = TRITON._prepare(layer)
    for kind, m, dname, split in (("gemv", 2, "float16", 4), ("gemm", 20, "bfloat16", 3)):
        out.append(_case(layer, state, kind, m, dname, gen, split_k=split, cast=True))
    return out


def layer_cases(gen) -> dict:
    res = {}
    for sym in (True, False):
        layer = random_int4_layer(256, 64, 64, True, sym, gen)
        before = layer.to_awq()
        layer.backend = "triton"
        x = torch.randn(5, 256, generator=gen).half()
        y_kept = layer(x)
        freed = kernels.get_backend("triton").release_awq(layer)
        after = layer.to_awq()
        sd = layer.state_dict()
        y_released = layer(x)
        ref = REF.matmul(layer, x.float())
        res["symmetric" if sym else "asymmetric"] = dict(
            released=bool(freed and layer.awq_released),
            to_awq_exact=all(torch.equal(getattr(before, n), getattr(after, n))
                             for n in ("qweight", "qzeros", "scales", "bias")),
            state_dict_exact=all(torch.equal(sd[n], getattr(before, n)) for n in ("qweight", "qzeros", "scales")),
            same_after_release=bool(torch.equal(y_kept, y_released)),
            rel_l2=float((y_released.float() - ref.float()).norm() / ref.float().norm()))
    res["auto_on_cpu"] = kernels.select_backend(torch.device("cpu"), 1).name
    res["available_on_cpu"] = TRITON.available(torch.device("cpu"))
    return res


def model_case(folder: str) -> dict:
    """A tiny synthesized checkpoint through load -> generate with backend='triton' vs 'reference'."""
    import gracevlm

    out = {}
    for backend in ("reference", "triton"):
        vlm = gracevlm.load(folder, device="cpu", backend=backend)
        layers = [m for m in vlm.model.modules() if hasattr(m, "kernel_cache")]
        res = vlm.generate("Describe the weather.", max_new_tokens=3)
        out[backend] = dict(tokens=res.token_ids, released=sum(m.awq_released for m in layers),
                            layers=len(layers))
    return out


def main() -> None:
    gen = torch.Generator().manual_seed(7)
    report = {"kernels": kernel_cases(gen), "layer": layer_cases(gen)}
    if len(sys.argv) > 1:
        report["model"] = model_case(sys.argv[1])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
