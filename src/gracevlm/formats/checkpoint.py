"""Checkpoint folders: (sharded) safetensors, JSON configs, the AWQ module list, the QAT sidecar, atomic writes.

Pure file code: it reads and writes tensors and JSON; it never builds a model and knows no model family
(key names and config fields live in ``models/<family>/``). ``detect_format`` names the container:

``grace-awq``           ``awq_quantized_modules.json`` + AWQ triples (``<m>.qweight/.qzeros/.scales``)
``grace-qat``           baked fake-quantized weights + ``qat_quantized_weights.bin`` sidecar
``awq``                 standard AutoAWQ GEMM (``quantization_config.quant_method == "awq"``)
``compressed-tensors``  W4A16 ``pack-quantized`` (``quant_method == "compressed-tensors"``)
``gguf``                a folder of llama.cpp files (inspectable, not loadable)
``fp16``                dense weights (a family may name its own dense layouts, e.g. LLaVA's ``llava-hf``)
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from .qat import SIDECAR_NAME

AWQ_MODULES_NAME = "awq_quantized_modules.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # computed buffers some trainers save


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding an object, or a CheckpointError naming the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_offsets(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """key -> (dtype name, shape, first byte, end byte) in the file, from the safetensors header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    base = 8 + size
    return {k: (v["dtype"], v["shape"], base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:done + (1 << 30)]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


class TensorStore:
    """Read access to a folder's safetensors (single file or index + shards), validated at open.

    ``get`` returns a tensor the caller owns, read with ``pread`` (the data passes through the page cache,
    not this process's memory map: loading does not leave every byte of the files in the resident size).
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index (needs 'weight_map')") from exc
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_NAME).is_file():
            files, weight_map = [SINGLE_NAME], None
        else:
            files, weight_map = sorted(p.name for p in self.folder.glob("*.safetensors")), None
            if not files:
                raise CheckpointError(f"no safetensors weights in {self.folder} (expected {SINGLE_NAME} or "
                                      f"{INDEX_NAME} with shards)")
        self._handles = {}
        self._key_file: dict[str, str] = {}
        self._offsets: dict[str, tuple] = {}  # key -> (file, dtype name, shape, start, end)
        self._fds: dict[str, int] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in {INDEX_NAME} but missing; download the checkpoint "
                                      "again (incomplete copy)")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
                raise CheckpointError(f"cannot read {path}: {exc} (truncated or corrupt file? download it again)"
                                      ) from exc
            self._handles[name] = handle
            for key in handle.keys():
                self._key_file[key] = name
            try:
                self._offsets.update({k: (name, *v) for k, v in _safetensors_offsets(path).items()})
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unusual header: get() reads such tensors through safetensors instead
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self._key_file.get(k) != f]
            if missing:
                raise CheckpointError(f"{INDEX_NAME} lists {len(missing)} tensors not found in their shard "
                                      f"(e.g. {missing[0]!r} in {weight_map[missing[0]]})")

    def keys(self) -> list[str]:
        return sorted(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def get(self, key: str) -> torch.Tensor:
        name = self._key_file.get(key)
        if name is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.folder}")
        try:
            direct = self._read(key)
            if direct is not None:
                return direct
            return self._handles[name].get_tensor(key).clone()
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read tensor {key!r} from {self.folder / name}: {exc}") from exc

    def _read(self, key: str) -> torch.Tensor | None:
        entry = self._offsets.get(key)
        if entry is None or not hasattr(os, "preadv"):
            return None
        name, dtype_name, shape, start, end = entry
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            return None
        out = torch.empty(shape, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if end - start != nbytes:
            raise CheckpointError(f"tensor {key!r} in {self.folder / name} spans {end - start} bytes; "
                                  f"{dtype_name}{list(shape)} needs {nbytes} (corrupt header?)")
        if nbytes:
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(self.folder / name, os.O_RDONLY)
            _pread_into(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), start)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def get_slice_shape(self, key: str) -> list[int]:
        name = self._key_file.get(key)
        if name is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.folder}")
        return list(self._handles[name].get_slice(key).get_shape())

    def meta(self, key: str) -> tuple[list[int], str, int]:
        """(shape, safetensors dtype name such as 'F16', byte size) without reading the data."""
        name = self._key_file.get(key)
        if name is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.folder}")
        sl = self._handles[name].get_slice(key)
        shape, dtype = list(sl.get_shape()), sl.get_dtype()
        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(dtype, 1)
        n = 1
        for d in shape:
            n *= d
        return shape, dtype, n * size

    def file_bytes(self) -> int:
        return sum((self.folder / n).stat().st_size for n in self._handles)


def read_awq_modules(folder: str | os.PathLike) -> tuple[int, int, list[str]]:
    """Parse ``awq_quantized_modules.json`` -> (bits, group_size, sorted module names)."""
    path = Path(folder) / AWQ_MODULES_NAME
    try:
        data = json.loads(path.read_text())
        bits, group, modules = int(data["bits"]), int(data["group_size"]), list(data["modules"])
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} must be JSON with 'bits', 'group_size' and 'modules': {exc}") from exc
    if bits != 4:
        raise CheckpointError(f"{path}: bits={bits}; only 4-bit AWQ GEMM packing is supported")
    return bits, group, sorted(modules)


def detect_format(folder: str | os.PathLike) -> str:
    """The container format of ``folder``: ``grace-awq``, ``grace-qat``, ``awq``, ``compressed-tensors``, ``gguf``
    or ``fp16`` (see the module docstring)."""
    folder = Path(folder)
    if (folder / AWQ_MODULES_NAME).is_file():
        return "grace-awq"
    if (folder / SIDECAR_NAME).is_file():
        return "grace-qat"
    if not (folder / "config.json").exists() and any(folder.glob("*.gguf")):
        return "gguf"
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "fp16"  # the config reader reports a missing or broken config.json precisely
    if not isinstance(cfg, dict):
        return "fp16"
    qc = cfg.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method in ("awq", "compressed-tensors"):
        return method
    if method is not None:
        raise CheckpointError(f"{folder / 'config.json'}: quantization_config.quant_method {method!r} is not "
                              "supported; gracevlm reads GRACE AWQ/QAT, AutoAWQ GEMM ('awq') and W4A16 "
                              "'compressed-tensors' checkpoints")
    return "fp16"


def awq_settings(qc: dict, source: str) -> tuple[int, bool]:
    """(group_size, zero_point) of an AutoAWQ ``quantization_config``; only 4-bit GEMM packing is accepted."""
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4:
        raise CheckpointError(f"{source}: AWQ bits={bits}; only 4-bit checkpoints are supported")
    if version != "gemm":
        raise CheckpointError(f"{source}: AWQ version {version!r} is not supported; only the GEMM packing "
                              "(AutoAWQ's default, what transformers/vLLM call 'gemm') is")
    if group <= 0:
        raise CheckpointError(f"{source}: AWQ group_size {group} is not supported (per-group scales are needed)")
    return group, bool(qc.get("zero_point", True))


def is_ignored_key(key: str) -> bool:
    return key.endswith(IGNORED_SUFFIXES)


# ---------------------------------------------------------------------------------------------------
# Writing

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: str | os.PathLike, folder: bool = False) -> None:
    """Give a file made by ``mkstemp``/``mkdtemp`` (private by default) the usual permissions."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def replace_folder(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Publish a completely written temporary folder as ``out`` (replacing what was there): the old folder
    is set aside, swapped, then deleted, and restored if the swap fails (``publish.replace_folder``)."""
    from .publish import replace_folder as publish

    publish(tmp, out)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        make_public(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ShardWriter:
    """Stream tensors into ``model-0000k-of-0000n.safetensors`` shards of at most ``max_shard_bytes``,
    then write the index. Tensors are written as they arrive (bounded memory)."""

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3):
        self.folder = Path(folder)
        self.max_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
        make_public(self.folder / name)
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.folder / self._shards[0][0], self.folder / SINGLE_NAME)
            return
        weight_map = {}
        for i, (tmp, keys) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update({k: final for k in keys})
        write_json_atomic(self.folder / INDEX_NAME, {"metadata": {"total_size": self.total_bytes},
                                                     "weight_map": dict(sorted(weight_map.items()))})
