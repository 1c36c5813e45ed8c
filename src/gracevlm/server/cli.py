"""``gracevlm serve`` / ``python -m gracevlm.server``: an OpenAI-compatible HTTP server.

``register(subparsers)`` adds the ``serve`` subcommand to the main CLI; ``main(argv)`` runs it alone.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

DESCRIPTION = """\
Serve a GRACE / LLaVA-1.5 checkpoint over an OpenAI-compatible HTTP API with continuous batching:
GET /v1/models, POST /v1/chat/completions (text and image_url parts), POST /v1/completions (raw prompt,
no template), GET /health (503 while the model loads), GET /metrics (Prometheus), and a web chat page
at GET / (off with --no-ui).

Defaults are safe: bound to 127.0.0.1 (Host header checked), no cross-origin browser requests, JSON
bodies only, 20 MiB request bodies, 8 images per request, 40 Mpixel images with sides up to 8000, images
only as data:image/...;base64 URLs (no local files, no downloads) unless enabled; downloads never reach
private or loopback addresses unless --allow-private-media-hosts. See the README's Safety section. Sampling defaults to greedy
(temperature 0) as `gracevlm run` does. usage.prompt_tokens counts prompt positions, image patches
included. Supported: system/developer messages, logprobs/top_logprobs (of the distribution sampled
from), n (one prefill; seeded choices reproducible), completions with prompt lists, token ids and echo,
response_format json_object (grammar-constrained). Refused with 400: tools/functions, json_schema,
penalties, logit_bias, suffix, best_of.

