"""``gracevlm doctor``: which kernel path each kind of layer takes on this machine, and why.

Reports (``diagnose()``, a JSON-able dict; ``format_report`` prints it): the CPU's SIMD features as the kernel
read them (/proc/cpuinfo flags), the native C library (loaded or not, its code path, why not), torch, CUDA,
Triton and GPU facts, the memory bandwidth measured now (``bench.measure_bandwidth`` on CPU, a device copy on
a GPU), the backend chosen for each kind of layer (INT4 linears at decode / batched decode / prefill,
``lm_head``, vision tower) on each device, and what to install or change to get a faster path.
"""
from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8")
ISA_NAMES = {3: "AVX-512 VNNI", 2: "AVX2/FMA/F16C", 0: "portable scalar C"}
ROWS = {"decode, 1 row": 1, "batched decode, 16 rows": 16, "prefill, 512 rows": 512}


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """The flags in ``CPU_FLAGS`` found in /proc/cpuinfo (all False where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            found = set(line.split(":", 1)[1].split())
            break
    return {f: f in found for f in CPU_FLAGS}


def native_status() -> dict:
    """The native CPU library: loaded, its code path and OpenMP, or why it is unavailable."""
    from .kernels import native

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lib = native.load_library()
    if lib is None:
        return {"loaded": False, "error": native.load_error(), "compiler": os.environ.get("CC", "cc")}
    isa = int(lib.gv_isa())
    return {"loaded": True, "isa": ISA_NAMES.get(isa, str(isa)), "openmp": bool(lib.gv_has_openmp()),
            "threads": native.num_threads(), "source_hash": native.source_hash(),
            "path": getattr(lib, "_name", None)}  # built by pip install, or compiled on first use into the cache


def gpu_status() -> dict:
    from .kernels import triton_w4a16

    out = {"torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "triton": triton_w4a16.triton_version(), "triton_interpreter": triton_w4a16.interpreting(),
           "nvidia_device_node": os.path.exists("/dev/nvidia0"), "gpus": []}
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1),
                                "multiprocessors": p.multi_processor_count})
    return out


def gpu_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Device memory bandwidth in GB/s: best of a few device-to-device copies, bytes read plus written."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n * 4 / best / 1e9


def _int4_path(device: torch.device, rows: int) -> tuple[str, str]:
    """(backend, why) for an INT4 layer on ``device`` with ``rows`` rows, as ``select_backend`` decides."""
    from . import kernels

    forced = os.environ.get("GRACEVLM_BACKEND")
    if forced and forced != "auto":
        return forced, "forced by GRACEVLM_BACKEND"
    name = kernels.select_backend(device, rows).name
    if device.type == "cpu":
        if name in ("native", "native-igemm"):
            probe = SimpleNamespace(group_size=128)  # LLaVA's group size
            cut = kernels.get_backend(name).min_gemm_rows(probe)
            if rows >= cut and name == "native-igemm":
                return name, (f"native C integer GEMM: exact codes x activations in 16-bit fixed point "
                              f"(rows >= {cut} at group 128; ~2.5e-5 relative error)")
            if rows >= cut:
                return name, f"native C: exact fp32 weight tiles + torch GEMM (rows >= {cut} at group 128)"
            return name, "native C small-M kernel (weights exact, activations in 24-bit fixed point)"
        return name, "native library not loaded: torch CPU fallback"
    if name == "triton":
        kind = "split-K GEMV" if rows <= kernels.get_backend("triton").gemv_max_rows else "tiled tensor-core GEMM"
        return name, f"Triton W4A16 {kind} (exact codes x fp16 scales, fp32 sums)"
    return name, ("triton is not installed: dequantize the whole weight on every call, then a GEMM (slow)"
                  if device.type == "cuda" else "no INT4 kernel for this device type")


def layer_paths(device: torch.device, cpu_info: dict, native: dict) -> list[dict]:
    rows = [{"layer": f"INT4 linear ({label})", **dict(zip(("backend", "why"), _int4_path(device, m)))}
            for label, m in ROWS.items()]
    if device.type == "cpu":
        head = ("HalfLinear (fp16 weight kept, native fp32 GEMV)" if native["loaded"]
                else "nn.Linear in fp32 (fp16 weight converted at load)")
        bf16 = cpu_info.get("avx512_bf16") or cpu_info.get("amx_bf16")
        vision = ("fp32 by default; --vision-dtype bfloat16 runs on native bf16 instructions here" if bf16 else
                  "fp32 (no AVX512-BF16/AMX here: bf16 would be emulated and slower)")
    else:
        head, vision = "nn.Linear in fp16 (cuBLAS)", "fp16 on the GPU (cuDNN/cuBLAS)"
    rows.append({"layer": "lm_head", "backend": head, "why": "dense fp16 weight in the checkpoint"})
    rows.append({"layer": "vision tower + projector", "backend": vision, "why": "dense CLIP weights"})
    return rows


def advice(cpu_info: dict, native: dict, gpu: dict) -> list[str]:
    out = []
    if not native["loaded"]:
        out.append(f"native CPU kernels unavailable ({native.get('error')}): install a C compiler (e.g. "
                   "`apt-get install gcc`, or set CC) and reinstall with `pip install -e .`; the torch "
                   "fallback is several times slower at decode")
    elif native.get("isa") != "AVX-512 VNNI":
        out.append("this CPU has no AVX-512 VNNI: the native kernels run their AVX2 path (a CPU with AVX-512 "
                   "VNNI runs the integer dot products with vpdpbusd)")
    if native.get("loaded") and not native.get("openmp"):
        out.append("the native library was built without OpenMP: one thread only; install libgomp and rebuild")
    if gpu["nvidia_device_node"] and not gpu["torch_cuda"]:
        out.append("an NVIDIA device is present but this torch has no CUDA: install a CUDA build of torch")
    if gpu["cuda_available"] and gpu["triton"] is None:
        out.append("CUDA is available but triton is not installed: `pip install triton` for the W4A16 kernels "
                   "(without it INT4 layers on the GPU dequantize the whole weight on every call)")
    if gpu["triton_interpreter"]:
        out.append("TRITON_INTERPRET is set: Triton kernels run in the slow CPU interpreter; unset it")
    if not (cpu_info.get("avx512_bf16") or cpu_info.get("amx_bf16")):
        out.append("no AVX512-BF16/AMX: keep the vision tower in fp32 on CPU (bf16 is emulated here)")
    return out


def diagnose(bandwidth: bool = True, bandwidth_gib: float = 1.0) -> dict:
    """Everything ``gracevlm doctor`` reports (module docstring)."""
    from . import bench

    cpu_info = cpu_flags()
    native = native_status()
    gpu = gpu_status()
    report = {"machine": {"cpu": bench.cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
              "cpu_flags": cpu_info, "native": native, "gpu": gpu,
              "paths": {"cpu": layer_paths(torch.device("cpu"), cpu_info, native)}}
    if gpu["cuda_available"]:
        report["paths"]["cuda"] = layer_paths(torch.device("cuda"), cpu_info, native)
    if bandwidth:
        report["bandwidth_gbps"] = {"cpu": round(bench.measure_bandwidth(bandwidth_gib), 2)}
        if gpu["cuda_available"]:
            report["bandwidth_gbps"]["cuda"] = round(gpu_bandwidth(torch.device("cuda"), bandwidth_gib), 1)
    report["advice"] = advice(cpu_info, native, gpu)
    return report


def format_report(r: dict) -> str:
    m, g, n = r["machine"], r["gpu"], r["native"]
    flags = ", ".join(f for f, on in r["cpu_flags"].items() if on) or "none found"
    lines = [f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), python {m['python']}",
             f"CPU features: {flags}",
             "native CPU library: " + (f"loaded from {n['path']}, {n['isa']} path, OpenMP "
                                       f"{'on' if n['openmp'] else 'off'}, {n['threads']} threads" if n["loaded"]
                                       else f"NOT loaded ({n['error']})"),
             f"torch {m['torch']} (CPU capability {m['torch_cpu_capability']}), CUDA "
             f"{g['torch_cuda'] or 'not in this build'}, available: {g['cuda_available']}; triton "
             f"{g['triton'] or 'not installed'}" + (" (interpreter)" if g["triton_interpreter"] else "")]
    for gpu in g["gpus"]:
        lines.append(f"GPU {gpu['index']}: {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, "
                     f"{gpu['memory_gib']} GiB, {gpu['multiprocessors']} SMs)")
    if "bandwidth_gbps" in r:
        lines.append("memory bandwidth measured now: " + ", ".join(f"{d} {v} GB/s" for d, v in r["bandwidth_gbps"].items()))
    for dev, rows in r["paths"].items():
        lines.append(f"kernel paths on {dev}:")
        width = max(len(x["layer"]) for x in rows)
        lines += [f"  {x['layer']:<{width}}  {x['backend']}: {x['why']}" for x in rows]
    lines.append("to get faster paths:" if r["advice"] else "nothing to install: the fastest paths here are in use")
    lines += [f"  - {a}" for a in r["advice"]]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth measurement (a few seconds)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer size of the bandwidth measurement")


def run_cli(args) -> int:
    import json

    from .errors import InputError

    if not 0.01 <= args.bandwidth_gib <= 64:
        raise InputError(f"--bandwidth-gib must be between 0.01 and 64, got {args.bandwidth_gib}")
    report = diagnose(bandwidth=not args.no_bandwidth, bandwidth_gib=args.bandwidth_gib)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
