"""A fake Gemini API on 127.0.0.1, for tests and benchmarks: the real google-genai
SDK talks to it over HTTP (GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:PORT).

It speaks `POST /{version}/models/{model}:generateContent` (and Vertex AI's
`/v1beta1/projects/{p}/locations/{l}/publishers/google/models/{model}:generateContent`,
recording its bearer token) with the API's own
JSON: answers with candidates, finishReason and usageMetadata; errors as
{"error": {"code", "message", "status", "details": [google.rpc.* ...]}}. And the
Batch API as google-genai calls it: `models/{model}:batchGenerateContent` (inline
requests or an uploaded file), `GET batches/{id}` (a long-running Operation whose
GenerateContentBatch moves from BATCH_STATE_PENDING through RUNNING to its end
over a few polls), and the Files API's resumable upload and `files/{id}:download`.

What it answers is a `behaviour(request) -> Reply` callable, so a test can fail
the first attempt, block a prompt for safety, or refuse a key. It records every
request it saw. Run alone for manual runs and benchmarks:

    python tests/fake_gemini.py --port 8765 --latency-ms 100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import itertools
import json
import random
import re
import signal
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import api_contract

MODEL_VERSION = "fake-gemini-001"


@dataclass(frozen=True)
class Request:
    """One generateContent call as the server saw it."""

    model: str
    prompt: str
    api_key: str | None
    attempt: int  # 1 for the first request with this prompt, 2 for the second, ...
    at: float  # time.monotonic() on arrival
    body: dict[str, Any] = field(default_factory=dict)  # the GenerateContentRequest as sent: settings and all
    path: str = ""  # e.g. /v1beta/models/m:generateContent, or Vertex AI's /v1beta1/projects/p/locations/l/...
    authorization: str | None = None  # Vertex AI's "Bearer <token>"
    server_timeout: str | None = None  # the X-Server-Timeout header: the client's deadline, in whole seconds
    media: tuple[
        tuple[str, str, str], ...
    ] = ()  # the last turn's files, in order: ("inline", SHA-256 of the bytes, MIME) or ("file", URI, MIME)


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any] | bytes  # bytes: sent as they are (a file download)
    delay_s: float = 0.0  # extra latency for this reply only
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class BatchJob:
    """A job of the Batch API as the server keeps it: its requests, and how far it got."""

    name: str  # "batches/<id>"
    model: str
    display_name: str
    requests: list[tuple[str, dict[str, Any]]]  # (key, GenerateContentRequest), in order
    from_file: bool  # submitted as an uploaded JSONL file, not inline
    state: str = "BATCH_STATE_PENDING"
    polls: int = 0
    output: dict[str, Any] | None = None  # GenerateContentBatchOutput, once succeeded

    @property
    def done(self) -> bool:
        return self.state not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")


# ----------------------------------------------------------- wire format --
def prompt_tokens_of(prompt: str) -> int:
    """What this server counts as a prompt's input tokens (and reports in promptTokenCount): its words."""
    return len(prompt.split())


def answer(text: str, prompt: str = "", finish_reason: str = "STOP", thinking: int = 0, cached: int = 0) -> Reply:
    """A 200 with `text`; `thinking` and `cached` tokens are reported as the API does:
    absent when 0, cached ones counted in promptTokenCount too."""
    prompt_tokens, response_tokens = prompt_tokens_of(prompt) + cached, len(text.split())
    usage = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": response_tokens}
    if thinking:
        usage["thoughtsTokenCount"] = thinking
    if cached:
        usage["cachedContentTokenCount"] = cached
    return Reply(
        200,
        {
            "candidates": [
                {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": finish_reason, "index": 0}
            ],
            "usageMetadata": {**usage, "totalTokenCount": prompt_tokens + response_tokens + thinking},
            "modelVersion": MODEL_VERSION,
            "responseId": "fake-response",
        },
    )


def echo(request: Request) -> Reply:
    """The default behaviour: answer every prompt with "echo: <prompt>"."""
    return answer(f"echo: {request.prompt}", request.prompt)


def thinker(thoughts: Callable[[Request], int], then: Callable[[Request], Reply] = echo) -> Callable[[Request], Reply]:
    """Thinking as Gemini 2.5 and 3 do it (python-genai#811, langchain-google#1020): a
    request thinks `thoughts(request)` tokens (at most thinkingConfig.thinkingBudget, none
    at 0) before it answers what `then` would, and thoughts come first out of
    maxOutputTokens. What is left bounds the answer (a word a token here): cut there with
    finishReason MAX_TOKENS, and with nothing left a candidate whose content has no parts."""

    def behaviour(request: Request) -> Reply:
        reply = then(request)
        if reply.status != 200 or not isinstance(reply.body, dict):
            return reply
        config = request.body.get("generationConfig", {})
        thinking = config.get(
            "thinkingConfig", {}
        )  # google-genai sends its fields in snake_case, as the API also reads them
        budget, limit = thinking.get("thinkingBudget", thinking.get("thinking_budget")), config.get("maxOutputTokens")
        thought = thoughts(request) if budget is None or budget < 0 else min(thoughts(request), budget)
        text = "".join(part.get("text", "") for part in reply.body["candidates"][0]["content"]["parts"])
        if limit is None or thought + len(text.split()) <= limit:
            return answer(text, request.prompt, thinking=thought)
        thought = min(thought, limit)
        if thought == limit:
            usage = {"promptTokenCount": prompt_tokens_of(request.prompt), "thoughtsTokenCount": thought}
            candidate = {"content": {"role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}
            body = {
                "candidates": [candidate],
                "usageMetadata": {**usage, "totalTokenCount": sum(usage.values())},
                "modelVersion": MODEL_VERSION,
                "responseId": "fake-response",
            }
            return Reply(200, body)
        return answer(
            " ".join(text.split()[: limit - thought]) + " ",
            request.prompt,
            finish_reason="MAX_TOKENS",
            thinking=thought,
        )

    return behaviour


def safety_block() -> Reply:
    """A 200 whose only candidate was stopped for safety: no content, no text."""
    ratings = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]
    return Reply(
        200,
        {
            "candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": ratings}],
            "usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 4},
            "modelVersion": MODEL_VERSION,
            "responseId": "fake-response",
        },
    )


