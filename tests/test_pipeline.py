"""The whole pipeline, driven through the real google-genai SDK against the fake server."""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import re
import zlib
from pathlib import Path

import pytest

import pipeline
from conftest import API_KEY, fail_first, fast_retries, run_subprocess, sample_prompts, write_prompts
from fake_gemini import (
    FakeGemini,
    Reply,
    Request,
    answer,
    echo,
    error,
    hang_up,
    invalid_key,
    rate_limited,
    safety_block,
)


def test_sample_prompts_answered_once_into_six_shards(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts())
    result = run(inputs)
    assert result.exit_code == 0, result.stderr
    assert result.shard_names() == [f"shard_{i:05d}.jsonl" for i in range(6)]
    records = result.records()
    assert sorted(result.ids()) == sorted(f"shard_{s}.txt:{i}" for s in range(10) for i in (1, 2, 3))
    for record in records:
        assert record["response"] == f"echo: {record['prompt']}"
        assert record["model"] == "fake-gemini-001" and record["finish_reason"] == "STOP"
        assert record["attempts"] == 1 and record["usage"]["prompt_tokens"] == len(record["prompt"].split())
    assert sorted(server.answered.values()) == [1] * 30  # every prompt paid for once
    assert {r.api_key for r in server.requests} == {API_KEY}
    assert {r.model for r in server.requests} == {pipeline.MODEL}
    assert "30 answered, 0 failed" in result.stderr


def test_events_interleave(tmp_path, fake_gemini, run) -> None:
    fake_gemini(latency_s=0.05)  # a run several times longer than the writer's wait for the pool
    result = run(write_prompts(tmp_path / "inputs", sample_prompts()), "-v")
    events = re.findall(r"(enqueued|generated|wrote) (\S+)", result.stderr)
    kinds = [kind for kind, _ in events]
    assert kinds.count("enqueued") == kinds.count("generated") == kinds.count("wrote") == 30
    last_enqueued = max(i for i, k in enumerate(kinds) if k == "enqueued")
    first_written = kinds.index("wrote")
    assert first_written < last_enqueued  # writing starts long before reading ends
    for prompt_id in {pid for _, pid in events}:  # and each prompt goes through in order
        order = [kind for kind, pid in events if pid == prompt_id]
        assert order == ["enqueued", "generated", "wrote"], prompt_id
    assert re.search(r"wrote shard_\d+\.txt:\d -> shard_\d{5}\.jsonl", result.stderr)


def test_five_workers_beat_one_under_latency(tmp_path, fake_gemini, run) -> None:
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(20))
    spans = {}
    for workers in (1, 5):
        server = fake_gemini(latency_s=0.05)
        result = run(inputs, "--workers", str(workers), output_dir=tmp_path / f"out{workers}")
        assert result.exit_code == 0
        spans[workers] = server.requests[-1].at - server.requests[0].at
    assert spans[1] > 2.5 * spans[5]  # ideal is 5x; loose so it cannot flake


@pytest.mark.parametrize(
    "failure",
    [
        error(500, "Internal error"),
        error(503, "The model is overloaded."),
        error(408, "Request timeout"),
        rate_limited(0.01),
        hang_up(),
    ],
    ids=["500", "503", "408", "429", "connection-dropped"],
)
def test_transient_errors_are_retried(tmp_path, fake_gemini, run, failure) -> None:
    server = fake_gemini(fail_first(2, failure))
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(6)), *fast_retries())
    assert result.exit_code == 0, result.stderr
    assert [r["attempts"] for r in result.records()] == [3] * 6
    assert len(server.requests) == 18 and sorted(server.answered.values()) == [1] * 6
    assert "12 retries" in result.stderr


def test_request_timeout_is_retried(tmp_path, fake_gemini, run) -> None:
    def slow_once(r):
        return Reply(**{**echo(r).__dict__, "delay_s": 5.0}) if r.attempt == 1 else echo(r)

    fake_gemini(slow_once)
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(3)), "--timeout", "0.3", *fast_retries())
    assert result.exit_code == 0, result.stderr
    assert [r["attempts"] for r in result.records()] == [2, 2, 2]


def test_a_request_that_always_times_out_fails_with_the_reason(tmp_path, fake_gemini, run) -> None:
    """--timeout is the SDK client's own: the server is told the deadline, and the timeout
    that the transport raises is retried, then reported as one."""
    server = fake_gemini(lambda r: Reply(**{**echo(r).__dict__, "delay_s": 5.0}))
    result = run(
        write_prompts(tmp_path / "inputs", ["slow"]), "--timeout", "0.3", "--max-attempts", "2", *fast_retries()
    )
    assert result.exit_code == 1
    [failed] = map(json.loads, (tmp_path / "outputs" / "failed.jsonl").open())
    assert (failed["error"], failed["attempts"]) == ("timed out after 0.3 s", 2)
    assert [r.server_timeout for r in server.requests] == ["1", "1"]  # whole seconds, rounded up


