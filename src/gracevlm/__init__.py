"""gracevlm: runtime and toolkit for 4-bit GRACE vision-language models.

``gracevlm.load(model)`` returns a ``VLM`` with ``generate``, ``stream`` and ``chat``.
"""
__version__ = "0.1.0"


def load(model, device: str = "auto", backend=None, dtype=None, quantize=None, conv_mode=None, **kwargs):
    """Load a checkpoint folder or Hub id; see ``gracevlm.engine.vlm.load`` (its other keywords, e.g.
    ``prefix_cache_gib``, pass through)."""
    from .engine.vlm import load as _load

    return _load(model, device=device, backend=backend, dtype=dtype, quantize=quantize, conv_mode=conv_mode,
                 **kwargs)


__all__ = ["load", "__version__"]