def raw_error(status: int, body: bytes, content_type: str = "application/json; charset=UTF-8") -> Reply:
    """An error whose body is not the API's {"error": {...}}: what proxies and gateways send."""
    return Reply(status, body, headers={"Content-Type": content_type})


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


GRPC_CODES = {  # google.rpc.Code, by the status names above
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "UNAUTHENTICATED": 16,
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
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_"
                + ("input_token_count" if "InputTokens" in quota_id else "requests"),
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
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
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


class PerWindowTokenQuota:
    """A behaviour that admits `limit` input tokens (as prompt_tokens_of counts them) per
    fixed window of `window_s` seconds, and answers a request that would pass it with the
    API's 429 for the input-tokens-per-minute quota."""

    QUOTA_ID = "GenerateContentInputTokensPerModelPerMinute"

    def __init__(self, limit: int, window_s: float, then: Callable[[Request], Reply] = echo) -> None:
        self.limit, self.window_s, self.then = limit, window_s, then
        self.tokens: Counter[int] = Counter()  # admitted input tokens per window

    def __call__(self, request: Request) -> Reply:
        window, tokens = int(request.at // self.window_s), prompt_tokens_of(request.prompt)
        if self.tokens[window] + tokens > self.limit:
            return rate_limited((window + 1) * self.window_s - request.at, self.QUOTA_ID)
        self.tokens[window] += tokens
        return self.then(request)


def unknown_model(request: Request) -> Reply:
    """The API's 404 for a model name it does not know."""
    return error(
        404,
        f"models/{request.model} is not found for API version v1beta, or is not supported for generateContent. "
        "Call ListModels to see the list of available models and their supported methods.",
    )


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
        {
            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
            "locale": "en-US",
            "message": "API key not valid. Please pass a valid API key.",
        },
    )


# ---------------------------------------------------------------- server --
@dataclass(frozen=True)
class Call:
    """One request, as a route's handler gets it."""

    method: str
    route: str  # the path without its query
    match: re.Match[str]  # the route's pattern matched: its groups name what the path names
    raw_query: str
    headers: dict[str, str]
    body: bytes

    @property
    def query(self) -> dict[str, str]:
        return dict(part.partition("=")[::2] for part in self.raw_query.split("&") if part)

    @property
    def api_key(self) -> str | None:
        return self.headers.get("x-goog-api-key")


def routes(*entries: tuple[str | None, str, str]) -> list[tuple[str | None, re.Pattern[str], str]]:
    """An API's routes: (method, None for any; the path's pattern; FakeGemini's handler)."""
    return [(method, re.compile(pattern), handler) for method, pattern, handler in entries]


PROJECT = r"(?:projects/[^/]+/locations/[^/]+/)?"  # Vertex AI's paths are within a project and location
ROUTERS = {  # the fake's five APIs, each its routes in the order they are tried; the first match serves
    "generation": routes(
        ("POST", rf"/v1\w*/{PROJECT}(?:publishers/google/)?models/([^/:]+):generateContent", "_generate"),
        ("POST", r".*:countTokens", "_count_tokens"),
    ),
    "models": routes(("GET", rf"/v1\w*/{PROJECT}(?:publishers/google/)?models/([^/:]+)", "_get_model")),
    "caching": routes((None, rf"/v1\w*/({PROJECT})cachedContents(/[^/]+)?", "_caching")),
    "batch": routes(
        ("POST", r".*/models/([^/:]+):batchGenerateContent", "_batch_create"),
        ("GET", r"/v1\w*/batches", "_batch_list"),
        ("GET", r"/v1\w*/(batches/[^/]+)", "_batch_get"),
    ),
    "files": routes(
        ("POST", r"/upload/.*", "_file_upload"),
        (None, r"/v1\w*/files(/[^/:]+)?", "_file"),
        ("GET", r"/v1\w*/files/([^/:]+):download", "_file_download"),
    ),
}


@dataclass
class FakeGemini:
    """The server. `with FakeGemini(behaviour) as server:` runs it on a free port in
    a background thread; `server.base_url` is what GOOGLE_GEMINI_BASE_URL takes."""

    behaviour: Callable[[Request], Reply] = echo
    latency_s: float = 0.0
    requests: list[Request] = field(default_factory=list)
    answered: Counter[str] = field(default_factory=Counter)  # 200s per prompt: what the user paid for
    answered_at: list[float] = field(default_factory=list)  # arrival times of the requests answered 200...
    answered_prompts: list[str] = field(default_factory=list)  # ...and their prompts
    port: int = 0
    host: str = "127.0.0.1"  # any loopback address (127.0.0.0/8): a second host for redirect tests
    # The Batch API: a job is pending for the first batch_polls[0] GETs, running for the
    # next batch_polls[1], then ends in the state batch_outcome(job) gives; a succeeded
    # job's requests are answered then, each by `behaviour` (so per-request errors too).
    batch_polls: tuple[int, int] = (1, 1)
    batch_outcome: Callable[[BatchJob], str] = lambda job: "BATCH_STATE_SUCCEEDED"
    batch_shuffle: bool = False  # results out of request order, inline ones without their metadata
    batches: dict[str, BatchJob] = field(default_factory=dict)  # by name, in order of creation
    # A server full: beyond `capacity` generateContent requests in flight, a 429 with no
    # details (Vertex AI's dynamic shared quota, Gemini under load); None: no limit.
    capacity: int | None = None
    # The service tier a request asking for one (serviceTier) is served at, given what it
    # asked: said in the x-gemini-service-tier header and usageMetadata.serviceTier, as the
    # API does. Priority may fall back to standard: lambda asked: "standard".
    tier_served: Callable[[str], str] = lambda asked: asked
    # Context caching: explicit caches (cachedContents, a minimum of cache_min_tokens) and,
    # when implicit_caching, a repeated prefix (the turns before the last) reported as cached.
    caches: dict[str, dict[str, Any]] = field(default_factory=dict)  # alive, by name
    cache_events: list[tuple[str, str]] = field(
        default_factory=list
    )  # ("create" | "update" | "delete", name), in order
    cache_min_tokens: int = 1024
    implicit_caching: bool = False
    count_tokens_requests: list[dict[str, Any]] = field(default_factory=list)  # countTokens bodies
    _prefixes: set[str] = field(default_factory=set)
    _cache_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    in_flight: int = 0
    most_in_flight: int = 0  # the most generateContent requests it held at once
    refused_full: int = 0  # the 429s it answered for being full
    model_gets: int = 0  # GET models/{model}: what the pipeline probes a host with
    gone_at: float | None = None  # time.time() when outage() closed it...
    back_at: float | None = None  # ...and when it listened again
    _tasks: set[Any] = field(default_factory=set)
    batch_gets: int = 0
    batch_lists: int = 0
    files: dict[str, bytes] = field(default_factory=dict)  # uploaded and result files, by name
    _uploads: dict[str, bytearray] = field(default_factory=dict)
    _upload_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    file_meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # uploads' File resources, by name
    upload_log: list[tuple[str, str]] = field(default_factory=list)  # (display name, SHA-256) of each upload, in order
    processing_gets: int = 0  # an upload is PROCESSING for this many GETs of it, then ACTIVE (as a video is)
    file_gets: Counter[str] = field(default_factory=Counter)  # GETs of each file, by name
    deleted_files: list[str] = field(default_factory=list)  # names deleted through the Files API, in order
    _upload_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # Byte strings a test must never see reach the server (a secret file's, the environment's):
    # every request body, upload chunks included, is searched for each, as it is and in
    # base64 (inline data), and `watched_seen` counts the bodies that held one.
    watched: list[bytes] = field(default_factory=list)
    watched_seen: int = 0
    # The real API's contract (api_contract.py): a request its published messages do not
    # parse is answered as the API answers it (400 INVALID_ARGUMENT, 404), and kept here.
    strict: bool = True
    refused_by_contract: list[str] = field(default_factory=list)
    expect_refusals: bool = (
        False  # a test sending them (or serving odd replies) on purpose; otherwise leaving the server with any fails
    )
    reply_problems: list[str] = field(
        default_factory=list
    )  # replies of its own that are not the method's response message
    _attempts: Counter[str] = field(default_factory=Counter)
    _seen: threading.Condition = field(default_factory=threading.Condition)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
        if exc_info[0] is None and self.refused_by_contract and not self.expect_refusals:
            # a request the real API's published messages do not parse: the pipeline is wrong, not the test
            raise AssertionError(f"the real API would refuse: {self.refused_by_contract[:3]}")
        if exc_info[0] is None and self.reply_problems and not self.expect_refusals:
            raise AssertionError(f"the fake served what the real API never sends: {self.reply_problems[:3]}")

    def go_away(self) -> None:
        """Close the listening socket and every open connection, as a host that goes down
        does (new connections are refused); the counts are kept. come_back() reopens it."""
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)

    def come_back(self) -> None:
        """Listen again on the same port."""
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    async def outage(self, seconds: float | None) -> None:
        """Go away (see go_away) for `seconds` (None: until come_back()), from the server's own
        loop; `gone_at` and `back_at` say when it went and returned (time.time())."""
        await self._close()
        self.gone_at = time.time()
        if seconds is not None:
            await asyncio.sleep(seconds)
            await self._listen()
            self.back_at = time.time()

    def loop_task(self, work: Any) -> None:
        """Run a coroutine on the server's loop, from its thread (a behaviour) or any other."""
        self._loop.call_soon_threadsafe(lambda: self._tasks.add(self._loop.create_task(work)))

    def counts(self) -> dict[str, Any]:
        """What a benchmark reads back when the server stops."""
        return {
            "requests": len(self.requests) + self.refused_full,
            "refused_full": self.refused_full,
            "most_in_flight": self.most_in_flight,
            "paid": sum(self.answered.values()),
            "prompts_paid": len(self.answered),
            "back_at": self.back_at,
        }

    async def _serve(self, on_ready: Callable[[], object]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._open: set[asyncio.StreamWriter] = set()
        await self._listen()
        on_ready()
        try:
            await self._stopped.wait()
        finally:
            await self._close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, self.host, self.port, backlog=1024, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        self._server.close()
        for writer in list(self._open):
            writer.transport.abort()  # a reset, as when the host's process dies
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            while request_line := await reader.readline():
                method, path, _ = request_line.decode().split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.watched_seen += any(holds(body, secret) for secret in self.watched)
                reply = await self._reply(method, path, headers, body)
                if reply.status == 0:
                    break
                payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                headers = {"Content-Type": "application/json; charset=UTF-8", **reply.headers}
                extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                writer.write(
                    f"HTTP/1.1 {reply.status} {'OK' if reply.status == 200 else 'Error'}\r\n"
                    f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client hung up, or the server is stopping
        except ValueError:  # not HTTP (a TLS handshake, say): hang up, as a plain HTTP server does
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def _reply(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        route, _, query = path.partition("?")
        if self.strict and (refused := contract_refusal(method, route, query, headers, body)) is not None:
            self.refused_by_contract.append(f"{method} {route}: {refused.body['error']['message']}")  # type: ignore[index]
            return refused
        reply = await self._serve_method(method, route, query, headers, body)
        if self.strict and reply.status == 200 and isinstance(reply.body, dict):
            response = api_contract.route_of(method, route)
            must_have = MUST_HAVE.get(response[1].response or "", ()) if response else ()
            if problem := api_contract.response_problem(method, route, reply.body, must_have):
                self.reply_problems.append(f"{method} {route}: {problem}")
        return reply

    async def _serve_method(self, method: str, route: str, query: str, headers: dict[str, str], body: bytes) -> Reply:
        """The reply of the first route of ROUTERS that `method` and `route` match."""
        for api in ROUTERS.values():
            for want, pattern, handler in api:
                if (want is None or want == method) and (match := pattern.fullmatch(route)):
                    call = Call(method, route, match, query, headers, body)
                    return await getattr(self, handler)(call)
        return error(
            404, f"Method not found: {method} {route}?{query}" if query else f"Method not found: {method} {route}"
        )

    # ------------------------------------------------------------ generation --
    async def _generate(self, call: Call) -> Reply:
        if self.capacity is not None and self.in_flight >= self.capacity:
            self.refused_full += 1
            return error(429, "Resource exhausted. Please try again later.")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            reply = self._answer(call.match[1], json.loads(call.body), call.api_key, call.route, call.headers)
            if self.latency_s or reply.delay_s:
                await asyncio.sleep(self.latency_s + reply.delay_s)
            return reply
        finally:
            self.in_flight -= 1

    async def _count_tokens(self, call: Call) -> Reply:
        body_json = json.loads(call.body)
        self.count_tokens_requests.append(body_json)
        return Reply(200, {"totalTokens": words_of(body_json.get("contents") or [])})

    # ---------------------------------------------------------------- models --
    async def _get_model(self, call: Call) -> Reply:
        self.model_gets += 1
        name = call.match[1]
        if "/publishers/" in call.route:  # Vertex AI's PublisherModel
            return Reply(200, {"name": f"publishers/google/models/{name}", "versionId": "001", "launchStage": "GA"})
        limits = {"inputTokenLimit": 1048576, "outputTokenLimit": 65536}
        return Reply(200, {"name": f"models/{name}", "displayName": name, **limits})

    # --------------------------------------------------------------- caching --
    async def _caching(self, call: Call) -> Reply:  # Vertex AI's within its project
        return self._cached_contents(
            call.method, call.match[1], (call.match[2] or "").strip("/"), call.query, call.body
        )

    # ----------------------------------------------------------------- batch --
    async def _batch_create(self, call: Call) -> Reply:
        return self._create_batch(call.match[1], json.loads(call.body))

    async def _batch_list(self, call: Call) -> Reply:
        return self._list_batches(call.query)

    async def _batch_get(self, call: Call) -> Reply:
        return self._get_batch(call.match[1], call.api_key)

    # ----------------------------------------------------------------- files --
    async def _file_upload(self, call: Call) -> Reply:
        return self._upload(call.headers, call.raw_query, call.body)

    async def _file(self, call: Call) -> Reply:
        return self._files(call.method, call.route.partition("/files")[2].strip("/"), call.query)

    async def _file_download(self, call: Call) -> Reply:
        data = self.files.get(f"files/{call.match[1]}")
        return Reply(200, data) if data is not None else error(404, f"File files/{call.match[1]} not found.")

    def _answer(
        self,
        model: str,
        body: dict[str, Any],
        api_key: str | None,
        path: str = "",
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Ask `behaviour`, and keep count of requests and of answers paid for."""
        prompt, headers = prompt_of(body), headers or {}
        with self._seen:
            self._attempts[prompt] += 1
            request = Request(
                model,
                prompt,
                api_key,
                self._attempts[prompt],
                time.monotonic(),
                without_inline_data(body),
                path,
                headers.get("authorization"),
                headers.get("x-server-timeout"),
                media_of(body),
            )
            self.requests.append(request)
            self._seen.notify_all()
        if (refused := self._cache_refusal(model, body) or self._file_refusal(request)) is not None:
            return refused
        reply = self.behaviour(request)
        if reply.status == 200 and isinstance(reply.body, dict):
            reply = self._count_prefix(reply, body)
        if reply.status == 200 and isinstance(reply.body, dict) and (asked := body.get("serviceTier")):
            served = self.tier_served(str(asked).lower())
            usage = {**reply.body.get("usageMetadata", {}), "serviceTier": served.upper()}
            reply = dataclasses.replace(
                reply,
                body={**reply.body, "usageMetadata": usage},
                headers={**reply.headers, "x-gemini-service-tier": served},
            )
        if reply.status == 200:
            with self._seen:
                self.answered[prompt] += 1
                self.answered_at.append(request.at)
                self.answered_prompts.append(prompt)
        return reply

    # ----------------------------------------------------- context caching --
    def _cached_contents(self, method: str, within: str, cache_id: str, query: dict[str, str], body: bytes) -> Reply:
        """cachedContents: create (POST), list (GET), and get, update (PATCH ttl), delete by
        name; `within` is Vertex AI's projects/{p}/locations/{l}/, which names its caches too."""
        name = f"{within}cachedContents/{cache_id}"
        if method == "POST" and not cache_id:
            return self._create_cache(json.loads(body), within)
        if method == "GET" and not cache_id:
            caches = list(self.caches.values())
            start, size = int(query.get("pageToken") or 0), int(query.get("pageSize") or 50)
            page: dict[str, Any] = {"cachedContents": [self._cache_view(c) for c in caches[start : start + size]]}
            if start + size < len(caches):
                page["nextPageToken"] = str(start + size)
            return Reply(200, page)
        if (cache := self.caches.get(name)) is None:
            return error(403, "CachedContent not found (or permission denied)")
        if method == "GET":
            return Reply(200, self._cache_view(cache))
        if method == "PATCH":
            cache["ttl_s"] = float(json.loads(body)["ttl"].removesuffix("s"))
            self.cache_events.append(("update", name))
            return Reply(200, self._cache_view(cache))
        if method == "DELETE":
            del self.caches[name]
            self.cache_events.append(("delete", name))
            return Reply(200, {})
        return error(404, f"Method not found: {method} {name}")

    def _create_cache(self, body: dict[str, Any], within: str = "") -> Reply:
        tokens = words_of([*(body.get("contents") or []), body.get("systemInstruction") or {}])
        if tokens < self.cache_min_tokens:
            return error(
                400,
                f"Cached content is too small. total_token_count={tokens}, min_total_token_count={self.cache_min_tokens}",
            )
        name = f"{within}cachedContents/fake{next(self._cache_ids)}"
        self.caches[name] = {
            **body,
            "name": name,
            "tokens": tokens,
            "ttl_s": float(str(body.get("ttl", "3600s")).removesuffix("s")),
        }
        self.cache_events.append(("create", name))
        return Reply(200, self._cache_view(self.caches[name]))

    @staticmethod
    def _cache_view(cache: dict[str, Any]) -> dict[str, Any]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + cache["ttl_s"]))
        return {
            "name": cache["name"],
            "model": cache["model"],
            "displayName": cache.get("displayName", ""),
            "createTime": now,
            "updateTime": now,
            "expireTime": expires,
            "usageMetadata": {"totalTokenCount": cache["tokens"]},
        }

    def _cache_refusal(self, model: str, body: dict[str, Any]) -> Reply | None:
        """What the API answers a request naming a cache it cannot use with: None if none."""
        if not (name := body.get("cachedContent")):
            return None
        if (cache := self.caches.get(name)) is None:
            return error(403, "CachedContent not found (or permission denied)")
        if body.keys() & {"systemInstruction", "tools", "toolConfig"}:
            return error(
                400,
                "CachedContent can not be used with GenerateContent request setting system_instruction, tools or tool_config.",
            )
        if cache["model"].rpartition("/")[2] != model:
            return error(
                400,
                f"Model used by GenerateContent request ({model}) and CachedContent ({cache['model']}) has to be the same.",
            )
        return None

    def _count_prefix(self, reply: Reply, body: dict[str, Any]) -> Reply:
        """A 200's usage with what the request sent or named before its last turn: the turns
        before it (cached if implicit_caching saw them before) and a cache's tokens (cached)."""
        assert isinstance(reply.body, dict)
        prefix = body["contents"][:-1]
        sent = words_of(prefix)
        named = cached = self.caches.get(body.get("cachedContent") or "", {}).get("tokens", 0)
        if sent and self.implicit_caching:
            key = json.dumps(prefix, sort_keys=True)
            cached += sent if key in self._prefixes else 0
            self._prefixes.add(key)
        if not (sent or cached):
            return reply
        usage = dict(reply.body.get("usageMetadata", {}))
        usage["promptTokenCount"] = usage.get("promptTokenCount", 0) + sent + named
        usage["totalTokenCount"] = (
            usage.get("totalTokenCount", 0)
            + usage["promptTokenCount"]
            - reply.body.get("usageMetadata", {}).get("promptTokenCount", 0)
        )
        if cached:
            usage["cachedContentTokenCount"] = usage.get("cachedContentTokenCount", 0) + cached
        return dataclasses.replace(reply, body={**reply.body, "usageMetadata": usage})

    # ----------------------------------------------------------- Batch API --
    def _create_batch(self, model: str, body: dict[str, Any]) -> Reply:
        """models/{model}:batchGenerateContent: inline requests, or an uploaded JSONL file."""
        batch = body["batch"]
        source = batch["inputConfig"]
        if "fileName" in source:
            lines = self.files[source["fileName"]].decode().splitlines()
            items = [json.loads(line) for line in lines if line.strip()]
            schema = api_contract.gemini()
            for number, item in enumerate(items, 1):
                if self.strict and (
                    problem := api_contract.problem_in(schema, schema.message("BatchFileLine"), item, "")
                ):
                    self.refused_by_contract.append(f"{source['fileName']} line {number}: {problem}")
                    return error(400, f"{source['fileName']} line {number}: {problem}")
            requests = [(item["key"], item["request"]) for item in items]
        else:
            items = source["requests"]["requests"]
            requests = [(item.get("metadata", {}).get("key", ""), item["request"]) for item in items]
        name = f"batches/fake{len(self.batches) + 1:04d}"
        job = BatchJob(name, model, batch.get("displayName", ""), requests, from_file="fileName" in source)
        self.batches[name] = job
        return Reply(200, self._operation(job))

    def _get_batch(self, name: str, api_key: str | None) -> Reply:
        """batches/{name}: the job's state, advanced by one poll; its output once succeeded."""
        job = self.batches.get(name)
        if job is None:
            return error(404, f"Batch {name} not found.")
        with self._seen:
            self.batch_gets += 1
        if not job.done:
            job.polls += 1
            pending, running = self.batch_polls
            if job.polls > pending + running:
                job.state = self.batch_outcome(job)
                if job.state == "BATCH_STATE_SUCCEEDED":
                    job.output = self._run_batch(job, api_key)
            elif job.polls > pending:
                job.state = "BATCH_STATE_RUNNING"
        return Reply(200, self._operation(job))

    def _list_batches(self, query: dict[str, str]) -> Reply:
        """GET batches: a page of jobs (pageSize, pageToken), newest first, as the API lists them."""
        jobs = list(reversed(self.batches.values()))
        start, size = int(query.get("pageToken") or 0), int(query.get("pageSize") or 50)
        page: dict[str, Any] = {"operations": [self._operation(job) for job in jobs[start : start + size]]}
        if start + size < len(jobs):
            page["nextPageToken"] = str(start + size)
        self.batch_lists += 1
        return Reply(200, page)

    def _run_batch(self, job: BatchJob, api_key: str | None) -> dict[str, Any]:
        """Answer every request of a job: inline responses, or a responses file, in order."""
        results = []
        for key, request in job.requests:
            reply = self._answer(job.model, request, api_key)
            assert isinstance(reply.body, dict)
            if reply.status == 200:
                result = {"response": reply.body}
            else:  # a google.rpc.Status, as the API puts it in a batch's output: gRPC's code, not HTTP's
                status = reply.body["error"]
                result = {"error": {"code": GRPC_CODES.get(status["status"], 2), "message": status["message"]}}
                if "details" in status:
                    result["error"]["details"] = status["details"]
            results.append((key, result))
        if self.batch_shuffle:  # as the real API has been seen to return them (googleapis/python-genai#1909)
            random.Random(len(results)).shuffle(results)
        if job.from_file:
            name = f"files/{job.name.removeprefix('batches/')}-responses"
            self.files[name] = "".join(json.dumps({"key": key, **result}) + "\n" for key, result in results).encode()
            return {"responsesFile": name}
        inlined = [result if self.batch_shuffle else {**result, "metadata": {"key": key}} for key, result in results]
        return {"inlinedResponses": {"inlinedResponses": inlined}}

    def _operation(self, job: BatchJob) -> dict[str, Any]:
        """A job as the API returns it: a google.longrunning.Operation around a GenerateContentBatch."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
            "model": f"models/{job.model}",
            "displayName": job.display_name,
            "createTime": now,
            "updateTime": now,
            "batchStats": {"requestCount": str(len(job.requests))},
            "state": job.state,
            "name": job.name,
        }
        operation: dict[str, Any] = {"name": job.name, "metadata": metadata}
        if job.output is not None:
            metadata["output"] = job.output
            operation["response"] = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput",
                **job.output,
            }
        if job.done:
            operation["done"] = True
            if job.state != "BATCH_STATE_SUCCEEDED":
                operation["error"] = {"code": 13, "message": f"Batch ended in state {job.state}."}
        return operation

    # ----------------------------------------------------------- Files API --
    def _upload(self, headers: dict[str, str], query: str, body: bytes) -> Reply:
        """upload/v1beta/files: the resumable protocol google-genai speaks (start, then
        upload chunks, the last with finalize)."""
        command = headers.get("x-goog-upload-command", "")
        if command == "start":
            upload_id = str(next(self._upload_ids))  # never reused: uploads run concurrently
            self._uploads[upload_id] = bytearray()
            self._upload_meta[upload_id] = (json.loads(body) if body else {}).get("file", {})
            url = f"{self.base_url}/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
            return Reply(200, {}, headers={"x-goog-upload-url": url, "x-goog-upload-status": "active"})
        upload_id = dict(part.partition("=")[::2] for part in query.split("&"))["upload_id"]
        self._uploads[upload_id] += body
        if "finalize" not in command:
            return Reply(200, {}, headers={"x-goog-upload-status": "active"})
        name = f"files/upload{upload_id}"
        self.files[name] = bytes(self._uploads.pop(upload_id))
        meta = self._upload_meta.pop(upload_id)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 48 * 3600))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        digest = hashlib.sha256(self.files[name]).digest()
        file = {
            "name": name,
            "displayName": meta.get("displayName")
            or meta.get("display_name")
            or "",  # google-genai sends snake_case here
            "mimeType": meta.get("mimeType") or meta.get("mime_type") or "application/jsonl",
            "sizeBytes": str(len(self.files[name])),
            "state": "PROCESSING" if self.processing_gets else "ACTIVE",
            "uri": f"{self.base_url}/v1beta/{name}",
            "createTime": now,
            "updateTime": now,
            "expirationTime": expires,
            "sha256Hash": base64.b64encode(digest).decode(),
            "source": "UPLOADED",  # bytes in the File message: base64, as the API sends it
        }
        self.file_meta[name] = file
        self.upload_log.append((file["displayName"], digest.hex()))
        return Reply(200, {"file": file}, headers={"x-goog-upload-status": "final"})

    def _files(self, method: str, file_id: str, query: dict[str, str]) -> Reply:
        """files: list (GET), and get or delete by name."""
        if not file_id and method == "GET":
            files = [meta for name, meta in self.file_meta.items() if name in self.files]
            start, size = int(query.get("pageToken") or 0), int(query.get("pageSize") or 10)
            page: dict[str, Any] = {"files": files[start : start + size]}
            if start + size < len(files):
                page["nextPageToken"] = str(start + size)
            return Reply(200, page)
        name = f"files/{file_id}"
        if name not in self.files:
            return error(403, f"You do not have permission to access the File {file_id} or it may not exist.")
        if method == "DELETE":
            del self.files[name]
            self.deleted_files.append(name)
            return Reply(200, {})
        meta = self.file_meta.get(name, {"name": name, "state": "ACTIVE"})
        self.file_gets[name] += 1
        if self.file_gets[name] >= self.processing_gets:
            meta["state"] = "ACTIVE"
        return Reply(200, meta)

    def _file_refusal(self, request: Request) -> Reply | None:
        """A request naming an upload that does not exist (deleted, expired): the API's 403."""
        for kind, uri, _ in request.media:
            if (
                kind == "file"
                and uri.startswith(self.base_url)
                and uri.removeprefix(f"{self.base_url}/v1beta/") not in self.files
            ):
                return error(
                    403, f"You do not have permission to access the File {uri.rpartition('/')[2]} or it may not exist."
                )
        return None


# What the real API always puts in a reply, beyond what its message requires (checked with
# reply_problems): a response's id and model version and its total tokens; a file's and a
# cache's name and times; a file's state.
MUST_HAVE = {
    "GenerateContentResponse": ("responseId", "modelVersion", "usageMetadata.totalTokenCount"),
    "CountTokensResponse": ("totalTokens",),
    "File": ("name", "createTime", "expirationTime", "state", "uri", "sizeBytes", "sha256Hash"),
    "CachedContent": ("name", "createTime", "expireTime", "model"),
}


def contract_refusal(method: str, route: str, query: str, headers: dict[str, str], body: bytes) -> Reply | None:
    """What the real API answers a request its published messages do not parse (see
    api_contract), or None. An upload's chunks are bytes, not a message: not checked."""
    if route.startswith("/upload/") and "start" not in headers.get("x-goog-upload-command", "start"):
        return None
    params = dict(part.partition("=")[::2] for part in query.split("&") if part)
    try:
        parsed = json.loads(body) if body.strip() else {}
    except ValueError:
        return error(400, "Invalid JSON payload received. Unexpected token.")
    found = api_contract.request_problem(method, route, params, parsed)
    if found is None:
        return None
    code, message = found
    violation = {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"description": message}]}
    return error(code, message, violation) if code == 400 else error(code, message)


