"""A decode step of one sequence through all decoder layers in one native call (``kernels.decode_layers``).

For the pre-norm decoders of LLaMA (``llama.DecoderLayer``) and Qwen3 (``qwen3_vl.language.Qwen3DecoderLayer``,
with QK-norm) whose projections are fused (q/k/v and gate/up) and whose linears run the native INT4/INT8
small-M kernels: the same C functions with the same arguments as the layer-by-layer path, so logits and KV
are bitwise the same; the ~0.2 ms of Python per layer is what goes.

``decode_all_layers(owner, layers, x, cos, sin, cache, rows)`` returns the last layer's output ``[1, 1, D]`` or
None where it does not apply (then the caller runs the layers). It applies to a cached decode step (one
sequence, one token at the end of its prefix) in fp32 without gradients, while every linear's bound kernel
(``RowPlan``) is the one its ``forward`` would run, no forward hook is registered on the layers or their
linears, and the native norm, attention and layer paths are switched on. The bound structs are kept on
``owner`` and checked on every step (~1 us per linear); they are rebuilt when any of that changes.
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as _torch_module

from .. import kernels
from ..kernels import attention, decode_layers, native_int8, norm_rope
from ..kernels.decode_layers import KV_DTYPE_CODES, LayerStack, LinearCall
from ..nn import Int8Linear
from .kv_cache import KVCache, RowKV

_ATTR = "_gv_decode_stack"


class _Bound:
    """A built ``LayerStack`` with what it was built from (for the per-step check)."""

    __slots__ = ("stack", "layers", "checks", "auto")

    def __init__(self, stack: LayerStack, layers, checks: tuple[list, list], auto):
        """``checks``: (linear, its plan, its backend setting) and (module, its weight or None) to re-check."""
        self.stack, self.layers, self.checks, self.auto = stack, layers, checks, auto

    def valid(self, layers) -> bool:
        if layers is not self.layers or _auto_backends() != self.auto:
            return False
        for lin, plan, backend, weights in self.checks[0]:  # plain dict reads: this runs every step
            d = lin.__dict__
            if (d["kernel_cache"].get("row_plan") is not plan or d["backend"] != backend or d["_forward_hooks"]
                    or d["_forward_pre_hooks"]):
                return False
            if weights and (d["_buffers"].get("qweight") is not weights[0]
                            or d["_buffers"].get("scales") is not weights[1]):
                return False
        for module, weight in self.checks[1]:
            d = module.__dict__
            if d["_parameters"].get("weight") is not weight or d["_forward_hooks"] or d["_forward_pre_hooks"]:
                return False
        return True

    def __deepcopy__(self, memo):
        return None  # raw pointers do not travel: a copy builds its own

    def __reduce__(self):
        return type(None), ()


def _linear(lin, checks: tuple[list, list]) -> LinearCall | None:
    plan_for = getattr(lin, "row_plan_for", None)
    plan = plan_for(1) if plan_for is not None else None
    call = LinearCall.of(plan) if plan is not None else None
    if (call is None or getattr(lin, "bias", None) is not None and plan.bias_ptr is None or lin._forward_hooks
            or lin._forward_pre_hooks):
        return None
    checks[0].append((lin, plan, lin.backend, _weights(lin)))
    return call


def _weights(lin) -> tuple:
    """An INT8 layer's code and scale tensors (its plan is stale once they are replaced); () for INT4."""
    if not isinstance(lin, Int8Linear):
        return ()
    return lin._buffers.get("qweight"), lin._buffers.get("scales")


def _norm_weight(norm, size: int, checks: tuple[list, list]) -> torch.Tensor | None:
    w = getattr(norm, "weight", None)
    if (w is None or w.dtype != torch.float32 or not w.is_cpu or w.shape != (size,) or not w.is_contiguous()
            or norm._forward_hooks or norm._forward_pre_hooks):
        return None
    checks[1].append((norm, norm._parameters.get("weight")))
    return w


