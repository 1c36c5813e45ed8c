"""The bundled demo: a synthetic VQA world, the recipe that trains a small LLaVA teacher and distills a
GRACE W4G128 student from it, and the packed student itself (``gracevlm/demo/model``).

``python -m gracevlm.demo build`` reproduces the model; ``gracevlm demo evaluate --json`` scores it.
"""
from .evaluate import MODEL_DIR, evaluate

__all__ = ["MODEL_DIR", "evaluate"]
