"""Quota: --rpm pacing, the shared back-off on 429, and the daily-quota stop, against a
fake server that enforces a per-window limit with the API's real 429 (RetryInfo included).
Windows are scaled down (a quota per half second or two) so that this runs in seconds."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

import pytest

import pipeline
from conftest import sample_prompts, write_prompts
from fake_gemini import DailyQuota, PerWindowQuota, echo, error, rate_limited


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def test_rpm_uses_the_quota_without_hitting_it(tmp_path, fake_gemini, run) -> None:
    limit, window_s = 20, 1.0  # the server admits 20 per second: 1,200 a minute
    server = fake_gemini(PerWindowQuota(limit, window_s), latency_s=0.005)
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(60), per_file=10)
    result = run(inputs, "--rpm", str(limit * 60 / window_s), "--workers", "10")
    assert result.exit_code == 0, result.stderr
    times = [r.at for r in server.requests]
    achieved = rate(times) / (limit / window_s)
    rejected = sum(1 for r in server.requests if r.attempt > 1) / len(server.requests)
    print(f"\n--rpm: {achieved:.1%} of the limit, {rejected:.1%} of requests got a 429")
    assert achieved >= 0.95
    assert rejected <= 0.01
    # Evenly spread: the first quarter second holds a quarter second's share, not a burst.
    assert sum(1 for t in times if t - times[0] < 0.25) <= limit * 0.25 + 2


def test_without_rpm_a_429_pauses_everyone_and_the_quota_is_still_used(tmp_path, fake_gemini, run) -> None:
    limit, window_s, workers = 25, 0.5, 10
    server = fake_gemini(PerWindowQuota(limit, window_s), latency_s=0.005)
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(150), per_file=10)
    result = run(inputs, "--workers", str(workers), "-v")
    assert result.exit_code == 0, result.stderr
    assert sorted(server.answered.values()) == [1] * 150  # every prompt exactly once
    # Answers per quota window, leaving out the first and last (entered and left part-way).
    answered_in = Counter(int(t // window_s) for t in server.answered_at)
    interior = range(min(answered_in) + 1, max(answered_in))
    achieved = sum(answered_in[w] for w in interior) / (len(interior) * limit)
    refused = len(server.requests) - 150
    print(f"\nno --rpm: {achieved:.1%} of the limit, {refused} requests got a 429")
    assert achieved >= 0.85
    per_window = Counter(int(r.at // window_s) for r in server.requests)
    assert max(per_window.values()) <= limit + workers  # after a 429 only requests in flight arrive
    assert int(re.search(r"(\d+) rate-limited", result.stderr)[1]) == refused
    backoffs = len(re.findall(r"rate limited: holding all requests for \d", result.stderr))
    assert 1 <= backoffs < refused  # logged once per back-off, not once per worker


async def test_a_pause_holds_every_request() -> None:
    gate = pipeline.Gate(None)
    started = time.monotonic()
    gate.pause(0.3)
    admitted = await asyncio.gather(*(gate.turn() for _ in range(5)))
    assert admitted == [True] * 5
    assert time.monotonic() - started >= 0.3
    # Counted from when the first request began to wait, a moment after the pause began (on a
    # busy machine, milliseconds: 0.297 s was seen with both CPUs busy), so most of the pause.
    assert 0.25 <= gate.held_s <= time.monotonic() - started


async def test_closing_the_gate_ends_waits_and_refuses() -> None:
    gate = pipeline.Gate(None)
    gate.pause(60)
    sent = []

    async def request() -> None:
        async with gate.admit():
            sent.append(True)

    waiting = asyncio.gather(*(request() for _ in range(3)), return_exceptions=True)
    await asyncio.sleep(0)  # let them start waiting
    gate.close()
    assert [type(e) for e in await asyncio.wait_for(waiting, 1)] == [pipeline.GateClosed] * 3 and not sent


def test_daily_quota_stops_the_run_and_a_rerun_finishes(tmp_path, fake_gemini, run) -> None:
    answers_left = 25
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(80), per_file=10)
    quota = DailyQuota(answers_left)
    server = fake_gemini(quota, latency_s=0.005)
    result = run(inputs, "--workers", "5")
    ended = time.monotonic()
    assert result.exit_code == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("stopped after 25 prompts done: the daily quota is exhausted")
    assert "run the same command again later" in message and "Traceback" not in result.stderr
    assert len(result.records()) == answers_left
    stopped_after_s = ended - quota.first_refusal_at
    assert stopped_after_s < 5
    assert not result.failures()  # a spent quota is no prompt's fault

    server = fake_gemini(DailyQuota(1000))  # a new day
    rerun = run(inputs, "--workers", "5")
    assert rerun.exit_code == 0, rerun.stderr
    assert sorted(rerun.ids()) == sorted(set(rerun.ids())) and len(rerun.ids()) == 80
    assert sum(server.answered.values()) == 80 - answers_left
    assert "25 already done" in rerun.stderr
    print(f"\ndaily quota: exited {stopped_after_s:.2f} s after the first per-day 429")


def test_a_429_naming_per_minute_and_per_day_quotas_is_a_per_minute_limit(tmp_path, fake_gemini, run) -> None:
    both = rate_limited(0.2, "GenerateRequestsPerMinutePerProjectPerModel", "GenerateRequestsPerDayPerProjectPerModel")
    fake_gemini(lambda r: both if r.attempt == 1 else echo(r))
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(4)))
    assert result.exit_code == 0, result.stderr
    assert [r["attempts"] for r in result.records()] == [2] * 4


def test_classify_reads_the_quota_failure() -> None:
    def api_error(reply):
        exc = Exception()
        exc.code, exc.details = reply.status, reply.body
        return exc

    assert pipeline.classify(api_error(rate_limited(1))) == "rate limit"
    assert pipeline.classify(api_error(rate_limited(1, DailyQuota.PER_DAY))) == "daily quota"
    assert pipeline.classify(api_error(error(429, "no details"))) == "capacity"  # a server full: see test_network
    assert pipeline.classify(api_error(error(503, "overloaded"))) == "capacity"
    assert pipeline.classify(api_error(error(503, "Service unavailable"))) == "transient"


async def test_a_batch_api_call_waits_out_the_shared_back_off_and_stops_retrying_once_the_run_stops(tmp_path) -> None:
    """The Batch API's calls retry through the same wait as a prompt's request: a 429's shared
    back-off holds them too, and a back-off ends when the run stops asking (the gate closes)."""
    from conftest import stage_run

    gate = pipeline.Gate(None)
    run = stage_run(tmp_path, pipeline.Settings(output_dir=tmp_path, retry_base_s=30), gate=gate)
    gate.pause(0.2)  # another request's 429
    paused_until, calls, called = gate.paused_until, [], asyncio.Event()

    async def poll() -> None:
        calls.append(time.monotonic())
        called.set()
        raise TimeoutError  # transient: retried, after 30 to 60 s

    polling = asyncio.create_task(run.retried(lambda _: poll(), pipeline.POLL))
    await called.wait()
    assert calls[0] >= paused_until  # not before the shared back-off ended
    gate.close()  # Ctrl-C, the budget, the daily quota: the 30 s back-off ends now, and nothing is retried
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(polling, timeout=5)
    assert len(calls) == 1