def media_of(body: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """The files of a request's last turn: inline bytes by their SHA-256, uploads and URLs by URI."""
    media = []
    for part in (body.get("contents") or [{}])[-1].get("parts") or []:
        if inline := part.get("inlineData") or part.get("inline_data"):
            data = base64.urlsafe_b64decode(
                inline["data"].replace("+", "-").replace("/", "_")
            )  # google-genai sends the URL-safe alphabet
            media.append(
                ("inline", hashlib.sha256(data).hexdigest(), inline.get("mimeType") or inline.get("mime_type"))
            )
        elif file := part.get("fileData") or part.get("file_data"):
            media.append(
                ("file", file.get("fileUri") or file.get("file_uri"), file.get("mimeType") or file.get("mime_type"))
            )
    return tuple(media)


def holds(body: bytes, secret: bytes) -> bool:
    """Whether `body` carries `secret`: as it is, or base64-encoded (either alphabet) at any of the three alignments."""
    if secret in body:
        return True
    for skip in range(3):
        encoded = base64.b64encode(secret[skip:])[4:-4]  # the middle: independent of what precedes it
        if encoded and (encoded in body or encoded.translate(bytes.maketrans(b"+/", b"-_")) in body):
            return True
    return False


def without_inline_data(body: dict[str, Any]) -> dict[str, Any]:
    """The request as kept in `requests`: inline bytes over 64 KB left out (Request.media has
    their hashes), so that a run of a thousand 1 MB images does not keep a gigabyte."""
    last = (body.get("contents") or [{}])[-1]
    inline = ("inline_data", "inlineData")
    if not any(
        len(part[key].get("data", "")) > 65536 for part in last.get("parts") or [] for key in inline if key in part
    ):
        return body
    parts = [
        {
            key: {**value, "data": "(left out)"} if key in inline and len(value.get("data", "")) > 65536 else value
            for key, value in part.items()
        }
        for part in last["parts"]
    ]
    return {**body, "contents": [*body["contents"][:-1], {**last, "parts": parts}]}


def words_of(contents: list[Any]) -> int:
    """What this server counts as the tokens of some turns (countTokens, caches): their words."""
    return sum(prompt_tokens_of(str(part.get("text", ""))) for turn in contents for part in turn.get("parts") or [])


def prompt_of(request: dict[str, Any]) -> str:
    """The text of a GenerateContentRequest's last user turn."""
    users = [content for content in request["contents"] if content.get("role", "user") == "user"]
    return "".join(part.get("text", "") for part in users[-1]["parts"]) if users else ""


def cli() -> None:
    parser = argparse.ArgumentParser(
        description="Run the fake Gemini server in the foreground, on 127.0.0.1. Point the pipeline at it with "
        "GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:PORT and any GEMINI_API_KEY (it takes any string)."
    )
    parser.add_argument("--port", type=int, default=8765, help="0: any free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--capacity", type=int, help="requests in flight beyond which it answers 429 with no details")
    parser.add_argument(
        "--away-after", type=int, help="go away (refuse connections) once this many requests arrived..."
    )
    parser.add_argument(
        "--away-s", type=float, default=20.0, help="...for this long, then listen again on the same port"
    )
    parser.add_argument(
        "--per-minute-429s",
        type=float,
        help="this share of requests (0.05: 5%%) answered with a per-minute 429 asking for 1 s",
    )
    parser.add_argument(
        "--prose", action="store_true", help="answer text even where a schema asks for JSON (a model that ignores it)"
    )
    parser.add_argument(
        "--unavailable",
        type=float,
        help="this share of requests (0.1: 10%%) answered 503 UNAVAILABLE, which the pipeline retries",
    )
    args = parser.parse_args()
    server = FakeGemini(
        prose if args.prose else as_asked, latency_s=args.latency_ms / 1000, port=args.port, capacity=args.capacity
    )
    if args.away_after:
        server.behaviour = away_once(server, args.away_after, args.away_s)
    if args.per_minute_429s:
        server.behaviour = scattered_429s(args.per_minute_429s)
    if args.unavailable:
        server.behaviour = unavailable_at_times(args.unavailable, server.behaviour)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_until_terminated(server))
    print(json.dumps(server.counts()), flush=True)


