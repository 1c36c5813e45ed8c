"""A small client for any OpenAI-compatible chat completions endpoint (urllib only)."""
from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import InputError

_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"), (b"RIFF", "image/webp"),
          (b"BM", "image/bmp"))


def image_data_url(image: str | bytes) -> str:
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    mime = next((m for sig, m in _MAGIC if data.startswith(sig)), "image/png")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def chat_url(endpoint: str) -> str:
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class EndpointClient:
    """POSTs one user message (optional image part + text part) to ``/v1/chat/completions``."""

    def __init__(self, endpoint: str, api_key: str | None = None, model: str | None = None, timeout: float = 600,
                 retries: int = 3):
        if not endpoint.startswith(("http://", "https://")):
            raise InputError(f"--endpoint must be an http(s) URL, got {endpoint!r}")
        self.url = chat_url(endpoint)
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.model = model or self._first_model() or "default"

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _first_model(self) -> str | None:
        url = self.url[: -len("/chat/completions")] + "/models"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=self._headers()),
                                        timeout=min(self.timeout, 30)) as resp:
                data = json.loads(resp.read())
            return data["data"][0]["id"]
        except Exception:  # no /models route: the server picks its model
            return None

    def complete(self, text: str, image: str | bytes | None, max_tokens: int, temperature: float) -> str:
        if image is None:
            content = text
        else:
            content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                       {"type": "text", "text": text}]
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": temperature, "max_tokens": max_tokens, "stream": False}).encode()
        last = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read())
                msg = data["choices"][0]["message"]["content"]
                return (msg or "").strip()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500].decode("utf-8", "replace")
                if exc.code < 500 and exc.code != 429:
                    raise InputError(f"endpoint {self.url} answered HTTP {exc.code}: {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = str(exc)
            except (KeyError, IndexError, ValueError) as exc:
                raise InputError(f"endpoint {self.url} gave an unexpected response: {exc!r}") from None
            if attempt < self.retries:
                time.sleep(min(2 ** attempt, 10))
        raise InputError(f"endpoint {self.url} failed after {self.retries + 1} attempts: {last}")
