"""The network is not the prompt's fault: outages are waited out (one probe, nobody's
attempts used, nothing marked failed), a host never reached is a one-line stop, and a
server that says it is full (429 naming no quota) gets fewer requests in flight."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest
from google.genai import errors

import pipeline
from conftest import adc_file, run_subprocess, sample_prompts, write_prompts
from fake_gemini import Reply, away_once, echo, error, rate_limited


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The server runs in this process: a post-processing pool forked from it would keep its
# listening socket open, and a server that went away would still accept connections.
NO_POOL = ("--postprocess-workers", "0")


def test_a_host_that_never_answers_stops_the_run_at_start_in_one_line(tmp_path, monkeypatch, run) -> None:
    port = closed_port()
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GEMINI_API_KEY", "test-key-5f2c9e")
    started = time.monotonic()
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(30)), "--outage-limit-s", "1", "--workers", "10")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: cannot reach 127.0.0.1:{port}: connection refused"]
    assert not (result.output_dir / "failed.jsonl").exists() and not result.shard_names()
    assert time.monotonic() - started < 10  # the limit is 1 s here (30 s by default)


def closed_host(monkeypatch, tmp_path, backend: str) -> int:
    """The environment of `backend` (gemini, express or adc: Vertex AI's two) pointed at a closed port."""
    port = closed_port()
    for name in (
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "GOOGLE_GENAI_USE_VERTEXAI",
        "GOOGLE_CLOUD_PROJECT",
        "GOOGLE_CLOUD_LOCATION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GOOGLE_VERTEX_BASE_URL", f"http://127.0.0.1:{port}")
    if backend == "gemini":
        monkeypatch.setenv("GEMINI_API_KEY", "test-key-5f2c9e")
        return port
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
    if backend == "express":
        monkeypatch.setenv("GOOGLE_API_KEY", "test-key-5f2c9e")
        return port
    adc = adc_file(tmp_path / "adc.json", "t")
    for name, value in {
        "GOOGLE_CLOUD_PROJECT": "p",
        "GOOGLE_CLOUD_LOCATION": "us-central1",
        "GOOGLE_APPLICATION_CREDENTIALS": str(adc),
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",
    }.items():
        monkeypatch.setenv(name, value)
    return port


@pytest.mark.parametrize(
    "backend, flags",
    [
        ("gemini", ()),
        ("express", ()),
        ("adc", ()),
        ("gemini", ("--batch",)),
        ("gemini", ("--cache", "--system-instruction", "be brief")),
        ("gemini", ("--estimate",)),
        ("express", ("--estimate",)),
    ],
)
def test_a_start_refused_for_a_host_never_reached_writes_nothing_on_every_path(
    tmp_path, monkeypatch, run, backend, flags
) -> None:
    port = closed_host(monkeypatch, tmp_path, backend)
    started = time.monotonic()
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(4)), "--outage-limit-s", "1", *flags)
    assert (result.exit_code, result.stderr.splitlines(), result.stdout) == (
        2,
        [f"error: cannot reach 127.0.0.1:{port}: connection refused"],
        "",
    )
    assert not result.output_dir.exists()  # no folder, no job.json
    assert time.monotonic() - started < 10  # the limit is 1 s here


def test_express_mode_with_no_network_stops_within_30_s_by_default(tmp_path, monkeypatch) -> None:
    """The issue's own case, as a user runs it: the default limits, a subprocess."""
    port = closed_host(monkeypatch, tmp_path, "express")
    write_prompts(tmp_path / "inputs", sample_prompts(4))
    started = time.monotonic()
    result = run_subprocess([], cwd=tmp_path, env={"GOOGLE_API_KEY": "test-key-5f2c9e"})
    assert time.monotonic() - started < 30
    assert (result.exit_code, result.stderr.splitlines()) == (
        2,
        [f"error: cannot reach 127.0.0.1:{port}: connection refused"],
    )
    assert not (tmp_path / "outputs").exists()


