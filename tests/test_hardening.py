"""What a hostile user or a misbehaving server does: two runs on one folder, odd file
names, odd error bodies, files the pipeline did not write, nan flags, a key quoted
back, binary inputs, huge lines, a full disk, a redirect, many workers and Ctrl-C."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline import fail_first, fast_retries
from test_resume import signal_once_logged, start_pipeline, wait_for_writes

import pipeline
from conftest import API_KEY, ROOT, sample_prompts, stage_run, write_prompts
from fake_gemini import FakeGemini, Reply, echo, error, rate_limited, raw_error


# ------------------------------------------------------- one run per folder --
def test_a_second_run_on_the_same_folder_exits_2_at_once_and_nothing_is_paid_twice(tmp_path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(200), per_file=50)
    with FakeGemini(latency_s=0.02) as server:
        first = start_pipeline(tmp_path, server, "--shard-size", "1000")
        assert wait_for_writes(first, 5)  # the first run holds the folder and is answering
        env = {**os.environ, "GEMINI_API_KEY": "second-run-key", "GOOGLE_GEMINI_BASE_URL": server.base_url}
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, str(ROOT / "pipeline.py"), "--shard-size", "1000"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        refused_after = time.monotonic() - started
        _, rest = first.communicate(timeout=60)
    assert second.returncode == 2
    [line] = second.stderr.strip().splitlines()
    assert "another run is using outputs" in line and f"(pid {first.pid})" in line
    assert refused_after < 3  # interpreter start included (loose: a loaded machine); the refusal precedes any request
    assert "second-run-key" not in {r.api_key for r in server.requests}  # it sent nothing
    assert first.returncode == 0, rest
    assert sorted(server.answered.values()) == [1] * 200
    ids = [line for p in (tmp_path / "outputs").glob("shard_*.jsonl") for line in p.read_text().splitlines()]
    assert len(ids) == 200
    print(f"\nsecond run on the same folder: exit 2 after {refused_after:.2f} s")


def test_a_held_lock_names_its_holder_and_a_dead_holder_leaves_none(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pipeline.output_dir_locked(outputs):
        refused = run(inputs)
    assert refused.exit_code == 2 and f"(pid {os.getpid()})" in refused.stderr and not server.requests
    holder = subprocess.Popen(  # a process that takes the lock and is killed holding it
        [
            sys.executable,
            "-c",
            f"import pipeline, pathlib, time\nwith pipeline.output_dir_locked(pathlib.Path({str(outputs)!r})):\n print('held', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    assert run(inputs).exit_code == 2
    holder.kill()
    holder.wait()
    assert run(inputs).exit_code == 0  # the kernel released it


# --------------------------------------------------------------- file names --
def test_an_input_file_name_that_is_not_utf8_is_refused_before_any_request(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    with open(os.fsencode(inputs) + b"/p_\xe9.txt", "wb") as file:
        file.write(b"What is two times 9?\n")
    result = run(inputs)
    assert result.exit_code == 2 and not server.requests
    assert "p_\\xe9.txt" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


# ---------------------------------------------------------------- the server --
@pytest.mark.parametrize(
    "body",
    [
        raw_error(503, b'{"error": "The service is overloaded."}'),
        raw_error(503, b'["overloaded", "try later"]'),
        raw_error(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
        raw_error(503, b"<html>not JSON, though labelled so</html>"),
        raw_error(503, b""),
    ],
    ids=["error-is-a-string", "a-list", "html", "html-as-json", "empty"],
)
def test_any_error_body_is_classified_by_its_status(tmp_path, fake_gemini, run, body: Reply) -> None:
    server = fake_gemini(fail_first(1, body))
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(6)), *fast_retries())
    assert result.exit_code == 0, result.stderr
    assert sorted(server.answered.values()) == [1] * 6 and len(server.requests) == 12  # retried once each


def test_a_4xx_with_an_html_body_fails_the_prompt_with_a_short_reason(tmp_path, fake_gemini, run) -> None:
    page = b"<html>" + b"<p>Forbidden by the proxy</p>" * 200 + b"</html>"
    fake_gemini(lambda request: raw_error(400, page, "text/html"))
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(2)))
    assert result.exit_code == 1
    for failure in result.failures():
        assert failure["error"].startswith("400") and len(failure["error"]) <= pipeline.MESSAGE_CHARS


def test_a_redirect_never_carries_the_key_to_another_host(tmp_path, fake_gemini, run) -> None:
    with FakeGemini(host="127.0.0.2") as elsewhere:
        moved = Reply(307, b"", headers={"Location": f"{elsewhere.base_url}/v1beta/models/m:generateContent"})
        fake_gemini(lambda request: moved)
        result = run(write_prompts(tmp_path / "inputs", sample_prompts(2)))
    assert result.exit_code == 1 and all("307" in f["error"] for f in result.failures())
    assert not elsewhere.requests


def test_a_retry_delay_of_hours_stops_the_run_like_a_spent_daily_quota(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(lambda request: rate_limited(3 * 86400))  # a per-minute quota id, but days to wait
    started = time.monotonic()
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(20)))
    assert result.exit_code == 1 and time.monotonic() - started < 10
    assert "the server asks to wait 72.0 h" in result.stderr and not result.failures()
    assert len(server.requests) <= pipeline.WORKERS


def test_the_api_key_quoted_back_by_a_server_is_never_shown_or_written(tmp_path, fake_gemini, run) -> None:
    quoted = f"API key {API_KEY} is not allowed here"

    def quoting(request):
        if request.prompt.endswith("1?"):
            return error(400, quoted)
        if request.prompt.endswith("2?"):
            return raw_error(503, quoted.encode(), "text/plain")
        return error(403, quoted) if request.prompt.endswith("3?") else echo(request)

    fake_gemini(quoting)
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    quiet = run(inputs, *fast_retries("--max-attempts", "2"), output_dir=tmp_path / "quiet")
    verbose = run(inputs, *fast_retries("--max-attempts", "2", "-v"), output_dir=tmp_path / "verbose")
    assert quiet.exit_code == verbose.exit_code == 1 and "***" in verbose.stderr  # shown, masked
    assert all("***" in f["error"] for f in quiet.failures())  # written, masked
    refused = run(write_prompts(tmp_path / "refused", ["What is two times 3?"]), output_dir=tmp_path / "refused-out")
    assert refused.exit_code == 2 and "***" in refused.stderr  # the refusal quotes the server, masked
    texts = [p.read_text() for p in tmp_path.rglob("*.jsonl")]
    for text in [quiet.stdout, quiet.stderr, verbose.stdout, verbose.stderr, refused.stderr, *texts]:
        assert API_KEY not in text


# ------------------------------------------------------------------- inputs --
def test_output_dir_equal_to_input_dir_is_refused(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    result = run(inputs, output_dir=tmp_path / "inputs" / ".." / "inputs")
    assert result.exit_code == 2 and "is the input dir" in result.stderr and not server.requests
    assert sorted(p.name for p in inputs.iterdir()) == ["shard_0.txt"]


def test_lines_with_nul_bytes_are_failed_without_being_sent(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.txt").write_bytes(b"What is two times 1?\n\x00\n\x7fELF\x02\x01\x00\x00binary\nWhat is two times 2?\n")
    result = run(inputs)
    assert result.exit_code == 1
    assert sorted(result.ids()) == ["a.txt:1", "a.txt:4"] and len(server.requests) == 2
    assert {f["id"]: f["attempts"] for f in result.failures()} == {"a.txt:2": 0, "a.txt:3": 0}
    assert all("NUL" in f["error"] for f in result.failures())


async def test_a_line_longer_than_many_chunks_is_read_in_linear_time(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "READ_CHUNK_BYTES", 16 << 10)
    size = 16 << 20  # 1,024 chunks: rebuilding the line per chunk would copy 8 GB
    one_line, many_lines = tmp_path / "one.txt", tmp_path / "many.txt"
    one_line.write_bytes(b"x" * size)
    many_lines.write_bytes((b"x" * ((16 << 10) - 1) + b"\n") * (size >> 14))  # same bytes, same chunks
    seconds = {}
    for path in (many_lines, one_line):
        started = time.perf_counter()
        lines = [len(line) async for _, run in pipeline.read_lines(path) for line in run]
        seconds[path] = time.perf_counter() - started
        assert sum(lines) + len(lines) - (path == one_line) == size
    assert seconds[one_line] < 20 * seconds[many_lines], seconds  # linear: about 1x; quadratic: hundreds


# ------------------------------------------------------------- output files --
def test_a_file_the_pipeline_did_not_write_is_left_as_it_was(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    outputs = tmp_path / "outputs"
    for name, content in [
        ("shard_00000.jsonl", b"precious"),
        ("failed.jsonl", b'{"id": "x", "prompt": "p"}\nnot ours'),
    ]:
        outputs.mkdir(exist_ok=True)
        (outputs / name).write_bytes(content)
        result = run(inputs)
        assert result.exit_code == 2 and name in result.stderr and "not a line this pipeline wrote" in result.stderr
        assert (outputs / name).read_bytes() == content and not server.requests
        (outputs / name).unlink()
    (outputs / "shard_00000.jsonl").write_bytes(b'{"id": "shard_0.txt:1", "pro')  # ours, torn by a kill
    assert run(inputs).exit_code == 0 and len(server.requests) == 3


async def test_after_a_full_disk_the_summary_counts_what_was_written(tmp_path, monkeypatch) -> None:
    real_open = os.open

    def fourth_shard_on_a_full_disk(path, flags, mode=0o777, **kwargs):
        if Path(path).name == "shard_00003.jsonl":
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", fourth_shard_on_a_full_disk)
    outcomes: asyncio.Queue[pipeline.Outcome] = asyncio.Queue()
    for i in range(10):  # one batch for the writer, spread over ten shards of one
        outcomes.put_nowait(pipeline.Response(pipeline.Prompt(f"a:{i}", "p"), "r", "m", "STOP", 1, 1, 1))
    settings = pipeline.Settings(output_dir=tmp_path, shard_size=1, postprocess_workers=0)
    run = stage_run(tmp_path, settings, outcomes=outcomes)
    writer = pipeline.write_outputs(run, 0)
    with pytest.raises(pipeline.PipelineError, match="No space left on device"):
        await writer
    assert run.progress.tally.answered == len(list(tmp_path.glob("shard_*.jsonl"))) == 3  # the fourth never opened


async def test_a_full_disk_under_the_arrivals_journal_stops_the_writer_with_one_line(tmp_path, monkeypatch) -> None:
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)  # the journal's space is reserved before it is mapped
    outcomes: asyncio.Queue[pipeline.Outcome] = asyncio.Queue()
    outcomes.put_nowait(pipeline.Response(pipeline.Prompt("a:1", "p"), "r", "m", "STOP", 1, 1, 1))
    settings = pipeline.Settings(output_dir=tmp_path, postprocess_workers=1)  # a journal: answers may wait for the pool
    with pytest.raises(pipeline.PipelineError, match=f"cannot write to {tmp_path}.*No space left on device"):
        await pipeline.write_outputs(stage_run(tmp_path, settings, outcomes=outcomes), 0)
    assert not list(tmp_path.glob("shard_*.jsonl"))  # stopped before anything else, with no SIGBUS


# ------------------------------------------------------------------ signals --
@pytest.mark.parametrize("stop_signal", [signal.SIGINT], ids=["SIGINT"])  # SIGTERM takes the same path: see test_resume
def test_two_thousand_workers_in_flight_stop_within_3_s(tmp_path, stop_signal) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(4000), per_file=1000)
    env = {**os.environ, "GEMINI_API_KEY": API_KEY}
    with FakeGemini(latency_s=30) as server:  # nothing lands: every request is in flight when the signal comes
        process = subprocess.Popen(  # not -v: nobody reads its log until the end
            [sys.executable, str(ROOT / "pipeline.py"), "--workers", "2000"],
            cwd=tmp_path,
            env={**env, "GOOGLE_GEMINI_BASE_URL": server.base_url},
            stderr=subprocess.PIPE,
            text=True,
        )
        assert server.wait_for_requests(300, timeout=60)  # while connections are still being opened
        process.send_signal(stop_signal)
        sent = time.monotonic()
        _, rest = process.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    assert process.returncode == 128 + stop_signal and "run the same command again" in rest  # 130 or 143
    assert elapsed < 8.0, f"exit took {elapsed:.2f} s"  # about 2 s on a quiet machine (printed); loose: a busy one
    print(f"\n{stop_signal.name} at 2,000 workers: exit after {elapsed:.2f} s")


async def test_a_stop_signal_is_not_lost_when_the_loops_wake_up_pipe_is_full(tmp_path, monkeypatch) -> None:
    asking = asyncio.Event()

    class SlowClient(pipeline.OfflineClient):
        async def generate_content(self, model: str, contents: str, config=None):
            asking.set()
            return await super().generate_content(model, contents, config)

    monkeypatch.setattr(pipeline, "OfflineClient", SlowClient)
    settings = pipeline.Settings(
        input_dir=write_prompts(tmp_path / "inputs", sample_prompts(5)),
        output_dir=tmp_path / "outputs",
        offline=True,
        offline_latency_ms=60_000,
        postprocess_workers=0,
    )
    (tmp_path / "outputs").mkdir()
    run = asyncio.create_task(pipeline.main(settings, pipeline.Progress()))
    await asking.wait()
    wake_up = asyncio.get_running_loop()._csock  # what thousands of call_soon_threadsafe() calls fill
    with pytest.raises(BlockingIOError):
        while True:
            wake_up.send(b"\0" * 65536)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, timeout=10)  # not TimeoutError: the signal was not dropped


def test_sigterm_during_the_start_up_scan_says_how_to_continue(tmp_path) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    line = b'{"id": "old.txt:%d", "prompt": "an answered prompt", "response": "its answer"}\n'
    for shard in range(40):
        (outputs / f"shard_{shard:05d}.jsonl").write_bytes(b"".join(line % (shard * 5000 + i) for i in range(5000)))
    write_prompts(tmp_path / "inputs", sample_prompts(3))
    with FakeGemini() as server:
        process = start_pipeline(tmp_path, server, "--postprocess-workers", "0")
        rest = signal_once_logged(process, "reading what earlier runs left", signal.SIGTERM)
    assert process.returncode == 143 and "run the same command again" in rest and not server.requests


# -------------------------------------------------------------------- flags --
FLOAT_FLAGS = ["--timeout", "--retry-base-s", "--retry-max-s", "--rpm", "--batch-poll-s", "--offline-latency-ms"]


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_float_flags_refuse_nan_and_inf(flag: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        pipeline.parse_args([f"{flag}={value}"])
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert flag in line and "finite" in line
