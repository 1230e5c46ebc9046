"""A minimal client for OpenAI-compatible chat endpoints (vLLM, TGI, llama.cpp, OpenAI), stdlib only.

Used as an external judge for head-to-head evaluation (the paper used GPT-4): ``POST
{base_url}/chat/completions`` with ``{"model", "messages", "temperature", "max_tokens", ...}``,
the reply's ``choices[0].message.content`` is the verdict. Transient failures (connection
errors, timeouts, HTTP 429 and 5xx) are retried with exponential backoff; other HTTP errors
fail at once because retrying a 400 or 401 cannot help.

The API key is read from an environment variable at request time and sent only in the
``Authorization`` header: it is never stored on the client, printed, or put in an error.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

__all__ = ["JudgeEndpointError", "OpenAICompatibleClient"]

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_BODY_SNIPPET_CHARS = 300


class JudgeEndpointError(RuntimeError):
    """The endpoint could not give a completion; the message says which URL and why."""


class OpenAICompatibleClient:
    """Chat completions from ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0, max_retries: int = 3, backoff_s: float = 1.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge endpoint must be an http(s):// URL, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    def __repr__(self) -> str:
        return f"OpenAICompatibleClient(url={self.url!r}, model={self.model!r}, key from ${self.api_key_env})"

    def _request(self, payload: dict[str, Any]) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"),
                                      headers=headers, method="POST")

    def chat(self, messages: Sequence[dict[str, str]], *, temperature: float = 0.0,
             max_tokens: int = 32, top_p: float | None = None, seed: int | None = None) -> str:
        """The first choice's message content; raises JudgeEndpointError when all tries fail."""
        payload: dict[str, Any] = {"model": self.model, "messages": list(messages),
                                   "temperature": temperature, "max_tokens": max_tokens}
        if top_p is not None:
            payload["top_p"] = top_p
        if seed is not None:
            payload["seed"] = seed
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(payload)
            except _Retryable as err:
                last_error = str(err)
        raise JudgeEndpointError(f"{self.url}: no completion after {self.max_retries + 1} attempt(s); "
                                 f"last error: {last_error}")

    def _post(self, payload: dict[str, Any]) -> str:
        try:
            with urllib.request.urlopen(self._request(payload), timeout=self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            snippet = err.read()[:_BODY_SNIPPET_CHARS].decode("utf-8", "replace")
            message = f"HTTP {err.code} {err.reason}: {snippet}"
            if err.code in _RETRY_STATUS:
                raise _Retryable(message) from None
            raise JudgeEndpointError(f"{self.url}: {message}") from None
        except (TimeoutError, socket.timeout) as err:
            raise _Retryable(f"timed out after {self.timeout_s:g} s ({err})") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.timeout_s:g} s ({err.reason})") from None
            raise _Retryable(f"cannot connect: {err.reason}") from None
        except (ConnectionError, OSError) as err:
            raise _Retryable(f"connection failed: {err}") from None
        return _content(self.url, body)


class _Retryable(Exception):
    """A failure worth another try (never leaves this module)."""


def _content(url: str, body: bytes) -> str:
    try:
        reply = json.loads(body)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        snippet = body[:_BODY_SNIPPET_CHARS].decode("utf-8", "replace")
        raise JudgeEndpointError(f"{url}: reply is not a chat completion "
                                 f"(expected choices[0].message.content): {snippet}") from None
    # Some servers return null content for an empty completion.
    return content if isinstance(content, str) else ""