def test_an_outage_in_the_middle_is_waited_out_and_costs_no_attempt(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(latency_s=0.02)
    server.behaviour = away_once(server, after=60, seconds=1.5)
    prompts = sample_prompts(200)
    result = run(
        write_prompts(tmp_path / "inputs", prompts, per_file=50), "--workers", "10", "--max-attempts", "1", *NO_POOL
    )
    assert server.back_at is not None
    assert result.exit_code == 0, result.stderr[-2000:]
    assert sorted(result.ids()) == sorted(f"shard_{i // 50}.txt:{i % 50 + 1}" for i in range(200))
    assert not result.failures()
    paid = sum(server.answered.values())
    assert paid - len(prompts) <= 10  # paid twice: at most the requests in flight when it went away
    assert f"cannot reach 127.0.0.1:{server.port}: connection refused" in result.stderr
    assert "answers again after" in result.stderr and "unreachable for" in result.stderr.splitlines()[-2]
    assert server.model_gets >= 1  # the probe that got through (those while it was away were refused)


def test_an_outage_longer_than_the_limit_stops_and_a_rerun_finishes(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(latency_s=0.01)
    server.behaviour = away_once(server, after=40, seconds=None)
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(120), per_file=40)
    first = run(inputs, "--workers", "5", "--outage-limit-s", "1", *NO_POOL)
    assert server.gone_at is not None
    assert first.exit_code == 1, first.stderr[-2000:]
    assert (
        first.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"127.0.0.1:{server.port} has been unreachable for 1s (connection refused): run the same command again later to continue"
        )
    )
    assert not first.failures() and 30 <= len(first.ids()) < 120
    server.come_back()
    server.behaviour = echo
    second = run(inputs, "--workers", "5")
    assert second.exit_code == 0, second.stderr[-2000:]
    assert sorted(second.ids()) == sorted(set(second.ids())) and len(second.ids()) == 120


def test_a_full_server_gets_fewer_requests_in_flight_and_nothing_fails(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(latency_s=0.03)
    server.capacity = 10
    result = run(
        write_prompts(tmp_path / "inputs", sample_prompts(400), per_file=100),
        *("--workers", "60", "--retry-base-s", "0.05"),
    )
    assert result.exit_code == 0, result.stderr[-2000:]
    assert len(set(result.ids())) == 400 and not result.failures()
    refused = server.refused_full / (len(server.requests) + server.refused_full)
    print(f"\nserver admitting 10 in flight, 60 workers: {refused:.1%} of requests refused as full")
    assert refused < 0.35  # without the limit: each refusal sends everyone back at once, most are refused
    assert "server-full answers" in result.stderr.splitlines()[-2]


def test_a_per_minute_quota_429_is_not_a_full_server() -> None:
    assert pipeline.classify(api_error(rate_limited(1))) == "rate limit"
    assert pipeline.classify(api_error(error(429, "Resource exhausted. Please try again later."))) == "capacity"
    assert pipeline.classify(api_error(error(503, "The model is overloaded. Please try again later."))) == "capacity"
    assert pipeline.classify(api_error(error(503, "Service unavailable"))) == "transient"


def api_error(reply: Reply) -> errors.APIError:
    return errors.APIError(reply.status, reply.body)


def reset_in_a_handshake() -> aiohttp.ClientConnectorError:
    try:
        try:
            raise ConnectionResetError()  # as asyncio's TLS transport raises it: no errno
        except ConnectionResetError as cause:
            raise aiohttp.ClientConnectorError(Key(), OSError(None, "")) from cause
    except aiohttp.ClientConnectorError as exc:
        return exc


class Key:  # what aiohttp's connector errors carry about the connection
    host, port, ssl = "example.test", 443, True


@pytest.mark.parametrize(
    ("raised", "words"),
    [
        (aiohttp.ClientConnectorError(Key(), ConnectionRefusedError(111, "Connect call failed")), "connection refused"),
        (aiohttp.ClientConnectorDNSError(Key(), socket.gaierror(-2, "Name or service not known")), "name not resolved"),
        (aiohttp.ClientConnectorSSLError(Key(), OSError(1, "wrong version number")), "TLS handshake failed"),
        (aiohttp.ServerDisconnectedError(), "the connection was closed before an answer"),
        (aiohttp.ConnectionTimeoutError("Connection timeout to host"), "connection timed out"),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), "connection reset"),
        (reset_in_a_handshake(), "connection reset"),  # https:// to a plain HTTP server: it hangs up
        (aiohttp.ClientConnectorError(Key(), OSError(113, "No route to host")), "no route to host"),
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), None),  # slow, not away
        (TimeoutError(), None),
        (api_error(error(503, "connection refused by upstream")), None),  # the host answered
        (ValueError("bad"), None),
    ],
)
def test_a_connection_error_is_named_in_words(raised, words) -> None:
    assert pipeline.unreachable(raised) == words