def as_asked(request: Request) -> Reply:
    """The command line's default: echo, but JSON of the request's response schema when it
    asks for one (every README example runs against it)."""
    config = request.body.get("generationConfig", {})
    schema = next(
        (
            config[k]
            for k in ("responseJsonSchema", "response_json_schema", "responseSchema", "response_schema")
            if k in config
        ),
        None,
    )
    if schema is None:
        return echo(request)
    return answer(json.dumps(of_shape(schema, request.prompt)), request.prompt)


def prose(request: Request) -> Reply:
    """Text that is not JSON, however the request asks, and whose JSON error differs by prompt (as prose answers' do)."""
    return answer(f"{request.prompt.split()[-1]} stars, positive", request.prompt)


def of_shape(schema: Any, text: str) -> Any:
    """A value of a JSON Schema's shape: an enum's first value, `text` for strings, 1 for numbers."""
    if not isinstance(schema, dict):
        return text
    if schema.get("enum"):
        return schema["enum"][0]
    kind = str(schema.get("type", "object" if "properties" in schema else "string")).lower()
    if kind == "object":
        names = [
            *schema.get("properties", {}),
            *(n for n in schema.get("required", []) if n not in schema.get("properties", {})),
        ]
        return {name: of_shape(schema.get("properties", {}).get(name), text) for name in names}
    if kind == "array":
        return [of_shape(schema.get("items"), text)]
    return {"integer": 1, "number": 1, "boolean": True, "null": None}.get(kind, text)


