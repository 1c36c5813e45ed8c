"""Resolve ``--model`` to a local folder: a path, or a Hugging Face Hub id (cache first, never hangs)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError


def _local_folder(text: str, base: Path | None) -> Path | None:
    """``text`` as a folder relative to ``base`` (first) or to the cwd / absolute; CheckpointError for a file."""
    candidates = [Path(text).expanduser()]
    if base is not None and not Path(text).is_absolute():
        candidates.insert(0, base / text)
    for path in candidates:
        if path.is_dir():
            return path.resolve()
        if path.exists():
            raise CheckpointError(f"{path} is a file; --model expects a checkpoint folder or a Hub id")
    return None


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def resolve_local_path(model: str | os.PathLike, base: Path | None = None) -> Path | None:
    """``model`` as a local folder (absolute, relative to ``base``, or to the cwd) or a Hub id already in the
    local Hugging Face cache; None when it is neither. Never downloads."""
    text = os.fspath(model)
    try:
        folder = _local_folder(text, base)
    except CheckpointError:
        return None
    if folder is not None:
        return folder
    if not _is_hub_id(text):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # noqa: BLE001 - not installed, or not (fully) cached
        return None


def resolve_model_path(model: str | os.PathLike, base: Path | None = None) -> Path:
    """A local folder (absolute, or relative to ``base`` then to the cwd), else a Hub repo id
    resolved through the local Hugging Face cache, downloading only when online."""
    text = os.fspath(model)
    folder = _local_folder(text, base)
    if folder is not None:
        return folder
    if not _is_hub_id(text):
        raise CheckpointError(f"model {text!r} is neither a local folder nor a Hub id of the form 'owner/name'")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise CheckpointError("huggingface_hub is needed to resolve Hub ids; pip install huggingface_hub") from exc
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (fully): try the network below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        raise CheckpointError(f"{text!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                              f"Download it on a connected machine (huggingface-cli download {text}) or pass "
                              "a local folder with --model")
    try:
        return Path(snapshot_download(text))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"could not download {text!r} from the Hugging Face Hub "
                              f"({exc.__class__.__name__}: {str(exc)[:200]}). Check the id and your network, "
                              "or pass a local folder with --model") from exc