def test_offline_latency_above_the_timeout_times_out(tmp_path, run) -> None:
    result = run(
        write_prompts(tmp_path / "inputs", ["What is two times 3?"]),
        *("--offline", "--offline-latency-ms", "300", "--timeout", "0.05", "--max-attempts", "1"),
    )
    assert result.exit_code == 1
    [failed] = map(json.loads, (tmp_path / "outputs" / "failed.jsonl").open())
    assert failed["error"] == "timed out after 0.05 s"


def test_retry_delay_from_server_is_honoured(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(fail_first(1, rate_limited(1.2)))
    result = run(write_prompts(tmp_path / "inputs", ["only prompt"]), *fast_retries())
    assert result.exit_code == 0
    first, second = server.requests
    # Our own back-off would be at most 0.05 s: the gap is the server's 1.2 s.
    assert second.at - first.at >= 1.2
    assert second.at - first.at < 5


def test_permanent_failures_and_safety_blocks_go_to_failed_jsonl(tmp_path, fake_gemini, run) -> None:
    replies = {
        "bad request": error(400, "Request contains an invalid argument."),
        "too long": error(
            400, "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576)."
        ),
        "unsafe": safety_block(),
    }
    server = fake_gemini(lambda r: replies.get(r.prompt) or echo(r))
    inputs = write_prompts(tmp_path / "inputs", ["fine one", *replies, "fine two"])
    result = run(inputs, *fast_retries())
    assert result.exit_code == 1
    assert sorted(r["prompt"] for r in result.records()) == ["fine one", "fine two"]
    failures = {f["prompt"]: f for f in result.failures()}
    assert set(failures) == set(replies)
    assert "400 INVALID_ARGUMENT" in failures["bad request"]["error"]
    assert "exceeds the maximum number of tokens" in failures["too long"]["error"]  # a 404 stops the run: see test_cost
    assert "SAFETY" in failures["unsafe"]["error"]
    assert all(f["attempts"] == 1 and f["permanent"] for f in failures.values())
    assert failures["unsafe"]["id"] == "shard_1.txt:1"
    assert len(server.requests) == 5  # permanent failures are not retried
    assert "3 prompts failed" in result.stderr and "failed.jsonl" in result.stderr


def test_prompt_that_keeps_failing_uses_every_attempt(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(lambda r: error(503, "overloaded"))
    result = run(write_prompts(tmp_path / "inputs", ["doomed"]), "--max-attempts", "4", *fast_retries())
    assert result.exit_code == 1
    assert [(f["id"], f["attempts"]) for f in result.failures()] == [("shard_0.txt:1", 4)]
    assert len(server.requests) == 4 and not result.shard_names()


def test_high_failure_rate_small_queue_many_workers_completes(tmp_path, fake_gemini, run) -> None:
    def flaky(request: Request) -> Reply:  # 70% of requests fail, deterministically
        if zlib.crc32(f"{request.prompt}/{request.attempt}".encode()) % 10 < 7:
            return error(503, "overloaded")
        return echo(request)

    fake_gemini(flaky)
    prompts = [f"prompt {i}" for i in range(200)]
    inputs = write_prompts(tmp_path / "inputs", prompts, per_file=20)
    result = run(inputs, "--queue-size", "1", "--workers", "25", "--max-attempts", "6", *fast_retries())
    done = result.ids() + [f["id"] for f in result.failures()]
    assert sorted(done) == sorted(set(done)) and len(done) == 200  # each prompt exactly once
    assert result.failures(), "with 70% failures and 6 attempts some prompts should fail for good"
    assert result.exit_code == 1


def test_responses_with_newlines_quotes_and_unicode_round_trip(tmp_path, fake_gemini, run) -> None:
    tricky = 'line one\nline "two"\t\\ back\u2028slash — ünïcödé 🚀\n{"json": true}'
    fake_gemini(lambda r: answer(tricky, r.prompt))
    result = run(write_prompts(tmp_path / "inputs", ["a", "b"]))
    assert [r["response"] for r in result.records()] == [tricky, tricky]
    for line in (result.output_dir / "shard_00000.jsonl").read_text(encoding="utf-8").splitlines():
        json.loads(line)  # one record per line, whatever the text


@pytest.mark.parametrize("count, shards", [(10, [5, 5]), (11, [5, 5, 1]), (4, [4])])
def test_no_empty_trailing_shard(tmp_path, fake_gemini, run, count, shards) -> None:
    fake_gemini()
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(count)))
    sizes = [len((result.output_dir / n).read_text().splitlines()) for n in result.shard_names()]
    assert sizes == shards


