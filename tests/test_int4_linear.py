"""Int4Linear: round trip, every backend against reference, dispatch, errors."""
import pytest
import torch

from gracevlm import kernels
from gracevlm.errors import FormatError, InputError
from gracevlm.formats.awq import pack_awq
from gracevlm.nn import Int4Linear
from int4_helpers import random_int4_layer

# relative L2 tolerance of each backend vs reference (stated in the backends' docstrings)
TOLERANCE = {"reference": 0.0, "dense": 1e-5, "int4pack": 1e-5, "int4pack-bf16": 1e-2,
             "native": 1e-5, "native-f32": 1e-5, "native-i8x2": 1.5e-4, "native-bf16": 6e-3,
             "native-igemm": 1e-4}


make_layer = random_int4_layer


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("backend", sorted(TOLERANCE))
@pytest.mark.parametrize("in_f, out_f, g, bias, symmetric", [
    (128, 8, 128, False, True), (256, 40, 64, True, False), (256, 4104, 128, False, True),
    (384, 64, 32, True, True), (256, 48, 256, False, False),
])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_backend_matches_reference(backend, in_f, out_f, g, bias, symmetric, rows, rng):
    layer = make_layer(in_f, out_f, g, bias, symmetric, rng)
    x = torch.randn(rows, in_f, generator=rng)
    layer.backend = "reference"
    ref = layer(x)
    layer.backend = backend
    y = layer(x)
    assert y.shape == (rows, out_f) and y.dtype == x.dtype
    assert rel_err(y, ref) <= TOLERANCE[backend]


def test_reference_is_the_definition(rng):
    layer = make_layer(256, 16, 128, True, False, rng)
    from gracevlm.formats.awq import dequantize_awq
    w = dequantize_awq(layer.qweight, layer.qzeros, layer.scales, 128)
    x = torch.randn(2, 5, 256, generator=rng)
    layer.backend = "reference"
    torch.testing.assert_close(layer(x), x @ w + layer.bias.float(), rtol=0, atol=0)


def test_leading_shapes_and_dtypes(rng):
    layer = make_layer(256, 32, 128, False, True, rng)
    layer.backend = "dense"
    x = torch.randn(2, 3, 4, 256, generator=rng)
    assert layer(x).shape == (2, 3, 4, 32)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert layer(x[..., ::1].transpose(0, 1)).shape == (3, 2, 4, 32)
    with pytest.raises(ValueError, match=r"expects input \[..., 256\]"):
        layer(torch.randn(2, 255))


def test_to_awq_round_trip_is_exact(rng):
    layer = make_layer(256, 24, 64, True, False, rng)
    before = layer.to_awq()
    layer.backend = "int4pack"
    layer(torch.randn(1, 256))  # backends prepare their own layouts; the originals must stay intact
    layer.backend = "dense"
    layer(torch.randn(4, 256))
    after = layer.to_awq()
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(before, name), getattr(after, name))
    assert after.group_size == 64
    assert layer.cache_nbytes() > 0 and layer.nbytes() == 256 * 24 // 2 + 4 * 3 * 4 + 4 * 24 * 2 + 24 * 2


def test_state_dict_holds_exactly_the_awq_tensors(rng):
    layer = make_layer(128, 16, 128, False, True, rng)
    layer(torch.randn(1, 128))
    assert sorted(layer.state_dict()) == ["qweight", "qzeros", "scales"]
    assert "bits=4" in repr(layer) and "group_size=128" in repr(layer)
    assert layer.symmetric


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    assert kernels.select_backend(cpu, 1).name in kernels.backend_names()
    assert kernels.select_backend(cpu, 1, "reference").name == "reference"
    monkeypatch.setenv("GRACEVLM_BACKEND", "dense")  # read once per load (backend_choice), not per forward
    assert kernels.select_backend(cpu, 1).name != "dense" or kernels.backend_choice() == "dense"
    assert kernels.backend_choice() == "dense"
    assert kernels.backend_choice("reference") == "reference"  # argument wins
    assert kernels.select_backend(cpu, 1, kernels.backend_choice()).name == "dense"
    monkeypatch.setenv("GRACEVLM_BACKEND", "nope")
    with pytest.raises(InputError, match="unknown INT4 backend 'nope'"):
        kernels.backend_choice()