def test_the_concurrency_limit_decreases_to_what_was_in_flight_and_grows_back() -> None:
    async def scenario() -> None:
        limit = pipeline.Concurrency(4)
        for _ in range(4):
            await take(limit)
        fifth = asyncio.create_task(enter_and_hold(limit))
        await asyncio.sleep(0)
        assert limit.in_flight == 4 and not fifth.done()
        limit.refused()  # the server was full: said while the refused request still holds its place...
        limit.leave()  # ...which none of the waiting takes now
        assert limit.limit == pytest.approx(0.9 * 3) and limit.in_flight == 3 and not fifth.done()
        for _ in range(3):
            limit.leave()
        await fifth  # a place freed under the new limit
        assert limit.in_flight == 0 and limit.refusals == 1
        for _ in range(20):
            limit.answered()
        assert limit.limit == 4  # additive increase, never past --workers

    asyncio.run(scenario())


async def take(limit: pipeline.Concurrency) -> None:
    """A place in flight, as ask() takes one."""
    if not limit.take():
        await limit.wait_for_place()


async def enter_and_hold(limit: pipeline.Concurrency) -> None:
    await take(limit)
    try:
        await asyncio.sleep(0)
    finally:
        limit.leave()


@pytest.mark.parametrize("cancelled_first", [False, True], ids=["handed-then-cancelled", "cancelled-then-freed"])
def test_a_place_never_goes_to_a_cancelled_waiter(cancelled_first: bool) -> None:
    """Two generators wait for the one place; the first is cancelled (as shut_down does) in the
    same turn as the place frees, before or after it was handed over: the second gets it."""

    async def scenario() -> None:
        limit = pipeline.Concurrency(1)
        await take(limit)
        waiting = [asyncio.create_task(enter_and_hold(limit)) for _ in range(2)]
        await asyncio.sleep(0)
        if cancelled_first:
            waiting[0].cancel()
        limit.leave()
        if not cancelled_first:
            waiting[0].cancel()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError) and results[1] is None and limit.in_flight == 0

    asyncio.run(scenario())


def test_the_progress_line_says_what_the_run_waits_for(tmp_path) -> None:
    progress = pipeline.Progress(pipeline.Tally(total=10))
    outage = pipeline.Outage(lambda: None, "example.test", 60, asyncio.Event())
    outage.episode = pipeline.Episode(time.monotonic() - 80, "connection refused", confirmed=True)
    concurrency = pipeline.Concurrency(400)
    concurrency.refusals, concurrency.limit = 1, 96.5
    progress.shown = pipeline.Shown(
        pipeline.Limits(pipeline.Gate(None), outage, concurrency),
        pipeline.Media(pipeline.FilesFolder(pipeline.Path()), 20),
        pipeline.Limit(None),
    )
    line = progress.line()
    assert "waiting for example.test: connection refused, unreachable for 1m20s" in line
    assert "in flight: 96 of 400 allowed by the server" in line
    assert json.dumps(line)  # one line, printable


def test_vertex_credentials_not_refreshed_for_want_of_network_are_an_outage_not_a_refusal() -> None:
    import google.auth.exceptions

    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as cause:
            raise google.auth.exceptions.TransportError("token refresh failed") from cause
    except google.auth.exceptions.TransportError as exc:
        assert pipeline.unreachable(exc) == "connection refused"
    assert pipeline.classify(google.auth.exceptions.TransportError("read timed out")) == "transient"
    assert pipeline.classify(google.auth.exceptions.RefreshError("invalid_grant")) == "auth"
