"""Load test for ``gracevlm serve``: throughput and latency at several concurrency levels.

Only talks to this machine: the URL's host must be 127.0.0.1, localhost or ::1 (anything else is refused).
Bounded: at most ``--requests`` requests (<= 512) per level and ``--time-limit`` seconds (<= 600) per level.

    # against a running server
    python benchmarks/load_server.py --url http://127.0.0.1:8000 [--api-key KEY]
    # start a server on a checkpoint (or a freshly synthesized tiny one) and stop it afterwards
    python benchmarks/load_server.py --model path/to/ckpt
    python benchmarks/load_server.py --tiny

Each request is a streamed chat completion (greedy, ``--max-tokens`` tokens, optionally with a small image).
Per level it reports req/s, output tok/s (completion tokens from the usage chunk / wall time), and p50 / p95
of request latency and of time to first token.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS, MAX_SECONDS, MAX_TOKENS = 512, 600, 1024

PROMPTS = ["Describe the picture in detail.", "What colours do you see?", "Tell me a short story about a boat.",
           "List three things that are red.", "Why is the sky blue?", "Write a haiku about autumn.",
           "What is the capital of France?", "Explain continuous batching in one sentence."]


def _check_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise SystemExit(f"refusing {url!r}: this benchmark only talks to http://127.0.0.1 (or localhost / ::1)")
    return parts


class Client:
    def __init__(self, url: str, api_key: str | None):
        parts = _check_url(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get_json(self, path: str, timeout: float = 5.0):
        conn = self._conn(timeout)
        try:
            conn.request("GET", path, headers=self.headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def stream_chat(self, body: dict, timeout: float) -> dict:
        """One streamed chat completion -> {ok, latency, ttft, tokens, status}."""
        t0 = time.perf_counter()
        conn = self._conn(timeout)
        ttft, tokens, status = None, 0, 0
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=self.headers)
            resp = conn.getresponse()
            status = resp.status
            if status != 200:
                resp.read()
                return {"ok": False, "status": status, "latency": time.perf_counter() - t0, "ttft": None, "tokens": 0}
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"ok": False, "status": 200, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": 0}
                for choice in chunk.get("choices") or []:
                    if ttft is None and choice.get("delta", {}).get("content"):
                        ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        except (OSError, http.client.HTTPException, ValueError):
            return {"ok": False, "status": status, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": 0}
        finally:
            conn.close()
        return {"ok": True, "status": status, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))
    return ordered[k]


def _image_url() -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), (235, 235, 225))
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), fill=(210, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_level(client: Client, model: str, concurrency: int, n_requests: int, max_tokens: int, time_limit: float,
              image: str | None) -> dict:
    deadline = time.perf_counter() + time_limit
    counter = iter(range(n_requests))
    lock = threading.Lock()
    results: list[dict] = []

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            content = PROMPTS[i % len(PROMPTS)]
            if image is not None:
                content = [{"type": "text", "text": content}, {"type": "image_url", "image_url": {"url": image}}]
            body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            r = client.stream_chat(body, timeout=max(1.0, deadline - time.perf_counter()))
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
            "wall_s": round(wall, 3), "req_per_s": round(len(ok) / wall, 3) if wall else 0.0,
            "output_tok_per_s": round(tokens / wall, 2) if wall else 0.0, "output_tokens": tokens,
            "latency_p50_s": _r(percentile(lat, 50)), "latency_p95_s": _r(percentile(lat, 95)),
            "ttft_p50_s": _r(percentile(ttft, 50)), "ttft_p95_s": _r(percentile(ttft, 95))}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str], log_path: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "gracevlm.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--no-access-log", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = Client(url, None)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited (code {proc.returncode}); see {log_path}")
        try:
            if client.get_json("/health", timeout=2)[0] == 200:
                return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise SystemExit(f"the server did not become healthy in 300 s; see {log_path}")
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, http://127.0.0.1:PORT")
    src.add_argument("--model", help="start a server on this checkpoint folder")
    src.add_argument("--tiny", action="store_true", help="synthesize a tiny checkpoint and serve it")
    ap.add_argument("--api-key", default=os.environ.get("GRACEVLM_API_KEY"))
    ap.add_argument("--model-name", default=None, help="model id to request (default: the first of /v1/models)")
    ap.add_argument("--concurrency", default="1,4,8", help="comma-separated levels (default 1,4,8)")
    ap.add_argument("--requests", type=int, default=32, help=f"requests per level (<= {MAX_REQUESTS})")
    ap.add_argument("--max-tokens", type=int, default=32, help=f"tokens per request (<= {MAX_TOKENS})")
    ap.add_argument("--time-limit", type=float, default=60.0, help=f"seconds per level (<= {MAX_SECONDS})")
    ap.add_argument("--image", action="store_true", help="attach a small image to every request")
    ap.add_argument("--server-arg", action="append", default=[], help="extra flag for a started server")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or max(levels) > 64:
        raise SystemExit("--concurrency levels must be in 1..64")
    n_req = max(1, min(args.requests, MAX_REQUESTS))
    max_tokens = max(1, min(args.max_tokens, MAX_TOKENS))
    time_limit = max(1.0, min(args.time_limit, MAX_SECONDS))

    proc, tmp = None, None
    try:
        if args.url:
            url = args.url.rstrip("/")
            _check_url(url)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="gracevlm-load-")
            model = args.model
            if args.tiny:
                from gracevlm.synth.checkpoint import synthesize

                model = str(synthesize(os.path.join(tmp.name, "tiny"), "tiny", "awq", seed=0, progress=False))
            extra = list(args.server_arg) + ["--max-batch-size", str(max(levels))]
            proc, url = start_server(model, extra, os.path.join(tmp.name, "server.log"))
        client = Client(url, args.api_key)
        name = args.model_name
        if name is None:
            status, models = client.get_json("/v1/models")
            if status != 200:
                raise SystemExit(f"GET /v1/models answered {status}: {models}")
            name = models["data"][0]["id"]
        image = _image_url() if args.image else None
        for prompt in PROMPTS:  # warm up: first use of each prompt shape, kernels' prepared layouts
            content = prompt if image is None else [{"type": "text", "text": prompt},
                                                    {"type": "image_url", "image_url": {"url": image}}]
            client.stream_chat({"model": name, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                                "stream": True}, timeout=120)
        report = {"url": url, "model": name, "max_tokens": max_tokens, "image": bool(image), "levels": []}
        for c in levels:
            level = run_level(client, name, c, n_req, max_tokens, time_limit, image)
            report["levels"].append(level)
            if not args.json:
                print(f"concurrency {c:>2}: {level['ok']:>3}/{level['requests']} ok in {level['wall_s']:.2f} s  "
                      f"{level['req_per_s']:.2f} req/s  {level['output_tok_per_s']:.1f} output tok/s  "
                      f"latency p50 {level['latency_p50_s']} s p95 {level['latency_p95_s']} s  "
                      f"TTFT p50 {level['ttft_p50_s']} s p95 {level['ttft_p95_s']} s", flush=True)
        if args.json:
            print(json.dumps(report))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