@pytest.mark.parametrize(
    "refusal",
    [invalid_key(), error(401, "Unauthenticated"), error(403, "Permission denied")],
    ids=["API_KEY_INVALID", "401", "403"],
)
def test_refused_key_stops_the_run_at_once(tmp_path, fake_gemini, run, refusal) -> None:
    server = fake_gemini(lambda r: refusal)
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(100)), "--workers", "5")
    assert result.exit_code == 2
    assert len(server.requests) <= 5  # no prompt is tried after the first refusal comes back
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the API key was refused") and "GEMINI_API_KEY" in last_line
    assert "Traceback" not in result.stderr


def test_non_utf8_line_is_failed_and_the_rest_continue(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.txt").write_bytes(b"fine\n\xc3\x28 broken\nalso fine\n")
    result = run(inputs)
    assert result.exit_code == 1
    assert sorted(result.ids()) == ["a.txt:1", "a.txt:3"]
    [failure] = result.failures()
    assert failure["id"] == "a.txt:2" and "UTF-8" in failure["error"] and failure["attempts"] == 0
    assert len(server.requests) == 2  # the broken line was never sent


async def test_a_writer_that_cannot_write_stops_the_run(tmp_path, fake_gemini, monkeypatch) -> None:
    fake_gemini()

    real_open = os.open

    def open_on_a_full_disk(path, flags, mode=0o777, **kwargs):  # the kernel answers ENOSPC on write
        if Path(path).name.startswith("shard_"):
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_on_a_full_disk)
    settings = pipeline.Settings(
        input_dir=write_prompts(tmp_path / "inputs", sample_prompts(50)), output_dir=tmp_path / "outputs"
    )
    (tmp_path / "outputs").mkdir()
    with pytest.raises(pipeline.PipelineError, match="No space left on device"):
        await asyncio.wait_for(pipeline.main(settings, pipeline.Progress()), timeout=10)


def test_unreadable_input_file_stops_the_run_with_one_line(tmp_path, fake_gemini, run) -> None:
    fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    (inputs / "shard_9.txt").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO)
    result = run(inputs)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot read input file")
    assert "shard_9.txt" in result.stderr and "Traceback" not in result.stderr
    assert len(result.ids()) == 3  # what was answered before the failure is kept


async def test_no_task_left_behind_and_client_closed(tmp_path, monkeypatch) -> None:
    closed = []

    class RecordingClient(pipeline.OfflineClient):
        async def aclose(self) -> None:
            closed.append(True)

    monkeypatch.setattr(pipeline, "OfflineClient", RecordingClient)
    settings = pipeline.Settings(
        input_dir=write_prompts(tmp_path / "inputs", sample_prompts(12)),
        output_dir=tmp_path / "outputs",
        offline=True,
        offline_latency_ms=1,
    )
    (tmp_path / "outputs").mkdir()
    progress = pipeline.Progress()
    await pipeline.main(settings, progress)
    tally = progress.tally
    assert tally.answered == 12
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert closed == [True]


def test_api_key_never_appears_anywhere(tmp_path, fake_gemini, run) -> None:
    def mixed(request: Request) -> Reply:
        if request.prompt.endswith("3?"):
            return error(400, "bad prompt")
        if request.attempt == 1:
            return rate_limited(0.01)
        return echo(request)

    fake_gemini(mixed)
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(15))
    result = run(inputs, "-v", *fast_retries())
    assert result.exit_code == 1 and "retry" in result.stderr  # the verbose paths really ran
    fake_gemini(lambda r: invalid_key())
    refused = run(inputs, "-v", output_dir=tmp_path / "refused")
    assert refused.exit_code == 2
    files = [p.read_text() for p in tmp_path.rglob("*.jsonl")]
    for text in [result.stdout, result.stderr, refused.stdout, refused.stderr, *files]:
        assert API_KEY not in text


def test_a_thousand_workers_are_all_in_flight_and_no_request_times_out_queued(tmp_path) -> None:
    """The timeout measures the request, not a wait for a connection: with every worker's
    request really in flight, no answer is abandoned (and paid for again) at --timeout 6."""
    write_prompts(
        tmp_path / "inputs", [f"prompt {i}" for i in range(1000)], per_file=1000
    )  # a pool of 100 would keep 900 waiting 9 s
    with FakeGemini(latency_s=1.0) as server:
        env = {"GEMINI_API_KEY": API_KEY, "GOOGLE_GEMINI_BASE_URL": server.base_url}
        result = run_subprocess(["--workers", "1000", "--timeout", "6", "--shard-size", "1000"], tmp_path, env)
        arrivals = sorted(request.at for request in server.requests)
    assert result.exit_code == 0, result.stderr
    assert len(server.requests) == 1000  # one request per prompt: none timed out and was asked again
    in_flight = max(bisect.bisect_left(arrivals, at + 1.0) - i for i, at in enumerate(arrivals))
    assert in_flight >= 900  # not the 100 of a default connection pool
