"""Turn a model's language-model linears into ``LSQLinear`` fake-quant layers (GRACE QAT)."""
from __future__ import annotations

from torch import nn

from ..nn.lsq import LSQLinear

# GRACE's LLaVA skip list (written to config.json ``qat.skip_keywords`` unless the family names its own), plus
# the module names our LlavaModel (``projector``) and transformers' LlavaForConditionalGeneration
# (``multi_modal_projector``) use, plus GRACE's Qwen3-VL list (``visual``, ``merger``: its vision tower).
GRACE_SKIP_KEYWORDS = ("vision_tower", "mm_projector", "lm_head", "embed_tokens")
DEFAULT_SKIP_KEYWORDS = GRACE_SKIP_KEYWORDS + ("projector", "multi_modal_projector", "visual", "merger")


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def prepare(model: nn.Module, bits: int = 4, group_size: int = 128, init: str = "mse",
            skip_keywords: tuple[str, ...] = DEFAULT_SKIP_KEYWORDS, learn_scales: bool = True) -> int:
    """Replace every ``nn.Linear`` whose qualified name contains none of ``skip_keywords`` by an
    ``LSQLinear`` sharing its weight; returns how many were replaced.

    On our ``LlavaModel``/``LlamaForCausalLM``, on a transformers ``LlavaForConditionalGeneration``, on our
    ``Qwen3VLModel`` and on a transformers ``Qwen3VLForConditionalGeneration`` this selects exactly the language
    model's q/k/v/o and gate/up/down projections (the vision tower, projector/mergers, embeddings and lm_head are
    skipped). Fused projections (``qkv_proj``) are refused:
    load the model with ``fuse=False``.
    """
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if any(k in name for k in skip_keywords):
            continue
        if name.endswith(("qkv_proj", "gate_up_proj")):
            raise ValueError(f"{name} is a fused projection; GRACE quantizes q/k/v and gate/up separately. "
                             "Load the model with fuse=False before prepare()")
        targets.append(name)
    for name in targets:
        _set_child(model, name, LSQLinear(model.get_submodule(name), bits, group_size, init, learn_scales))
    return len(targets)


def lsq_layers(model: nn.Module) -> dict[str, LSQLinear]:
    """Qualified name -> LSQLinear for every fake-quant layer of ``model`` (in module order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LSQLinear)}
