"""The demo world (deterministic, answers consistent with the pictures) and the bundled GRACE W4 model."""
import hashlib
import json
import random

import pytest

from gracevlm.demo import MODEL_DIR
from gracevlm.demo.world import QUADRANTS, QUESTION_TYPES, ask, draw_scene, generate_split, make_scene, showcase, \
    write_split


def _digest(img):
    return hashlib.sha256(img.tobytes()).hexdigest()


def test_world_is_deterministic(tmp_path):
    a, b = generate_split("train", 30, seed=7), generate_split("train", 30, seed=7)
    assert [r for r, _ in a] == [r for r, _ in b]
    assert [_digest(draw_scene(s)) for _, s in a] == [_digest(draw_scene(s)) for _, s in b]
    assert [r for r, _ in generate_split("train", 30, seed=8)] != [r for r, _ in a]
    assert [r for r, _ in generate_split("heldout", 30, seed=7)] != [r for r, _ in a]
    write_split(tmp_path / "x", "heldout", 5, seed=3)
    write_split(tmp_path / "y", "heldout", 5, seed=3)
    for name in ["heldout.json"] + [f"heldout/{i:06d}.png" for i in range(5)]:
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()
    # a fixed fingerprint guards against accidental changes of the world
    first = a[0][0]
    assert first["image"] == "train/000000.png" and first["types"][-1] == "describe"
    assert len(first["conversations"]) == 8 and first["conversations"][0]["value"].startswith("<image>\n")


def test_training_records_without_the_description_turn_keep_their_questions(tmp_path):
    full = generate_split("train", 40, seed=5, questions_per_image=8)
    short = generate_split("train", 40, seed=5, questions_per_image=8, describe_turn=False)
    assert [s for _, s in full] == [s for _, s in short]
    for (a, _), (b, _) in zip(full, short):
        assert a["types"][-1] == "describe" and "describe" not in b["types"]
        assert b["types"] == a["types"][:-1] and b["conversations"] == a["conversations"][:-2]
    assert max(len(r["types"]) for r, _ in short) == 8
    write_split(tmp_path, "train", 6, seed=5, questions_per_image=8, describe_turn=False)
    records = json.loads((tmp_path / "train.json").read_text())
    assert [r["types"] for r in records] == [r["types"] for r, _ in short[:6]]


def test_answers_match_the_scene():
    rng = random.Random(0)
    for _ in range(200):
        scene = make_scene(rng)
        assert 1 <= len(scene.objects) <= 3
        assert len({o.quadrant for o in scene.objects}) == len(scene.objects)
        for kind in QUESTION_TYPES:
            qa = ask(scene, kind, rng)
            if qa is None:
                continue
            if kind == "count_all":
                assert qa.answer == str(len(scene.objects))
            elif kind == "count_shape":
                shape = next(s for s in ("circle", "square", "triangle") if s + "s" in qa.question)
                assert qa.answer == str(sum(o.shape == shape for o in scene.objects))
            elif kind == "where":
                assert qa.answer in QUADRANTS
                named = qa.question[len("Where is the "):-1].split()
                found = [o for o in scene.objects if named in ([o.color, o.shape], [o.shape])]
                assert len(found) == 1 and qa.answer == QUADRANTS[found[0].quadrant]
            elif kind == "exists":
                words = qa.question[len("Is there a "):-1].split()
                present = any(words in ([o.color, o.shape], [o.shape]) for o in scene.objects)
                assert qa.answer == ("yes" if present else "no")


def test_pictures_show_the_objects():
    rng = random.Random(1)
    scene = make_scene(rng)
    img = draw_scene(scene)
    assert img.size == (64, 64) and img.mode == "RGB"
    from gracevlm.demo.world import COLORS

    for o in scene.objects:
        assert img.getpixel((o.cx, o.cy)) == COLORS[o.color]
    big = draw_scene(scene, 128)
    assert big.getpixel((2 * scene.objects[0].cx, 2 * scene.objects[0].cy)) == COLORS[scene.objects[0].color]


