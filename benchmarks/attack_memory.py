"""Peak resident memory of `gracevlm serve` under the attack report's memory bombs (issue 19).

    python benchmarks/attack_memory.py [--model DIR] [--as-limit-gib 4] [--json]

Starts the server (default: the bundled demo model) under an address-space limit, then for each probe
resets the process's peak (/proc/PID/clear_refs) and reports the HTTP status and the peak resident size
above the resident size before the request (VmHWM - VmRSS):

* a 2 MB text prompt (chat and completions);
* a 40000x1000 PNG (118 KB, exactly 40 Mpx) that padding would turn into a 40000^2 canvas;
* 10,000 1x1 PNGs in one request;
* resident size after three requests with three 2500x2000 images each (memory kept after big requests).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image


def _png(size, color=(10, 200, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--as-limit-gib", type=float, default=4.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limit = int(args.as_limit_gib * 2**30)
    cmd = [sys.executable, "-m", "gracevlm.server", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 300
        while True:
            try:
                health = httpx.get(base + "/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit("the server did not start")
            time.sleep(0.3)
        model = health.json()["model"]

        def chat(text, *urls):
            parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
            return {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 2}

        def probe(body, path="/v1/chat/completions"):
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            before = _status(proc.pid, "VmRSS")
            r = httpx.post(base + path, json=body, timeout=600)
            return {"status": r.status_code, "peak_above_before_mib": round((_status(proc.pid, "VmHWM") - before)
                                                                            / 2**20, 1)}

        prompt = "word " * 400_000
        out = {"model": model, "idle_rss_mib": round(_status(proc.pid, "VmRSS") / 2**20, 1),
               "prompt_2mb_chat": probe(chat(prompt)),
               "prompt_2mb_completions": probe({"model": model, "prompt": prompt, "max_tokens": 2}, "/v1/completions"),
               "png_40000x1000": probe(chat("x", _png((40_000, 1000)))),
               "pngs_10000_of_1x1": probe(chat("x", *[_png((1, 1))] * 10_000))}
        big = _png((2500, 2000))
        before = _status(proc.pid, "VmRSS")
        codes = [httpx.post(base + "/v1/chat/completions", json=chat("x", big, big, big), timeout=600).status_code
                 for _ in range(3)]
        out["three_big_requests"] = {"status": codes, "rss_before_mib": round(before / 2**20, 1),
                                     "rss_after_mib": round(_status(proc.pid, "VmRSS") / 2**20, 1)}
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
