"""CLIP ViT vision tower (the encoder LLaVA-1.5 uses), with the parameter names of transformers' (v5,
flattened) ``CLIPVisionModel``: ``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.N.*``,
``post_layernorm.*``, so checkpoints load into either. Our own so that loading a model does not import transformers
(2-4 s of the load time on the development machine); tests check it against transformers' class."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from ...formats.checkpoint import TensorStore, read_json_object
from .config import CLIP_L336


@dataclass
class CLIPVisionSpec:
    """The fields of a transformers ``CLIPVisionConfig`` this tower uses."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, d: dict, source: str = "vision config") -> "CLIPVisionSpec":
        """From a ``CLIPVisionConfig`` dict, or a ``CLIPConfig`` dict (its ``vision_config``); other keys are
        ignored, missing ones take CLIP ViT-L/14-336's values (``models.llava.config.CLIP_L336``)."""
        if isinstance(d.get("vision_config"), dict):
            d = d["vision_config"]
        spec = cls(**{f.name: d[f.name] if d.get(f.name) is not None else CLIP_L336[f.name] for f in fields(cls)})
        if spec.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(f"{source}: hidden_act {spec.hidden_act!r} is not supported "
                                  f"(one of {sorted(_ACTIVATIONS)})")
        if spec.hidden_size % spec.num_attention_heads or spec.image_size % spec.patch_size:
            raise CheckpointError(f"{source}: hidden_size must divide into the heads and image_size into patches")
        return spec

    def to_dict(self) -> dict:
        """The fields as a ``CLIPVisionConfig``-style dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _embedding(num: int, dim: int) -> nn.Embedding:
    weight = torch.empty(num, dim)
    if not weight.is_meta:  # on meta (the loader) skip nn.Embedding's init: its first call costs ~1.5 s
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class _Embeddings(nn.Module):
    def __init__(self, c: CLIPVisionSpec):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = _embedding(c.num_positions, c.hidden_size)
        self.register_buffer("position_ids", torch.arange(c.num_positions).unsqueeze(0), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, g, g]
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixel_values.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(self.position_ids)


class _Attention(nn.Module):
    def __init__(self, c: CLIPVisionSpec):
        super().__init__()
        self.heads = c.num_attention_heads
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, c: CLIPVisionSpec):
        super().__init__()
        self.act = _ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, c: CLIPVisionSpec):
        super().__init__()
        self.self_attn = _Attention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _MLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionTower(nn.Module):
    """``pixel_values [B, C, S, S]`` -> ``.last_hidden_state [B, 1 + (S/p)^2, D]`` and, with
    ``output_hidden_states``, ``.hidden_states``: ``num_hidden_layers + 1`` tensors, entry 0 the embeddings
    after ``pre_layrnorm``, entry k the output of layer k (transformers' convention: LLaVA takes -2)."""

    def __init__(self, config: CLIPVisionSpec):
        super().__init__()
        c = self.config = config
        self.embeddings = _Embeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # (sic: transformers' name)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> SimpleNamespace:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x)
            if states is not None:
                states.append(x)
        pooled = self.post_layernorm(x[:, 0])
        return SimpleNamespace(last_hidden_state=x, pooler_output=pooled,
                               hidden_states=tuple(states) if states is not None else None)


def tower_from_tensors(spec: CLIPVisionSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                       source: str) -> CLIPVisionTower:
    """Build the tower on the meta device and fill it from ``tensors`` (local names such as
    ``encoder.layers.0.mlp.fc1.weight``), converted to ``dtype``; ``tensors`` is emptied as it goes. Every
    parameter must be given; ``position_ids`` is ignored (computed)."""
    with torch.device("meta"):
        tower = CLIPVisionTower(spec)
    params = dict(tower.named_parameters())
    for name in list(tensors):
        t = tensors.pop(name)  # the file-dtype copy can go as soon as it is converted
        if name.endswith("position_ids"):
            continue
        if name not in params:
            raise CheckpointError(f"{source}: tensor {name!r} does not belong to a CLIP vision model")
        if tuple(t.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(params[name].shape)}")
        module, _, leaf = name.rpartition(".")
        setattr(tower.get_submodule(module), leaf, nn.Parameter(t.to(dtype), requires_grad=False))
        del params[name]
    if params:
        raise CheckpointError(f"{source}: vision tower tensors missing: {sorted(params)[:3]}")
    tower.embeddings.position_ids = torch.arange(spec.num_positions).unsqueeze(0)
    return tower.eval()


def load_clip_folder(path: Path, dtype: torch.dtype) -> CLIPVisionTower:
    """A transformers CLIP folder: a ``CLIPVisionModel`` (flat names, or under ``vision_model.`` as older
    versions and whole ``CLIPModel`` checkpoints such as openai/clip-vit-large-patch14-336 store them; the
    text tower is ignored), from safetensors or from ``pytorch_model.bin`` read with ``weights_only=True``."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a CLIP model folder")
    spec = CLIPVisionSpec.from_dict(read_json_object(cfg_file), str(cfg_file))
    if list(path.glob("*.safetensors")):
        store = TensorStore(path)
        names, get = store.keys(), store.get
    elif (path / "pytorch_model.bin").is_file():
        try:
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for bad files
            raise CheckpointError(f"{path / 'pytorch_model.bin'} was refused: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''} (only plain tensors are "
                                  "loaded, weights_only=True); convert it to safetensors from a trusted "
                                  "copy") from None
        names, get = list(state), state.__getitem__
    else:
        raise CheckpointError(f"{path} holds no safetensors or pytorch_model.bin weights")
    tensors = {}
    for key in names:
        local = key[len("vision_model."):] if key.startswith("vision_model.") else key
        if local.split(".")[0] in _TOWER_PARTS:
            tensors[local] = get(key)
    return tower_from_tensors(spec, tensors, dtype, str(path))


_TOWER_PARTS = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
