"""Broken checkpoints are one ``CheckpointError`` at load time (issue 19, item 8), never a traceback or a
server that loads and then fails every image request."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gracevlm.engine.vlm import load
from gracevlm.errors import CheckpointError
from gracevlm.models.llava.vision import CLIPVisionSpec, load_clip_folder
from gracevlm.synth.checkpoint import synthesize


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cfg") / "tiny", "tiny", "awq", seed=0, progress=False)


def _copy(ckpt, tmp_path, name="bad"):
    out = tmp_path / name
    shutil.copytree(ckpt, out)
    return out


def _with_config(ckpt, tmp_path, **changes):
    out = _copy(ckpt, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        if value is KeyError:
            cfg.pop(key)
        else:
            cfg[key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    return out


CASES = [
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(hidden_size="128"), "hidden_size"),
    (dict(hidden_size=-128), "hidden_size"),
    (dict(hidden_size=130), "divisible"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(eos_token_id=10**9), "eos_token_id"),
    (dict(rope_scaling={"type": "linear"}), "rope_scaling.factor"),
    (dict(rope_scaling={"type": "yarn", "factor": 2}), "rope_scaling"),
    (dict(rope_scaling="linear"), "rope_scaling"),
    (dict(num_hidden_layers=1e7), "num_hidden_layers"),
    (dict(num_hidden_layers=10**7), "num_hidden_layers"),
    (dict(vocab_size=KeyError), "vocab_size"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(mm_vision_select_layer=99), "mm_vision_select_layer"),
    (dict(mm_vision_select_layer="-2"), "mm_vision_select_layer"),
    (dict(mm_vision_select_feature="cls"), "mm_vision_select_feature"),
]


@pytest.mark.parametrize("changes,field", CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(CASES)])
def test_broken_config_is_a_checkpoint_error(ckpt, tmp_path, changes, field):
    with pytest.raises(CheckpointError) as exc:
        load(_with_config(ckpt, tmp_path, **changes), device="cpu")
    assert field in str(exc.value) and "config.json" in str(exc.value)


def test_select_layer_in_range_loads(ckpt, tmp_path):
    vlm = load(_with_config(ckpt, tmp_path, mm_vision_select_layer=-4), device="cpu")  # 3 layers: 4 states
    assert vlm.generate("hi", max_new_tokens=1).finish_reason


def test_module_list_naming_embed_tokens(ckpt, tmp_path):
    out = _copy(ckpt, tmp_path)
    mods = json.loads((out / "awq_quantized_modules.json").read_text())
    for extra, words in (("model.embed_tokens", "seven linears"), ("model.layers.7.mlp.up_proj", "2 layers")):
        (out / "awq_quantized_modules.json").write_text(json.dumps({**mods, "modules": mods["modules"] + [extra]}))
        with pytest.raises(CheckpointError, match=words):
            load(out, device="cpu")


def test_nan_scales(ckpt, tmp_path):
    out = _copy(ckpt, tmp_path)
    tensors = load_file(out / "model.safetensors")
    key = sorted(k for k in tensors if k.endswith(".scales"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{key} holds 1 NaN"):
        load(out, device="cpu")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_in_clip_bin(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    spec = CLIPVisionSpec.from_dict({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "image_size": 28, "patch_size": 14})
    (folder / "config.json").write_text(json.dumps(spec.to_dict()))
    torch.save({"embeddings.x": _Evil()}, folder / "pytorch_model.bin")  # runs a command when unpickled
    with pytest.raises(CheckpointError, match="was refused: UnpicklingError"):
        load_clip_folder(folder, torch.float32)


def _drop_root_file_powers():
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    the exec'd root process obeys file modes like any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_unreadable_folder_is_one_line(ckpt, tmp_path):
    out = _copy(ckpt, tmp_path)
    os.chmod(out, 0)  # the folder itself (its files are readable)
    os.chmod(tmp_path, 0o755)
    demote = _drop_root_file_powers if os.geteuid() == 0 else None  # root reads anything otherwise
    env = {**os.environ, "HOME": "/tmp"}
    r = subprocess.run([sys.executable, "-m", "gracevlm.cli", "run", "--model", str(out), "--query", "hi"],
                       capture_output=True, text=True, timeout=120, preexec_fn=demote, env=env, cwd="/")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert r.stderr.strip() == (f"gracevlm: error: {out}: permission denied; the checkpoint must be readable by "
                                f"this user (e.g. chmod -R a+rX {out})")
    os.chmod(out, 0o755)