@pytest.mark.parametrize("width,height", [(128, 128), (200, 150), (150, 200), (256, 192)])
def test_pictures_at_other_sizes_keep_objects_in_their_quadrants(width, height):
    from gracevlm.demo.world import BACKGROUNDS, COLORS

    rng = random.Random(2)
    for _ in range(30):
        scene = make_scene(rng)
        img = draw_scene(scene, width, height)
        assert img.size == (width, height)
        for o in scene.objects:
            x, y = round((o.cx + 0.5) * width / 64 - 0.5), round((o.cy + 0.5) * height / 64 - 0.5)
            assert img.getpixel((x, y)) == COLORS[o.color]
            # the quadrant the answer names is the one the object's pixels are in
            assert (x >= width / 2, y >= height / 2) == (o.quadrant % 2 == 1, o.quadrant >= 2)
        # nothing but the background along the picture's midlines: objects never cross quadrants
        bg = BACKGROUNDS[scene.background]
        assert all(img.getpixel((width // 2, y)) == bg for y in range(height))
        assert all(img.getpixel((x, height // 2)) == bg for x in range(width))


def test_training_pictures_vary_in_size_deterministically(tmp_path):
    from gracevlm.demo.world import TRAIN_ASPECTS, TRAIN_SIDES
    from PIL import Image

    a = generate_split("train", 200, seed=3, varied_sizes=True)
    assert [r["size"] for r, _ in a] == [r["size"] for r, _ in generate_split("train", 200, seed=3, varied_sizes=True)]
    # the scenes and questions do not depend on the sizes; without varied_sizes records name none
    plain = generate_split("train", 200, seed=3)
    assert [dict(r, size=None) for r, _ in a] == [dict(r, size=None) for r, _ in plain]
    assert all("size" not in r for r, _ in plain)
    sizes = {tuple(r["size"]) for r, _ in a}
    assert (64, 64) in sizes and any(w != h for w, h in sizes) and len(sizes) >= 8
    for w, h in sizes:
        assert max(w, h) in TRAIN_SIDES and any(w * ah == h * aw for aw, ah in TRAIN_ASPECTS)
    write_split(tmp_path, "train", 12, seed=3, varied_sizes=True)
    records = json.loads((tmp_path / "train.json").read_text())
    for r in records:
        with Image.open(tmp_path / r["image"]) as im:
            assert list(im.size) == r["size"]


def test_showcase_asks_three_different_kinds():
    rng = random.Random(4)
    for _ in range(50):
        scene = make_scene(rng)
        qas = showcase(scene, random.Random(0))
        assert len(qas) == 3 and len({qa.kind for qa in qas}) == 3
        assert all(qa == ask(scene, qa.kind, random.Random(0)) or qa.kind for qa in qas)


def _wilson_by_bisection(k, n, z=1.96):
    """The interval {p : |k/n - p| <= z sqrt(p (1 - p) / n)}, found numerically (no closed form)."""
    phat = k / n

    def inside(p):
        return abs(phat - p) <= z * (p * (1 - p) / n) ** 0.5

    def edge(lo, hi):  # lo outside, hi inside (or the reverse): bisect the boundary
        for _ in range(100):
            mid = (lo + hi) / 2
            if inside(mid) == inside(hi):
                hi = mid
            else:
                lo = mid
        return hi

    return (0.0 if k == 0 else edge(0.0, phat)), (1.0 if k == n else edge(1.0, phat))


@pytest.mark.parametrize("k,n", [(95, 100), (380, 400), (0, 50), (400, 400), (1, 3)])
def test_wilson_interval_matches_its_definition(k, n):
    from gracevlm.demo.evaluate import wilson_interval

    lo, hi = wilson_interval(k, n)
    ref = _wilson_by_bisection(k, n)
    assert abs(lo - 100 * ref[0]) < 0.006 and abs(hi - 100 * ref[1]) < 0.006
    assert lo <= 100 * k / n <= hi


def test_parse_view():
    from gracevlm.demo.evaluate import parse_view

    assert parse_view("200") == (200, 200) and parse_view("200x150") == (200, 150)
    for bad in ("", "x", "10", "200x", "200x150x3", "abc", "99999"):
        with pytest.raises(ValueError, match="picture size"):
            parse_view(bad)


class _ScriptedModel:
    """Answers from a table keyed by (question, picture bytes): an oracle, or a fixed answer for all."""

    def __init__(self, table=None, fixed=None):
        self.table, self.fixed, self.calls = table or {}, fixed, 0

    def generate(self, question, images, **_):
        self.calls += 1
        text = self.fixed if self.fixed is not None else self.table.get((question, images[0].tobytes()), "?")
        return type("Out", (), {"text": f" {text}\n"})()


def test_evaluate_scores_exact_matches_per_type():
    from gracevlm.demo.evaluate import evaluate

    n, view = 60, (200, 150)
    records = generate_split("heldout", n, seed=5)
    table = {}
    for r, scene in records:
        q = r["conversations"][0]["value"].replace("<image>\n", "")
        table[(q, draw_scene(scene, *view).tobytes())] = r["conversations"][1]["value"]
    oracle = _ScriptedModel(table)
    res = evaluate(oracle, n=n, seed=5, view=view)
    assert oracle.calls == n and res["correct"] == n and res["accuracy"] == 100.0
    assert set(res["by_type"]) == {r["types"][0] for r, _ in records} and set(res["by_type"].values()) == {100.0}
    # the oracle's table is for 200 x 150 pictures: at another view no key matches
    assert evaluate(oracle, n=n, seed=5, view=(256, 256))["correct"] == 0
    yes = evaluate(_ScriptedModel(fixed="yes"), n=n, seed=5, view=view)
    expected = sum(r["conversations"][1]["value"] == "yes" for r, _ in records)
    assert yes["correct"] == expected > 0 and yes["by_type"]["exists"] > 0
    assert all(v == 0.0 for k, v in yes["by_type"].items() if k != "exists")
    assert yes["ci95"][0] <= yes["accuracy"] <= yes["ci95"][1]


needs_model = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(),
                                 reason="the demo model has not been built (python -m gracevlm.demo build)")


@needs_model
def test_bundled_model_is_a_grace_awq_release():
    from gracevlm.models.inspect import inspect_checkpoint

    info = inspect_checkpoint(MODEL_DIR)
    assert info["format"] == "grace-awq"
    assert info["checks"]["qzeros_all_0x88888888"] and not info["checks"]["modules_missing_tensors"]
    assert info["quantization"]["group_size"] == 128 and info["quantization"]["bits"] == 4
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert size <= 20 * 2**20


@needs_model
def test_demo_evaluate_cli_reproduces_the_recorded_accuracy(capsys):
    from gracevlm.demo.cli import main
    from gracevlm.demo.recipe import RESULTS_FILE

    assert main(["evaluate", "--json", "--n", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"accuracy", "n", "ci95", "by_type"} <= set(out) and out["n"] == 100
    recorded = json.loads(RESULTS_FILE.read_text())["accuracy"]["grace_w4"]["accuracy_first_100"]
    assert abs(out["accuracy"] - recorded) <= 3.0  # greedy and deterministic; slack for other CPUs' rounding
    assert main(["run", "--json", "--save-image", ""]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["answer"] and res["reference"] and len(res["turns"]) == 3
    assert len({t["kind"] for t in res["turns"]}) == 3


def test_results_table_lists_every_model_and_view():
    from gracevlm.demo.recipe import results_table

    def res(acc, k, n):
        return {"accuracy": acc, "ci95": [acc - 2.0, acc + 1.5], "n": n, "correct": k,
                "by_type": {"color": 100.0, "where": acc - 5}}

    results = {"accuracy": {"teacher_fp16": res(98.0, 392, 400), "grace_w3": res(90.0, 360, 400)},
               "views": {"grace_w4": {"64x64": res(97.0, 388, 400), "200x150": res(93.5, 374, 400)}}}
    lines = results_table(results).splitlines()
    assert "| teacher (fp16) | 98.00% | 96.0-99.5% | where 93.0% |" in lines
    assert "| GRACE W3G128 | 90.00% | 88.0-91.5% | where 85.0% |" in lines
    assert lines[lines.index("") + 1] == "| model | 64x64 px | 200x150 px | weakest type, any view |"
    assert "| GRACE W4G128 (the bundled model) | 97.00% | 93.50% | where 88.5% (200x150) |" in lines