def unavailable_at_times(share: float, then: Callable[[Request], Reply]) -> Callable[[Request], Reply]:
    """`then`, but `share` of requests (by a hash of prompt and attempt) get a 503 UNAVAILABLE, which clients retry."""

    def behaviour(request: Request) -> Reply:
        if zlib.crc32(f"503/{request.prompt}/{request.attempt}".encode()) % 10_000 < share * 10_000:
            return error(503, "The service is currently unavailable.")
        return then(request)

    return behaviour


def away_once(server: FakeGemini, after: int, seconds: float | None) -> Callable[[Request], Reply]:
    """echo, but once `after` requests have arrived the server goes away for `seconds` (None: for good)."""

    def behaviour(request: Request) -> Reply:
        if len(server.requests) == after:
            server.loop_task(server.outage(seconds))
        return echo(request)

    return behaviour


def scattered_429s(share: float) -> Callable[[Request], Reply]:
    """echo, but `share` of requests (chosen by a hash of prompt and attempt: the same every
    run) get the API's per-minute 429 with a RetryInfo of 1 s."""

    def behaviour(request: Request) -> Reply:
        if zlib.crc32(f"{request.prompt}/{request.attempt}".encode()) % 10_000 < share * 10_000:
            return rate_limited(1.0)
        return echo(request)

    return behaviour


async def serve_until_terminated(server: FakeGemini) -> None:
    """Serve until SIGTERM (or Ctrl-C); the caller then prints the counts."""
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    serving = asyncio.create_task(
        server._serve(lambda: print(f"fake Gemini on {server.base_url} (Ctrl-C stops it)", flush=True))
    )
    await stopped.wait()
    server._stopped.set()
    await serving


if __name__ == "__main__":
    cli()
