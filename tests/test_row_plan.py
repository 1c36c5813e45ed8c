"""The bound small-M kernel call (``kernels.native.RowPlan``) that ``Int4Linear`` and ``Int8Linear`` use for
decode-sized inputs: the same bits as their backend's ``matmul``, and never used where that backend would not
run it (another backend chosen, too many rows, gradients, other dtypes, weights replaced, the layer moved)."""
import pytest
import torch

from gracevlm import kernels
from gracevlm.kernels import native, native_int8
from gracevlm.kernels.native import RowPlan
from gracevlm.nn import Int8Linear

from int4_helpers import random_int4_layer

pytestmark = pytest.mark.skipif(native.load_library() is None or native_int8.load_library() is None,
                                reason="native libraries could not be built or loaded")


def int8_layer(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (48, 256), dtype=torch.int8, generator=gen)
    return Int8Linear(q, torch.rand(48, 2, generator=gen) * 0.02 + 1e-4, torch.randn(48, generator=gen), 128)


def backend_of(layer, rows):
    if isinstance(layer, Int8Linear):
        return native_int8.select_int8_backend(torch.device("cpu"), layer.backend)
    return kernels.select_backend(torch.device("cpu"), rows, layer.backend)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_plan_gives_the_backend_bits_and_is_used(kind, monkeypatch):
    layer = (random_int4_layer(256, 48, 128, True, False, torch.Generator().manual_seed(0)) if kind == "int4"
             else int8_layer())
    x = torch.randn(3, 1, 256)
    with torch.inference_mode():
        first = layer(x)  # builds the plan
        plan = layer.kernel_cache["row_plan"]
        assert isinstance(plan, RowPlan) and plan.takes(3) and not plan.takes(0)
        runs = []
        monkeypatch.setattr(RowPlan, "run", lambda self, x2, _run=RowPlan.run: runs.append(1) or _run(self, x2))
        again = layer(x)
        assert runs, "the plan was not used"
        assert torch.equal(again, first)
        assert torch.equal(again.view(3, -1), backend_of(layer, 3).matmul(layer, x.view(3, -1)))
        runs.clear()
        big = torch.randn(200, 256)  # above the crossover: the backend's GEMM path, not the plan
        assert torch.equal(layer(big), backend_of(layer, 200).matmul(layer, big))
        layer(x.double())
        assert not runs


def test_int4_plan_follows_the_backend_choice():
    layer = random_int4_layer(256, 48, 128, False, False, torch.Generator().manual_seed(1))
    x = torch.randn(1, 256)
    with torch.inference_mode():
        layer(x)
        assert isinstance(layer.kernel_cache["row_plan"], RowPlan)
        layer.backend = "dense"  # kernels.use_backend does this
        dense = kernels.get_backend("dense").matmul(layer, x)
        assert torch.equal(layer(x), dense)
        assert not torch.equal(dense, kernels.get_backend("native").matmul(layer, x))  # so the test can tell
        layer.backend = None
        assert torch.equal(layer(x), kernels.select_backend(x.device, 1).matmul(layer, x))
        assert isinstance(layer.kernel_cache["row_plan"], RowPlan)
    layer.float()  # any _apply drops the prepared layouts and the plan with them
    assert "row_plan" not in layer.kernel_cache


def test_plans_stay_out_of_autograd():
    layer = int8_layer(2)
    x = torch.randn(1, 256, requires_grad=True)
    with torch.inference_mode():
        layer(x.detach())
    y = layer(x)
    assert y.grad_fn is not None  # the dense path's graph, not the C call (it has no backward)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_int8_plan_not_used_after_the_weights_are_replaced():
    layer = int8_layer(3)
    x = torch.randn(1, 256)
    with torch.inference_mode():
        layer(x)
        other = int8_layer(4)
        layer.qweight = other.qweight.clone()  # a new tensor: the bound pointer must not be read
        layer.scales = other.scales.clone()
        expected = Int8Linear(other.qweight, other.scales, layer.bias, 128)  # the replaced weights, the same bias
        assert torch.equal(layer(x), native_int8.INT8_BACKENDS["native"].matmul(expected, x))


def test_copied_and_pickled_layers_bind_their_own_tensors():
    import copy
    import io

    layer = random_int4_layer(256, 48, 128, True, False, torch.Generator().manual_seed(5))
    x = torch.randn(1, 256)
    with torch.inference_mode():
        y = layer(x)
        twin = copy.deepcopy(layer)
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for other in (twin, loaded):
            assert not isinstance(other.kernel_cache["row_plan"], RowPlan)
            assert torch.equal(other(x), y)
            plan = other.kernel_cache["row_plan"]
            assert isinstance(plan, RowPlan) and plan.keep[0] is other.kernel_cache["native"]["packed"]
