"""A synthetic visual question answering world drawn with PIL, reproducible from a seed.

A scene is a small picture (64 x 64 by default) split into four quadrants; one to three objects sit in
distinct quadrants. Each object has a shape (circle, square, triangle), a colour (red, green, blue,
yellow, purple) and a size (small, large). Questions ask about colour, shape, size, position and
counts and have short answers ("red", "2", "yes", "top left"). Records use LLaVA's conversation format:
``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``.

Everything is derived from ``random.Random(seed)`` (integer draws only, which Python keeps stable across
versions) and PIL's integer drawing primitives, so the same seed gives the same pictures, questions and
answers.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (238, 200, 30),
          "purple": (148, 60, 189)}
SIZES = {"small": (6, 8), "large": (11, 13)}  # half extent range in pixels on a 64 px canvas
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = ((236, 236, 230), (226, 232, 240), (242, 234, 222), (230, 240, 230))
IMAGE_SIZE = 64
QUESTION_TYPES = ("color", "shape", "count_shape", "count_all", "exists", "where", "size", "color_at")
WORDS = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    quadrant: int
    cx: int  # centre, in units of a 64 px canvas
    cy: int
    half: int


@dataclass(frozen=True)
class Scene:
    background: int
    objects: tuple[Obj, ...]


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


def make_scene(rng: random.Random) -> Scene:
    n = rng.randrange(1, 4)
    quads = rng.sample(range(4), n)
    objs = []
    for q in quads:
        size = rng.choice(tuple(SIZES))
        lo, hi = SIZES[size]
        half = rng.randrange(lo, hi + 1)
        slack = 16 - half - 1
        qx, qy = (q % 2) * 32 + 16, (q // 2) * 32 + 16
        objs.append(Obj(rng.choice(SHAPES), rng.choice(tuple(COLORS)), size, q,
                        qx + rng.randrange(-slack, slack + 1), qy + rng.randrange(-slack, slack + 1), half))
    return Scene(rng.randrange(len(BACKGROUNDS)), tuple(objs))


def draw_scene(scene: Scene, size: int = IMAGE_SIZE, height: int | None = None) -> Image.Image:
    """The scene as an RGB image ``size`` pixels wide and ``height`` (default ``size``) high.

    Scene coordinates are in units of a 64 px square; positions scale with each side (the quadrants are
    the picture's quadrants) and object extents with the shorter side, so shapes are never stretched.
    At 64 x 64 every coordinate is an integer and the picture is the one the scene describes exactly."""
    width, height = size, height or size
    if width < 16 or height < 16:
        raise ValueError(f"a scene needs at least 16 x 16 pixels, got {width} x {height}")
    sx, sy, sh = width / IMAGE_SIZE, height / IMAGE_SIZE, min(width, height) / IMAGE_SIZE
    img = Image.new("RGB", (width, height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        # pixel centres: a 64 px coordinate c covers [c, c + 1) and maps to [c * sx, (c + 1) * sx)
        cx, cy, h = (o.cx + 0.5) * sx - 0.5, (o.cy + 0.5) * sy - 0.5, o.half * sh
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((round(cx - h), round(cy - h), round(cx + h), round(cy + h)), fill=fill)
        elif o.shape == "square":
            s = round(h * 0.85)
            draw.rectangle((round(cx) - s, round(cy) - s, round(cx) + s, round(cy) + s), fill=fill)
        else:
            draw.polygon([(round(cx), round(cy - h)), (round(cx - h), round(cy + h - 1)),
                          (round(cx + h), round(cy + h - 1))], fill=fill)
    return img


def _unique(objs, **attrs):
    found = [o for o in objs if all(getattr(o, k) == v for k, v in attrs.items())]
    return found[0] if len(found) == 1 else None


def ask(scene: Scene, kind: str, rng: random.Random) -> QA | None:
    """One question of type ``kind`` about ``scene`` (None when the scene does not allow it)."""
    objs = scene.objects
    if kind == "color":
        cands = [o for o in objs if _unique(objs, shape=o.shape)]
        if cands:
            o = rng.choice(cands)
            return QA(kind, f"What color is the {o.shape}?", o.color)
    elif kind == "shape":
        cands = [o for o in objs if _unique(objs, color=o.color)]
        if cands:
            o = rng.choice(cands)
            return QA(kind, f"What shape is the {o.color} object?", o.shape)
    elif kind == "count_shape":
        shape = rng.choice(SHAPES)
        return QA(kind, f"How many {WORDS[shape]} are there?", str(sum(o.shape == shape for o in objs)))
    elif kind == "count_all":
        return QA(kind, "How many objects are there?", str(len(objs)))
    elif kind == "exists":
        if rng.randrange(2):
            o = rng.choice(objs)
            color, shape = o.color, o.shape
        else:
            color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
        present = any(o.color == color and o.shape == shape for o in objs)
        return QA(kind, f"Is there a {color} {shape}?", "yes" if present else "no")
    elif kind == "where":
        cands = [o for o in objs if _unique(objs, color=o.color, shape=o.shape)]
        if cands:
            o = rng.choice(cands)
            return QA(kind, f"Where is the {o.color} {o.shape}?", QUADRANTS[o.quadrant])
    elif kind == "size":
        cands = [o for o in objs if _unique(objs, color=o.color, shape=o.shape)]
        if cands:
            o = rng.choice(cands)
            return QA(kind, f"Is the {o.color} {o.shape} large or small?", o.size)
    elif kind == "color_at":
        o = rng.choice(objs)
        return QA(kind, f"What color is the object in the {QUADRANTS[o.quadrant]}?", o.color)
    else:
        raise ValueError(f"unknown question type {kind!r}")
    return None


def questions(scene: Scene, rng: random.Random, n: int) -> list[QA]:
    """Up to ``n`` distinct questions of random types about the scene."""
    out: list[QA] = []
    seen = set()
    for _ in range(8 * n):
        if len(out) == n:
            break
        qa = ask(scene, rng.choice(QUESTION_TYPES), rng)
        if qa is not None and qa.question not in seen:
            seen.add(qa.question)
            out.append(qa)
    return out


def showcase(scene: Scene, rng: random.Random, n: int = 3,
             kinds: tuple[str, ...] = ("count_all", "where", "exists", "color", "shape", "color_at", "size",
                                       "count_shape")) -> list[QA]:
    """``n`` questions of ``n`` different types about the scene (the first types of ``kinds`` that it
    allows), for showing the model off."""
    out: list[QA] = []
    for kind in kinds:
        qa = ask(scene, kind, rng)
        if qa is not None:
            out.append(qa)
        if len(out) == n:
            break
    return out


def describe(scene: Scene) -> QA:
    """The dense caption turn of training conversations: every object, in quadrant order."""
    parts = [f"{o.size} {o.color} {o.shape} at {QUADRANTS[o.quadrant]}"
             for o in sorted(scene.objects, key=lambda o: o.quadrant)]
    return QA("describe", "Describe the objects.", ", ".join(parts))


def _record(rid: str, image: str, qas: list[QA]) -> dict:
    conv = []
    for i, qa in enumerate(qas):
        conv.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + qa.question})
        conv.append({"from": "gpt", "value": qa.answer})
    return {"id": rid, "image": image, "conversations": conv, "types": [qa.kind for qa in qas]}


# Picture sizes of the training split (width x height before LLaVA's pad-to-square and resize): the model
# learns the world at every scale and with the padding bars non-square pictures get.
TRAIN_SIDES = (64, 64, 96, 128, 160, 200, 256)
TRAIN_ASPECTS = ((1, 1), (1, 1), (4, 3), (3, 4))


def train_view(rng: random.Random) -> tuple[int, int]:
    """A random (width, height): the longer side from ``TRAIN_SIDES``, the aspect from ``TRAIN_ASPECTS``."""
    side = rng.choice(TRAIN_SIDES)
    aw, ah = rng.choice(TRAIN_ASPECTS)
    return (side, side * ah // aw) if aw >= ah else (side * aw // ah, side)


def split_seed(seed: int, split: str) -> int:
    return seed * 1009 + {"train": 1, "heldout": 2}[split]


def generate_split(split: str, n_images: int, seed: int = 0, questions_per_image: int | None = None,
                   varied_sizes: bool = False, describe_turn: bool = True) -> list[tuple[dict, Scene]]:
    """``n_images`` (record, scene) pairs. ``train`` records hold 3 questions per image followed (with
    ``describe_turn``) by a description of all objects; ``heldout`` records hold one short-answer question
    (override the count with ``questions_per_image``). Image paths are
    ``{split}/{index:06d}.png``. With ``varied_sizes`` training records also name the picture's ``size``
    [width, height] (drawn from ``train_view`` with a stream of its own, so the scenes and questions do not
    depend on it)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    per = questions_per_image or (3 if split == "train" else 1)
    rng = random.Random(split_seed(seed, split))
    views = random.Random(split_seed(seed, split) + 7919)
    out = []
    for i in range(n_images):
        scene = make_scene(rng)
        qas = questions(scene, rng, per)
        if split == "train" and describe_turn:
            qas.append(describe(scene))
        record = _record(f"{split}-{i:06d}", f"{split}/{i:06d}.png", qas)
        if split == "train" and varied_sizes:
            record["size"] = list(train_view(views))
        out.append((record, scene))
    return out


def write_split(out_dir: str | os.PathLike, split: str, n_images: int, seed: int = 0,
                image_size: int = IMAGE_SIZE, questions_per_image: int | None = None,
                varied_sizes: bool = False, describe_turn: bool = True) -> Path:
    """Draw a split into ``out_dir/{split}/*.png`` (at the record's ``size`` if it has one, else
    ``image_size`` square) and write ``out_dir/{split}.json``; returns the JSON path."""
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    records = []
    for record, scene in generate_split(split, n_images, seed, questions_per_image, varied_sizes, describe_turn):
        width, height = record.get("size", (image_size, image_size))
        draw_scene(scene, width, height).save(out / record["image"], optimize=False, compress_level=1)
        records.append(record)
    path = out / f"{split}.json"
    path.write_text(json.dumps(records, indent=0) + "\n", encoding="utf-8")
    return path


def scene_dict(scene: Scene) -> dict:
    return asdict(scene)


def corpus_lines(records: list[dict], template: str = "vicuna_v1") -> list[str]:
    """The conversations rendered with the chat template: the tokenizer's training text."""
    from ..models.llava.chat import render_prompt

    lines = []
    for r in records:
        msgs = [{"role": "user" if m["from"] == "human" else "assistant",
                 "content": m["value"].replace("<image>\n", "")} for m in r["conversations"]]
        lines.append(render_prompt(msgs, template))
    return lines


def sample_corpus(n_images: int = 300, seed: int = 0) -> list[str]:
    """Tokenizer text from ``n_images`` training conversations (for small tokenizers in tests)."""
    return corpus_lines([r for r, _ in generate_split("train", n_images, seed)])