On SIGTERM (or Ctrl-C) the server stops accepting connections and lets running requests finish for
up to --shutdown-grace seconds; shortly before that ends, the requests still running are ended: streams
get an error event (code "shutting_down") and `data: [DONE]`, others a 503, so no client sees a cut
connection."""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from .http_protocol import DEFAULT_HEADER_TIMEOUT
    from .media import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGE_SIDE

    from ..demo import MODEL_DIR

    p.add_argument("--model", default=str(MODEL_DIR),
                   help="checkpoint folder or Hugging Face Hub id (default: the bundled GRACE W4 demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: env GRACEVLM_API_KEY; none)")
    p.add_argument("--served-model-name", default=None, help="model id clients must send (default: --model)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="positions per request, prompt + output (default: the model's context window)")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prefill long prompts in chunks of N positions between decode steps (0: whole "
                        "prompt at once, the exact computation of `gracevlm run`)")
    p.add_argument("--prefix-cache-gib", type=float, default=2.0,
                   help="KV blocks of prompt prefixes and image features kept across requests, in GiB (default 2; 0: off). Exact: with it on, prefill runs in 64-position block-aligned chunks, so a hit gives the same bits as a miss")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV pool in GiB: the KV of every request and the prefix cache share it; a request reserves prompt + max_tokens positions when admitted and waits in the queue while they do not fit (default: half the memory available after loading)")
    p.add_argument("--kv-dtype", choices=["float32", "float16", "bfloat16"], default=None, help="dtype K/V are stored in (default: the compute dtype, float32 on CPU, exact; half types halve KV memory, logits move ~1e-3 relative, README)")
    p.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                   help="batch the lm_head too (faster at large batch; a greedy answer may then "
                        "differ in rare near-ties from the same request served alone)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, queueing included (0: no limit)")
    p.add_argument("--max-body-bytes", type=int, default=20 * 2**20, help="request body cap (413 above)")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES, help="encoded image cap (413)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="image pixel cap (413)")
    p.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_IMAGE_SIDE,
                   help="longer image side cap in pixels (413; the image is padded to a square of that side)")
    p.add_argument("--limit-images-per-prompt", type=int, default=8,
                   help="images per request (400 above; counted before any image is fetched or decoded)")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="allow file:// image URLs for files inside this folder (opened without leaving it)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="allow http(s):// image URLs (fetched by the server; public addresses only unless "
                        "--allow-private-media-hosts)")
    p.add_argument("--allow-private-media-hosts", action="store_true",
                   help="let --allow-remote-images fetch from loopback, private and link-local addresses")
    p.add_argument("--image-fetch-timeout", type=float, default=10.0,
                   help="total seconds one image download may take, redirects included")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated browser origins (scheme://host:port, or *) allowed to call the API "
                        "cross-origin (default: none; the server's own web page always works)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names accepted (default: loopback names when bound to a "
                        "loopback address, else any; * for any)")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                   help="seconds a client may take to send a request's headers before it is disconnected")
    p.add_argument("--backend", default=None, help="INT4 kernel: auto (default), reference, dense, native, ...")
    p.add_argument("--device", default="auto")
    p.add_argument("--quantize", choices=["rtn"], default=None, help="quantize a plain fp16 checkpoint at load")
    p.add_argument("--vision-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the vision tower and projector (default: the model's; see gracevlm run --help)")
    p.add_argument("--conv-mode", default=None, help="conversation template (default: from the checkpoint)")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="seconds running requests may take to finish after SIGTERM (default 5)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", dest="access_log", action="store_false")
    p.add_argument("--no-ui", dest="ui", action="store_false",
                   help="do not serve the web chat page at GET / (the API is unchanged)")


def config_from_args(args: argparse.Namespace):
    from ..errors import InputError
    from .serving import ServerConfig

    for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_image_bytes", "max_image_pixels",
                 "max_image_side", "limit_images_per_prompt"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.prefix_cache_gib < 1 << 20:
        raise InputError(f"--prefix-cache-gib must be a number of GiB >= 0, got {args.prefix_cache_gib}")
    if args.kv_cache_gib is not None and not 0 < args.kv_cache_gib < 1 << 20:
        raise InputError(f"--kv-cache-gib must be a number of GiB > 0, got {args.kv_cache_gib}")
    if args.prefill_chunk < 0 or not args.request_timeout >= 0:
        raise InputError("--prefill-chunk and --request-timeout must be >= 0")
    if not args.shutdown_grace >= 1:
        raise InputError("--shutdown-grace must be >= 1 second")
    if not 0 < args.image_fetch_timeout < float("inf") or not 0 < args.header_timeout < float("inf"):
        raise InputError("--image-fetch-timeout and --header-timeout must be positive numbers of seconds")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a TCP port (0-65535)")
    local = args.allowed_local_media_path
    if local is not None and not os.path.isdir(local):
        raise InputError(f"--allowed-local-media-path {local!r} is not a folder")
    return ServerConfig(
        model=args.model, served_model_name=args.served_model_name, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("GRACEVLM_API_KEY") or None,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_model_len=args.max_model_len,
        prefill_chunk=args.prefill_chunk or None, batch_invariant=args.batch_invariant,
        prefix_cache_gib=args.prefix_cache_gib, kv_dtype=args.kv_dtype, kv_cache_gib=args.kv_cache_gib,
        request_timeout=args.request_timeout or None, max_body_bytes=args.max_body_bytes,
        max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
        allowed_local_media_path=local, allow_remote_images=args.allow_remote_images,
        backend=args.backend, device=args.device, quantize=args.quantize, conv_mode=args.conv_mode,
        vision_dtype=args.vision_dtype, allow_private_media_hosts=args.allow_private_media_hosts,
        image_fetch_timeout=args.image_fetch_timeout, max_image_side=args.max_image_side,
        limit_images_per_prompt=args.limit_images_per_prompt, allowed_origins=_names(args.allowed_origins),
        allowed_hosts=_allowed_hosts(args.allowed_hosts, args.host))


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def _allowed_hosts(text: str | None, bind: str) -> tuple[str, ...]:
    if text is not None:
        return _names(text) or ("*",)
    return ("localhost", "127.0.0.1", "::1") if _is_loopback(bind) else ("*",)


def bind_socket(host: str, port: int):
    """The listening socket, bound before the model loads (a port in use fails at once, cleanly)."""
    import socket

    from ..errors import InputError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"--host {host!r} cannot be resolved ({exc})") from None
    family, _, _, _, address = sorted(infos, key=lambda i: i[0] != socket.AF_INET)[0]  # "localhost": IPv4
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def graceful_server(uvicorn_config, state, grace_s: float):
    """A ``uvicorn.Server`` that, on its first exit signal, ends the engine's running requests (clean
    error events / 503s) ``grace_s - 1.5`` seconds later (at least 0.5 s), before uvicorn's own
    ``timeout_graceful_shutdown`` (``grace_s``) would cut the connections."""
    import threading

    import uvicorn

    class GracefulServer(uvicorn.Server):
        _timer: threading.Timer | None = None

        def handle_exit(self, sig, frame) -> None:
            if self._timer is None:
                logging.getLogger("gracevlm.server").info(
                    "shutting down: running requests have %.1f s to finish", grace_s)
                self._timer = threading.Timer(max(0.5, grace_s - 1.5), state.shutdown)
                self._timer.daemon = True
                self._timer.start()
            super().handle_exit(sig, frame)

    return GracefulServer(uvicorn_config)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    from ..engine.devices import parse_device
    from .http_protocol import MAX_HEADER_BYTES, header_timeout_protocol

    config = config_from_args(args)
    parse_device(config.device)  # a bad --device fails here, before the port is taken
    sock = bind_socket(config.host, config.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(config.host) and not config.api_key:
        logging.getLogger("gracevlm.server").warning(
            "binding %s without an API key: anyone who can reach this address can use the model", config.host)
    app = create_app(config, ui=args.ui)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                               access_log=args.access_log, lifespan="on",
                               timeout_graceful_shutdown=max(1, round(args.shutdown_grace)),
                               http=header_timeout_protocol(args.header_timeout),
                               h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    server = graceful_server(uv_config, app.state, args.shutdown_grace)
    failed = []

    def stop_on_failure() -> None:
        failed.append(True)
        server.should_exit = True

    app.state.on_load_failure = stop_on_failure
    server.run(sockets=[sock])
    code = 0 if server.started else 1
    if failed:
        print(f"gracevlm serve: error: {app.state.load_error}", file=sys.stderr)
        code = 1
    loading = app.state._thread
    if loading is not None and loading.is_alive():  # stopped while the model loads: do not wait for it,
        sys.stdout.flush()                           # and do not let interpreter exit tear down its torch
        sys.stderr.flush()
        os._exit(code)
    return code


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to the main CLI's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..errors import GraceVLMError

    parser = argparse.ArgumentParser(prog="python -m gracevlm.server", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except GraceVLMError as exc:
        print(f"gracevlm serve: error: {exc}", file=sys.stderr)
        return 2