@pytest.mark.parametrize("fast", [False, True])
def test_native_bf16_warns_where_bf16_is_emulated(monkeypatch, fast):
    """The opt-in bf16 paths (backend native-bf16 at load or by use_backend, a bf16 vision tower) warn on a
    CPU without AVX512-BF16/AMX and stay silent where it has them."""
    import warnings

    import gracevlm
    from gracevlm.engine import vlm as vlm_module

    monkeypatch.setattr(kernels, "cpu_has_fast_bf16", lambda: fast)
    model = torch.nn.Sequential(random_int4_layer(64, 16, 64, False, True, torch.Generator().manual_seed(0)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.backend_choice("native-bf16") == "native-bf16"
        kernels.use_backend(model, "native-bf16")
        kernels.backend_choice("native")  # the exact default never warns
        class Stop(Exception):
            pass

        def no_checkpoint(*args, **kwargs):
            raise Stop

        monkeypatch.setattr(vlm_module, "load_checkpoint", no_checkpoint)
        with pytest.raises(Stop):  # the warning comes before the checkpoint is read
            gracevlm.load("unused", device="cpu", vision_dtype="bfloat16")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if fast:
        assert messages == []
    else:
        assert len(messages) == 3 and all("no AVX512-BF16 or AMX" in m and "emulated" in m for m in messages)
        assert "'native-bf16'" in messages[0] and "vision tower" in messages[2]
    assert model[0].backend == "native-bf16"


def test_use_backend_switches_a_model(monkeypatch):
    rng = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(make_layer(128, 16, 128, False, True, rng), make_layer(128, 16, 128, False, True, rng))
    kernels.use_backend(model, "reference")
    assert [m.backend for m in model] == ["reference", "reference"]
    kernels.use_backend(model, "auto")
    assert [m.backend for m in model] == [None, None]
    with pytest.raises(InputError, match="unknown INT4 backend"):
        kernels.use_backend(model, "nope")


def test_constructor_validates():
    qweight, qzeros = pack_awq(torch.zeros(256, 16, dtype=torch.uint8), torch.zeros(2, 16, dtype=torch.uint8))
    with pytest.raises(FormatError, match="blk.scales has shape"):
        Int4Linear.from_awq(qweight, qzeros, torch.ones(2, 8).half(), name="blk")
    with pytest.raises(FormatError, match="bias has shape"):
        Int4Linear.from_awq(qweight, qzeros, torch.ones(2, 16).half(), bias=torch.ones(8))


def test_concat_and_split_are_exact(rng):
    parts = [make_layer(256, n, 128, bias=True, symmetric=True, gen=rng) for n in (32, 16, 48)]
    fused = Int4Linear.concat(parts)
    x = torch.randn(3, 256, generator=rng)
    for p in parts + [fused]:
        p.backend = "reference"
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=0)
    for part, back in zip(parts, fused.split_awq([32, 16, 48])):
        orig = part.to_awq()
        for name in ("qweight", "qzeros", "scales", "bias"):
            assert torch.equal(getattr(orig, name), getattr(back, name))
    with pytest.raises(ValueError, match="multiples of 8"):
        fused.split_awq([30, 66])


@pytest.mark.parametrize("backend", sorted(TOLERANCE))
def test_backends_work_in_and_out_of_inference_mode(backend, rng):
    """Scratch buffers and prepared layouts made under inference_mode must not break later normal calls."""
    layer = make_layer(128, 40, 128, bias=True, symmetric=True, gen=rng)
    layer.backend = backend
    x = torch.randn(2, 128, generator=rng)
    with torch.inference_mode():
        inside = layer(x)
    torch.testing.assert_close(layer(x), inside)


def test_selfcheck_reports_every_backend_within_its_tolerance(capsys):
    from gracevlm.cli import main as cli

    assert cli(["selfcheck", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cpu = torch.device("cpu")
    assert set(report) == {n for n in kernels.backend_names() if kernels.get_backend(n).available(cpu)}
    for name, errs in report.items():
        assert set(errs) == {"rows_4", "rows_64"}
        assert max(errs.values()) <= max(TOLERANCE.get(name, 1e-5), 1e-6), name
