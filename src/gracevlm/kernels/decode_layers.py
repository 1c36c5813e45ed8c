"""A stack of pre-norm decoder layers' single-sequence decode step in one native call (``csrc/gv_layer.c``), and
the SwiGLU activation ``silu(gate) * up`` in one.

``silu_mul(gate, up)``: fp32 CPU rows -> ``silu(gate) * up`` from our own exp (within ~2 ulp of exact; each
element's bits depend only on its inputs), or None where the native path does not apply (then callers use
torch's ``F.silu(gate) * up``). Switch: ``GRACEVLM_NATIVE_NORM`` (with the norms: one family of per-token ops).

``LinearCall.of(plan)``: an ``Int4Linear`` / ``Int8Linear``'s bound small-M kernel (``row_plan_for(1)``) as the
C struct ``gv_decode_layers`` calls through, or None. ``LayerStack`` holds the structs
of n layers and ``run(x, cos, sin, store, span)`` steps them: bitwise the same C calls the layer-by-layer path
makes (``norm_rope.rms_norm``, each linear's ``RowPlan``, ``attention.decode_block``, ``silu_mul``, fp32
adds), without the Python between them. Which models' layers fit is decided in ``models``; this module only
binds pointers. Switch: ``GRACEVLM_NATIVE_LAYERS=0`` or ``set_enabled(False)``.
"""
from __future__ import annotations

import ctypes

import torch

from . import native, native_int8, norm_rope

_switch = native.NativeSwitch("GRACEVLM_NATIVE_LAYERS")
enabled, set_enabled = _switch.enabled, _switch.set_enabled

KV_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # what gv_attn_block_decode writes and reads


class _Linear(ctypes.Structure):
    _fields_ = [("fn", ctypes.c_void_p), ("w0", ctypes.c_void_p), ("w1", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("kind", ctypes.c_int64), ("in_f", ctypes.c_int64), ("out_f", ctypes.c_int64),
                ("group", ctypes.c_int64), ("ss", ctypes.c_int64), ("mode", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear),
                ("down", _Linear)]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``gate, up [..., n]`` fp32 CPU (rows of stride >= n, last stride 1, e.g. the halves of a fused gate/up
    output) -> contiguous ``[..., n]``, or None (see the module)."""
    if (not norm_rope.enabled() or gate.dtype != torch.float32 or up.dtype != torch.float32 or not gate.is_cpu
            or not up.is_cpu or gate.shape != up.shape or gate.dim() < 1
            or torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return None
    n = gate.shape[-1]
    g2, u2 = _rows(gate, n), _rows(up, n)
    lib = native_int8.load_library()
    if g2 is None or u2 is None or lib is None:
        return None
    out = torch.empty(gate.shape, dtype=torch.float32)
    if lib.gv_silu_mul(g2.data_ptr(), g2.stride(0), u2.data_ptr(), u2.stride(0), out.data_ptr(), max(n, 1),
                       g2.shape[0], n) != 0:
        return None
    return out


def _rows(t: torch.Tensor, n: int) -> torch.Tensor | None:
    """``t`` as a 2-D ``[rows, n]`` view with last stride 1 and row stride >= n (a copy where needed)."""
    rows = t.reshape(-1, n) if t.numel() else t.reshape(0, n)
    if n and (rows.stride(1) != 1 or rows.stride(0) < n):
        rows = rows.contiguous()
    return rows


class LinearCall:
    """One linear's small-M C entry point with its arguments (a ``RowPlan`` seen from C)."""

    __slots__ = ("plan", "struct")

    def __init__(self, plan, struct: _Linear):
        self.plan, self.struct = plan, struct

    @classmethod
    def of(cls, plan) -> "LinearCall | None":
        """From a layer's bound kernel (``native.RowPlan``, e.g. ``Int4Linear.row_plan_for(1)``) when it is the
        native INT4 or INT8 small-M matmul; None for any other kernel (this struct cannot describe it)."""
        if not hasattr(plan, "fn") or len(plan.head) != 5:
            return None
        lib4, lib8 = native.load_library(), native_int8.load_library()
        fn = ctypes.cast(plan.fn, ctypes.c_void_p).value
        if lib4 is not None and fn == ctypes.cast(lib4.gv_matmul, ctypes.c_void_p).value:
            packed, i, o, g, ss = plan.head
            s = _Linear(fn, packed, None, plan.bias_ptr, 4, i, o, g, ss, plan.backend.mode)
        elif lib8 is not None and fn == ctypes.cast(lib8.gv8_matmul, ctypes.c_void_p).value:
            q, scales, i, o, g = plan.head
            s = _Linear(fn, q, scales, plan.bias_ptr, 8, i, o, g, 0, 0)
        else:
            return None
        return cls(plan, s)

    @property
    def in_features(self) -> int:
        return int(self.struct.in_f)

    @property
    def out_features(self) -> int:
        return int(self.struct.out_f)


class LayerStack:
    """n layers' structs for ``gv_decode_layers``. Each entry of ``layers`` is a dict: ``in_norm, post_norm``
    ([D] fp32), ``q_norm, k_norm`` ([d] fp32 or None), ``qkv, o, gate_up, down`` (``LinearCall``); ``keep``
    holds the tensors pointed to."""

    def __init__(self, layers: list[dict], hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int,
                 eps: float, qk_eps: float):
        self.n, self.hidden, self.heads, self.kv_heads, self.head_dim, self.inter = (
            len(layers), hidden, heads, kv_heads, head_dim, inter)
        self.eps, self.qk_eps = float(eps), float(qk_eps)
        self.scale = head_dim ** -0.5
        self.array = (_Layer * len(layers))()
        self.keep = []
        for dst, src in zip(self.array, layers):
            for name in ("in_norm", "post_norm", "q_norm", "k_norm"):
                t = src[name]
                setattr(dst, name, None if t is None else t.data_ptr())
                self.keep.append(t)
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(dst, name, src[name].struct)
        self.scratch_numel = 2 * hidden + (2 * heads + 2 * kv_heads) * head_dim + 3 * inter

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, store: torch.Tensor,
            span: int) -> torch.Tensor:
        """``x [D]`` fp32 (updated in place and returned); ``cos/sin [d]`` fp32 contiguous; ``store [layers, 2,
        KVH, capacity, d]`` the sequence's KV (fp32 or bf16, ``KV_DTYPE_CODES``; last stride 1), of which this
        token writes position ``span - 1`` and attends ``0 .. span - 1``. The caller has checked the shapes."""
        lib = native_int8.load_library()
        es = store.element_size()
        scratch = torch.empty(self.scratch_numel, dtype=torch.float32)
        rc = lib.gv_decode_layers(self.array, self.n, self.hidden, self.heads, self.kv_heads, self.head_dim,
                                  self.inter, self.eps, self.qk_eps, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                  store.data_ptr(), store.stride(0) * es, store.stride(1) * es, store.stride(2),
                                  store.stride(3), span, KV_DTYPE_CODES[store.dtype], self.scale, scratch.data_ptr(),
                                  native.num_threads())
        if rc != 0:
            raise RuntimeError(f"gv_decode_layers failed with code {rc}")
        return x
