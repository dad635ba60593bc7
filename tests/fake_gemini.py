"""A fake Gemini API on 127.0.0.1, for tests and benchmarks: the real google-genai
SDK talks to it over HTTP (GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:PORT).

It speaks `POST /{version}/models/{model}:generateContent` with the API's own
JSON: answers with candidates, finishReason and usageMetadata; errors as
{"error": {"code", "message", "status", "details": [google.rpc.* ...]}}.

What it answers is a `behaviour(request) -> Reply` callable, so a test can fail
the first attempt, block a prompt for safety, or refuse a key. It records every
request it saw. Run alone for manual runs and benchmarks:

    python tests/fake_gemini.py --port 8765 --latency-ms 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

MODEL_VERSION = "fake-gemini-001"


@dataclass(frozen=True)
class Request:
    """One generateContent call as the server saw it."""

    model: str
    prompt: str
    api_key: str | None
    attempt: int  # 1 for the first request with this prompt, 2 for the second, ...
    at: float  # time.monotonic() on arrival


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    delay_s: float = 0.0  # extra latency for this reply only


# ----------------------------------------------------------- wire format --
def answer(text: str, prompt: str = "", finish_reason: str = "STOP") -> Reply:
    prompt_tokens, response_tokens = len(prompt.split()), len(text.split())
    return Reply(
        200,
        {
            "candidates": [
                {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": finish_reason, "index": 0}
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": response_tokens,
                "totalTokenCount": prompt_tokens + response_tokens,
            },
            "modelVersion": MODEL_VERSION,
            "responseId": "fake-response",
        },
    )


def echo(request: Request) -> Reply:
    """The default behaviour: answer every prompt with "echo: <prompt>"."""
    return answer(f"echo: {request.prompt}", request.prompt)


def safety_block() -> Reply:
    """A 200 whose only candidate was stopped for safety: no content, no text."""
    ratings = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]
    return Reply(
        200,
        {
            "candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": ratings}],
            "usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 4},
            "modelVersion": MODEL_VERSION,
        },
    )


def hang_up() -> Reply:
    """Close the connection without answering: what a dropped network link looks like."""
    return Reply(0, {})


STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error(code: int, message: str, *details: dict[str, Any]) -> Reply:
    body: dict[str, Any] = {"code": code, "message": message, "status": STATUS_NAMES.get(code, "UNKNOWN")}
    if details:
        body["details"] = list(details)
    return Reply(code, {"error": body})


def retry_info(delay_s: float) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay_s:.3f}s"}


def quota_failure(*quota_ids: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            {
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": "gemini-flash-latest"},
                "quotaValue": "10",
            }
            for quota_id in quota_ids
        ],
    }


def rate_limited(delay_s: float, *quota_ids: str) -> Reply:
    """The API's 429: QuotaFailure says which quotas, RetryInfo says when to come back."""
    return error(
        429,
        "You exceeded your current quota, please check your plan and billing details.",
        quota_failure(*(quota_ids or ["GenerateRequestsPerMinutePerProjectPerModel-FreeTier"])),
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}],
        },
        retry_info(delay_s),
    )


class PerWindowQuota:
    """A behaviour that admits `limit` requests per fixed window of `window_s` seconds and
    answers the rest with the API's 429, its RetryInfo saying when the window ends."""

    def __init__(self, limit: int, window_s: float, then: Callable[[Request], Reply] = echo) -> None:
        self.limit, self.window_s, self.then = limit, window_s, then
        self.counts: Counter[int] = Counter()

    def __call__(self, request: Request) -> Reply:
        window = int(request.at // self.window_s)
        self.counts[window] += 1
        if self.counts[window] > self.limit:
            return rate_limited((window + 1) * self.window_s - request.at)
        return self.then(request)


class DailyQuota:
    """A behaviour that answers `limit` requests, then only the API's per-day 429."""

    PER_DAY = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"

    def __init__(self, limit: int) -> None:
        self.limit, self.answered = limit, 0
        self.first_refusal_at: float | None = None

    def __call__(self, request: Request) -> Reply:
        if self.answered >= self.limit:
            self.first_refusal_at = self.first_refusal_at or request.at
            return rate_limited(3600 * 7, self.PER_DAY)
        self.answered += 1
        return echo(request)


def invalid_key() -> Reply:
    """What the API answers to a wrong key: 400 with reason API_KEY_INVALID."""
    return error(
        400,
        "API key not valid. Please pass a valid API key.",
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"},
        },
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": "API key not valid. Please pass a valid API key."},
    )


# ---------------------------------------------------------------- server --
@dataclass
class FakeGemini:
    """The server. `with FakeGemini(behaviour) as server:` runs it on a free port in
    a background thread; `server.base_url` is what GOOGLE_GEMINI_BASE_URL takes."""

    behaviour: Callable[[Request], Reply] = echo
    latency_s: float = 0.0
    requests: list[Request] = field(default_factory=list)
    answered: Counter[str] = field(default_factory=Counter)  # 200s per prompt: what the user paid for
    answered_at: list[float] = field(default_factory=list)  # arrival times of the requests answered 200
    port: int = 0
    _attempts: Counter[str] = field(default_factory=Counter)
    _seen: threading.Condition = field(default_factory=threading.Condition)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for_requests(self, count: int, timeout: float = 10) -> bool:
        """Block until the server has seen `count` requests (for tests in another thread)."""
        with self._seen:
            return self._seen.wait_for(lambda: len(self.requests) >= count, timeout)

    def __enter__(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve(ready.set)), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake Gemini server did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    async def _serve(self, on_ready: Callable[[], object]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        on_ready()
        async with server:
            await self._stopped.wait()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request_line := await reader.readline():
                method, path, _ = request_line.decode().split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                reply = await self._reply(method, path, headers, body)
                if reply.status == 0:
                    break
                payload = json.dumps(reply.body).encode()
                writer.write(
                    f"HTTP/1.1 {reply.status} {'OK' if reply.status == 200 else 'Error'}\r\n"
                    f"Content-Type: application/json; charset=UTF-8\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client hung up, or the server is stopping
        finally:
            writer.close()

    async def _reply(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        model, _, verb = path.rpartition("/models/")[2].partition(":")
        if method != "POST" or verb != "generateContent":
            return error(404, f"Method not found: {method} {path}")
        prompt = "".join(p.get("text", "") for c in json.loads(body)["contents"] for p in c["parts"])
        with self._seen:
            self._attempts[prompt] += 1
            request = Request(model, prompt, headers.get("x-goog-api-key"), self._attempts[prompt], time.monotonic())
            self.requests.append(request)
            self._seen.notify_all()
        reply = self.behaviour(request)
        if reply.status == 200:
            with self._seen:
                self.answered[prompt] += 1
                self.answered_at.append(request.at)
        if self.latency_s or reply.delay_s:
            await asyncio.sleep(self.latency_s + reply.delay_s)
        return reply


def cli() -> None:
    parser = argparse.ArgumentParser(description="Run the fake Gemini server in the foreground.")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeGemini(latency_s=args.latency_ms / 1000, port=args.port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server._serve(lambda: print(f"fake Gemini on {server.base_url} (Ctrl-C stops it)", flush=True)))


if __name__ == "__main__":
    cli()