def build_stack(layers, spec) -> _Bound | None:
    """The bound stack for ``layers`` (see the module), or None where some layer does not fit."""
    hidden, heads, kvh, d, inter = (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                    spec.intermediate_size)
    if heads % kvh or heads // kvh > 64 or d > 512 or d % 2 or not len(layers):
        return None
    entries, checks, eps, qk_eps = [], ([], []), None, None
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "qkv_proj") or not hasattr(mlp, "gate_up_proj"):
            return None
        for module in (layer, attn, mlp):
            if module._forward_hooks or module._forward_pre_hooks:
                return None
            checks[1].append((module, module._parameters.get("weight")))
        e = {"in_norm": _norm_weight(layer.input_layernorm, hidden, checks),
             "post_norm": _norm_weight(layer.post_attention_layernorm, hidden, checks)}
        if e["in_norm"] is None or e["post_norm"] is None:
            return None
        norms = (layer.input_layernorm.eps, layer.post_attention_layernorm.eps)
        if eps is None:
            eps = norms[0]
        if norms != (eps, eps):
            return None
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if (q_norm is None) != (k_norm is None):
            return None
        e["q_norm"] = e["k_norm"] = None
        if q_norm is not None:
            e["q_norm"], e["k_norm"] = _norm_weight(q_norm, d, checks), _norm_weight(k_norm, d, checks)
            if e["q_norm"] is None or e["k_norm"] is None:
                return None
            if qk_eps is None:
                qk_eps = q_norm.eps
            if (q_norm.eps, k_norm.eps) != (qk_eps, qk_eps):
                return None
        shapes = {"qkv": (attn.qkv_proj, hidden, (heads + 2 * kvh) * d), "o": (attn.o_proj, heads * d, hidden),
                  "gate_up": (mlp.gate_up_proj, hidden, 2 * inter), "down": (mlp.down_proj, inter, hidden)}
        for name, (lin, i, o) in shapes.items():
            call = _linear(lin, checks)
            if call is None or (call.in_features, call.out_features) != (i, o):
                return None
            e[name] = call
        entries.append(e)
    if len({e["q_norm"] is None for e in entries}) > 1:
        return None  # QK-norm in some layers only: not a decoder this call describes
    stack = LayerStack(entries, hidden, heads, kvh, d, inter, eps, qk_eps or 0.0)
    return _Bound(stack, layers, checks, _auto_backends())


def _auto_backends() -> tuple:
    """The automatic INT4 and INT8 backend choices for one CPU row (what layers without an override use)."""
    cpu = torch.device("cpu")
    return kernels.select_backend(cpu, 1, None), native_int8.select_int8_backend(cpu, None)


def decode_all_layers(owner, layers, spec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache: KVCache | None, rows: list[RowKV] | None) -> torch.Tensor | None:
    """All of ``layers`` for a one-sequence decode step (see the module): ``x [1, 1, D]`` fp32 -> ``[1, 1, D]``,
    or None (nothing computed, nothing written)."""
    if (not decode_layers.enabled() or not norm_rope.enabled() or not attention.enabled() or cache is None
            or rows is None or len(rows) != 1 or x.shape != (1, 1, spec.hidden_size) or x.dtype != torch.float32
            or not x.is_cpu or torch.is_grad_enabled() or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks):
        return None
    row = rows[0]
    if not (isinstance(row.where, slice) and row.where.start == row.span - 1):
        return None
    store = cache.slot_store(row.slot)
    d = spec.head_dim
    if (store is None or store.dtype not in KV_DTYPE_CODES or not store.is_cpu or store.dim() != 5
            or store.shape[0] != len(layers) or store.shape[2] != spec.num_kv_heads or store.shape[4] != d
            or store.stride(4) != 1 or not 0 < row.span <= store.shape[3]):
        return None
    if cos.numel() != d or sin.numel() != d or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return None
    bound = owner.__dict__.get(_ATTR)
    if bound is None or not bound.valid(layers):
        bound = build_stack(layers, spec)
        owner.__dict__[_ATTR] = bound
        if bound is None:
            return None
    out = x.reshape(-1).clone()
    bound.stack.run(out, cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous(), store, row.span)
    return out.view(1, 1, -1)


def in_use(owner) -> bool:
    """Whether ``owner``'s last decode step ran its layers in one native call."""
    return owner.__dict__.get(_ATTR) is not None
