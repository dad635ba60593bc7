"""Resume and exactly-once: a rerun skips what is answered and retries what failed;
a killed or interrupted run loses nothing it had written, and pays for little twice."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

import pipeline
from conftest import ROOT, Run, sample_prompts, start_pipeline, wait_for_writes, write_prompts
from fake_gemini import FakeGemini, echo, error


def all_lines_are_records(output_dir: Path) -> list[dict]:
    records = []
    for path in sorted(output_dir.glob("shard_*.jsonl")):
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n"), path
        records += [json.loads(line) for line in text.split("\n")[:-1]]
    return records


def test_rerun_skips_answered_and_retries_failed(tmp_path, fake_gemini, run) -> None:
    """Failed for reasons that may pass (attempts spent on 503s): a plain rerun asks them."""
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(12))
    refused = {"What is two times 3?", "What is two times 8?"}
    fake_gemini(lambda r: error(503, "not today") if r.prompt in refused else echo(r))
    first = run(inputs, "--shard-size", "4", "--max-attempts", "1")
    assert first.exit_code == 1
    assert {f["prompt"] for f in first.failures()} == refused
    before = {n: (first.output_dir / n).read_bytes() for n in first.shard_names()}

    server = fake_gemini()  # the same prompts now succeed
    second = run(inputs, "--shard-size", "4")
    assert second.exit_code == 0, second.stderr
    assert sorted(r.prompt for r in server.requests) == sorted(refused)  # nothing answered is asked again
    assert all((second.output_dir / n).read_bytes() == data for n, data in before.items())  # never rewritten
    assert second.shard_names() == [*before, f"shard_{len(before):05d}.jsonl"]  # numbering continues
    assert sorted(second.ids()) == sorted(set(second.ids())) and len(second.ids()) == 12
    assert not (second.output_dir / "failed.jsonl").exists()  # nothing is failed any more
    assert "2 answered, 0 failed, 10 already done" in second.stderr

    third = run(inputs, "--shard-size", "4")
    assert third.exit_code == 0 and "nothing to do: all 12 prompts were answered before" in third.stderr


def test_failed_jsonl_lists_exactly_the_still_unanswered(tmp_path, fake_gemini, run) -> None:
    inputs = write_prompts(tmp_path / "inputs", ["a", "b", "c", "d"])
    fake_gemini(lambda r: error(503, "no") if r.prompt in "bcd" else echo(r))
    run(inputs, "--max-attempts", "1")
    fake_gemini(lambda r: error(503, "still no") if r.prompt == "c" else echo(r))
    second = run(inputs, "--max-attempts", "1")
    assert second.exit_code == 1
    assert [(f["id"], f["error"]) for f in second.failures()] == [("shard_0.txt:3", "503 UNAVAILABLE: still no")]
    assert sorted(second.ids()) == ["shard_0.txt:1", "shard_0.txt:2", "shard_1.txt:1"]


def test_torn_last_line_is_repaired_and_that_prompt_asked_again(tmp_path, fake_gemini, run) -> None:
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(8))
    fake_gemini()
    first = run(inputs)
    last_shard = first.output_dir / first.shard_names()[-1]
    text = last_shard.read_text()
    torn_record = json.loads(text.splitlines()[-1])
    last_shard.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # cut mid-record

    server = fake_gemini()
    second = run(inputs)
    assert second.exit_code == 0, second.stderr
    assert [r.prompt for r in server.requests] == [torn_record["prompt"]]
    records = all_lines_are_records(second.output_dir)
    assert sorted(r["id"] for r in records) == sorted({r["id"] for r in records}) and len(records) == 8


def test_edited_inputs_stop_the_run(tmp_path, fake_gemini, run) -> None:
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(6))
    fake_gemini()
    first = run(inputs)
    before = {n: (first.output_dir / n).read_bytes() for n in first.shard_names()}
    (inputs / "shard_1.txt").write_text("What is two times 3?\nsomething else entirely\nWhat is two times 5?\n")
    server = fake_gemini()
    second = run(inputs)
    assert second.exit_code == 2
    message = second.stderr.strip().splitlines()[-1]
    assert "shard_1.txt:2" in message and "--output-dir" in message and "Traceback" not in second.stderr
    assert not server.requests
    assert {n: (first.output_dir / n).read_bytes() for n in first.shard_names()} == before


async def test_a_rerun_parses_each_input_once_makes_no_prompt_of_an_answered_line_and_decodes_shards_no_further_than_id_and_prompt(
    tmp_path, fake_gemini, monkeypatch
) -> None:
    fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(12))
    settings = pipeline.Settings(input_dir=inputs, output_dir=tmp_path / "outputs", shard_size=5)
    settings.output_dir.mkdir()
    await pipeline.main(settings, pipeline.Progress())
    parsed: Counter[str] = Counter()
    real_read_prompts = pipeline.read_prompts
    monkeypatch.setattr(
        pipeline,
        "read_prompts",
        lambda path, maker, *answered: parsed.update([path.name]) or real_read_prompts(path, maker, *answered),
    )
    real_loads = json.loads

    def loads(text, *args, **kwargs):
        assert not str(text).startswith('{"id"'), "a record was decoded whole"
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(pipeline.json, "loads", loads)
    made: list[str] = []
    real_prompt = pipeline.PromptMaker.prompt
    monkeypatch.setattr(
        pipeline.PromptMaker,
        "prompt",
        lambda maker, prompt_id, *rest, **row: made.append(prompt_id) or real_prompt(maker, prompt_id, *rest, **row),
    )
    progress = pipeline.Progress()
    await pipeline.main(settings, progress)
    tally = progress.tally
    assert (tally.skipped, tally.answered) == (12, 0)
    assert parsed == {f"shard_{i}.txt": 1 for i in range(4)}
    assert made == []  # an answered line is known by its place and text before a Prompt is made of it


def test_resuming_keeps_16_bytes_or_so_per_answered_prompt() -> None:
    """Resuming a 10,000,000-prompt job must not need gigabytes: an answered prompt costs
    8 bytes when its id is its place (<file>:<line>), two 64-bit fingerprints (its id; its
    request) when the row named it, not a dict entry of strings."""
    places = [f"prompts_{i // 10_000}.txt:{i % 10_000 + 1}" for i in range(200_000)]
    named = [f"row-{i}" for i in range(50_000)] + ["a.txt:0", "a.txt:07", "b.txt:99999999"]  # not places, or too sparse
    ids = places + named
    count = len(ids)
    tracemalloc.start()
    answered = pipeline.Answered()
    for start in range(0, count, 1000):  # a shard's records at a time, as a rerun reads them
        answered.add(
            [(prompt_id, f"What is two times {i}?", "") for i, prompt_id in enumerate(ids[start : start + 1000], start)]
        )
    answered.freeze()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held / count < 16, f"{held / count:.1f} bytes per answered prompt"
    assert len(answered) == count
    assert all(
        ids[i] in answered and answered.holds(ids[i], f"What is two times {i}?", "")
        for i in [*range(0, count, 997), count - 3, count - 2, count - 1]
    )
    assert not any(
        f"new.txt:{i}" in answered or answered.holds(f"new.txt:{i}", "x", "") is not None for i in range(1000)
    )
    for i in (5, count - 5, count - 1):  # the same id asked with another text, or another digest
        assert answered.holds(ids[i], f"What is two times {i + 1}?", "") is False
        assert answered.holds(ids[i], f"What is two times {i}?", "ab12") is False


def descendants_of(pid: int) -> dict[int, int]:
    """The processes `pid` started, and theirs (the post-processing pool: its fork server,
    resource tracker and workers), each with its parent's pid."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone meanwhile
            continue
    found, frontier = {}, {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier and child not in found}
        found.update({child: parents[child] for child in frontier})
    return found


def pool_of(pid: int, timeout: float = 10) -> dict[int, int]:
    """descendants_of(pid) once a pool worker is among them: the pool starts in a thread
    once postprocess() proves slow, a moment after the first answer (no event marks it)."""
    deadline = time.monotonic() + timeout
    while not (pool := descendants_of(pid)) or set(pool.values()) == {pid}:
        if time.monotonic() > deadline:
            return pool
        time.sleep(0.01)
    return pool


def wait_until_gone(pids: set[int], timeout: float = 10) -> set[int]:
    """Wait for each process to exit (an event, through a pidfd); returns those still alive."""
    alive = set()
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        with os.fdopen(fd) as pidfd:
            if not select.select([pidfd], [], [], timeout)[0]:
                alive.add(pid)
    return alive


# Every answer the writer takes is journaled at once (see ArrivalJournal), so a kill
# loses at most the requests in flight and the answers waiting in the outcomes queue.
@pytest.mark.parametrize("processes", ["0", str(pipeline.POSTPROCESS_WORKERS)], ids=["inline", "pool"])
def test_sigkill_at_random_moments_then_resume_writes_every_id_once(tmp_path, processes) -> None:
    prompts, workers, kills = 600, 10, 3
    queue_size = pipeline.queue_depth(
        pipeline.Settings(workers=workers)
    )  # the queues hold one place per worker at least
    write_prompts(tmp_path / "inputs", [f"prompt {i}" for i in range(prompts)], per_file=50)
    flags = ("--workers", str(workers), "--shard-size", "7", "--postprocess-workers", processes)
    rng = random.Random(20261127)
    with FakeGemini(latency_s=0.01) as server:
        seen_pool = 0
        for _ in range(kills):
            process = start_pipeline(tmp_path, server, *flags, pool=processes != "0")
            reached = wait_for_writes(process, rng.randint(5, 100))
            pool = descendants_of(process.pid)
            process.kill()
            process.wait(timeout=10)
            assert reached, "the run finished before it could be killed"
            assert not wait_until_gone(set(pool))  # the pool died with the pipeline
            seen_pool += bool(pool)
        assert bool(seen_pool) == (processes != "0")  # there was a pool to kill, or none
        final = start_pipeline(tmp_path, server, *flags)
        _, stderr = final.communicate(timeout=60)
    assert final.returncode == 0, stderr
    records = all_lines_are_records(tmp_path / "outputs")
    ids = Counter(r["id"] for r in records)
    assert len(ids) == prompts and set(ids.values()) == {1}  # every id exactly once
    assert all(r["response"] == f"echo: {r['prompt']}" for r in records)
    paid, bound = sum(server.answered.values()), kills * (workers + queue_size + 1)
    assert paid <= prompts + bound
    assert not list((tmp_path / "outputs").glob("arrivals.*"))  # a complete run leaves no journal behind
    print(
        f"\nkill test ({processes} pool processes): {kills} kills, {paid - prompts} prompts answered twice, bound {bound}"
    )


def test_an_answer_journaled_but_never_written_is_written_with_no_request(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(4))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    received = pipeline.Response(
        pipeline.Prompt("shard_0.txt:2", "What is two times 1?"), "it is 2", "m-7", "STOP", 3, 6, 3
    )
    torn = pipeline.Response(pipeline.Prompt("shard_0.txt:3", "What is two times 2?"), "4", "m-7", "STOP", 1, 6, 1)
    journal = outputs / "arrivals.ab12cd.0.0.jsonl"  # as a run killed while its writer waited for the pool left it
    journal.write_text(pipeline.Records.journal_line(received) + pipeline.Records.journal_line(torn)[:30])
    result = run(inputs)
    assert result.exit_code == 0, result.stderr
    records = {r["id"]: r for r in result.records()}
    assert records["shard_0.txt:2"] == {
        **json.loads(pipeline.Records.journal_line(received)),
        "word_count": 3,
    }  # post-processed now
    assert "What is two times 1?" not in server.answered  # no request for it
    assert sorted(server.answered.values()) == [1] * 3 and len(records) == 4  # the torn one was asked again
    assert not journal.exists()


def test_a_killed_runs_journal_is_cut_at_the_line_of_its_first_zero_byte(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(4))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    kept, holed, after = (
        pipeline.Response(
            pipeline.Prompt(f"shard_0.txt:{i + 1}", f"What is two times {i}?"), str(2 * i), "m-7", "STOP", 1, 6, 1
        )
        for i in range(3)
    )
    line = pipeline.Records.journal_line(holed).encode()
    torn = line[:20] + bytes(16) + line[36:]  # a copy the kill cut short, its middle not yet stored
    journal = outputs / "arrivals.ab12cd.0.0.jsonl"  # as a killed run left it: lines, then its reserved zeros
    journal.write_bytes(
        pipeline.Records.journal_line(kept).encode()
        + torn
        + pipeline.Records.journal_line(after).encode()
        + bytes(4096)
    )
    result = run(inputs)
    assert result.exit_code == 0, result.stderr
    records = {r["id"]: r for r in result.records()}
    assert (
        records["shard_0.txt:1"] == {**json.loads(pipeline.Records.journal_line(kept)), "word_count": 1}
        and len(records) == 4
    )
    assert sorted(server.answered) == ["What is two times 1?", "What is two times 2?", "What is two times 3?"]
    assert set(server.answered.values()) == {1} and not journal.exists()


def test_the_journal_reserves_its_space_grows_is_cut_to_its_lines_and_outlives_a_kill(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "ARRIVALS_FILE_BYTES", 4096)
    answers = [pipeline.Response(pipeline.Prompt(f"a:{i}", "p"), "r" * 1000, "m", "STOP", 1, 1, 1) for i in range(10)]
    lines = [pipeline.Records.journal_line(answer).encode() for answer in answers]
    journal = pipeline.ArrivalJournal(tmp_path, "ab12cd.0")
    journal.write(answers[:1])
    assert journal.path is not None
    assert journal.path.read_bytes() == lines[0] + bytes(
        4096 - len(lines[0])
    )  # in the page cache at once, space reserved
    journal.write(answers[1:])  # more than the space: it grows
    assert journal.path.read_bytes().rstrip(b"\0") == b"".join(lines)
    path = journal.path
    journal.close()
    assert path.read_bytes() == b"".join(lines)
    killed = (
        f"import os, sys, signal; sys.path.insert(0, {str(ROOT)!r}); import pipeline; from pathlib import Path\n"
        f"pipeline.ARRIVALS_FILE_BYTES = 4096\n"
        f"journal = pipeline.ArrivalJournal(Path({str(tmp_path)!r}), 'ef34ab.0')\n"
        f"journal.write([pipeline.Response(pipeline.Prompt('a:1', 'p'), 'r', 'm', 'STOP', 1, 1, 1)])\n"
        f"os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", killed], check=False).returncode == -signal.SIGKILL
    [left] = tmp_path.glob("arrivals.ef34ab.0.*.jsonl")
    expected = pipeline.Records.journal_line(
        pipeline.Response(pipeline.Prompt("a:1", "p"), "r", "m", "STOP", 1, 1, 1)
    ).encode()
    assert left.read_bytes() == expected + bytes(4096 - len(expected))  # what was copied, then its reserved space


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_writes_everything_received_and_exits_130_or_143(tmp_path, stop_signal) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(60))
    with FakeGemini(latency_s=0.15) as server:
        process = start_pipeline(tmp_path, server, "--workers", "5", pool=True)
        assert wait_for_writes(process, 1)
        pool = pool_of(process.pid)
        process.send_signal(stop_signal)
        sent = time.monotonic()
        _, rest = process.communicate(timeout=10)
        elapsed = time.monotonic() - sent
        assert process.returncode == 128 + stop_signal  # 130 for Ctrl-C, 143 for SIGTERM
        assert elapsed < 2.0
        assert_pool_stopped(pool, process.pid)
        assert "Traceback" not in rest and "run the same command again" in rest
        written = Run(process.returncode, "", rest, tmp_path / "outputs").ids()
        assert 1 <= len(written) < 60
        # Nothing received is lost: every prompt the server answered is on disk.
        on_disk = {r["prompt"] for r in all_lines_are_records(tmp_path / "outputs")}
        assert set(server.answered) == on_disk

        resumed = start_pipeline(tmp_path, server, "--workers", "5")
        _, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, stderr
    assert sorted(server.answered.values()) == [1] * 60  # and so nothing was paid for twice
    print(f"\n{stop_signal.name}: exit {128 + stop_signal} after {elapsed:.2f} s")


def assert_pool_stopped(pool: dict[int, int], pipeline_pid: int) -> None:
    """The pipeline stopped its pool's workers before it exited; the fork server and the
    resource tracker, which exit once it is gone, a moment later."""
    workers = {pid for pid, parent in pool.items() if parent != pipeline_pid}
    assert workers and not wait_until_gone(workers, timeout=0)
    assert not wait_until_gone(set(pool))


def test_second_ctrl_c_exits_at_once(tmp_path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(20))
    served = itertools.count()

    def two_at_once_then_slowly(request):  # two answers start the pool; then requests stay in flight past any grace
        return dataclasses.replace(echo(request), delay_s=0 if next(served) < 2 else 30)

    with FakeGemini(two_at_once_then_slowly) as server:
        process = start_pipeline(tmp_path, server, "--workers", "2", pool=True)
        assert process.stderr is not None
        assert wait_for_writes(process, 2)
        assert server.wait_for_requests(4)  # both workers are waiting on the server
        pool = pool_of(process.pid)
        process.send_signal(signal.SIGINT)
        for line in process.stderr:
            if "Ctrl-C again quits at once" in line:
                break
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, rest = process.communicate(timeout=10)
    assert process.returncode == 130
    assert time.monotonic() - sent < pipeline.STOP_GRACE_S  # it does not wait out the grace
    assert "Traceback" not in rest
    assert_pool_stopped(pool, process.pid)


def test_the_record_codec_reads_back_what_it_writes_odd_bytes_included() -> None:
    """Records is the one codec: a shard's record, a journal line and a batch journal's prompt
    each read back to what was written; the leading keys come first however odd the text."""
    odd = 'quote " backslash \\ tab \t newline \n nul \x00 line-sep \u2028 emoji \U0001f600 "id": x'
    schema = pipeline.AnswerFormat.of({"type": "object"})
    prompt = pipeline.Prompt(odd, odd + "?", fields={"source": odd, "n": 1}, digest="d" * 32, answer_format=schema)
    response = pipeline.Response(prompt, odd, "m", "STOP", 2, 3, 4, budget={"max_output_tokens": 9}, parsed={"k": odd})
    response.extra = json.dumps({"word_count": 7})
    line = pipeline.Records.answer(response)
    assert (
        line.endswith("\n") and line.count("\n") == 1 and list(json.loads(line))[:3] == list(pipeline.Records.LEADING)
    )
    assert pipeline.Records.front(line) == (odd, odd + "?", "d" * 32)
    back = pipeline.Records.journaled_answer(json.loads(pipeline.Records.journal_line(response)))
    assert (back.prompt.id, back.prompt.text, back.prompt.digest, back.prompt.fields) == (
        odd,
        odd + "?",
        "d" * 32,
        {"source": odd, "n": 1},
    )
    assert (back.text, back.attempts, back.prompt_tokens, back.budget, back.parsed) == (
        odd,
        2,
        3,
        {"max_output_tokens": 9},
        {"k": odd},
    )
    again = pipeline.Records.journaled_prompt(json.loads(json.dumps(pipeline.Records.batch_prompt(prompt))))
    assert (again.id, again.text, again.digest, again.fields, again.answer_format.schema) == (
        odd,
        odd + "?",
        "d" * 32,
        prompt.fields,
        {"type": "object"},
    )
    failure = pipeline.Failure(prompt, "e", 1)
    assert pipeline.Records.front(pipeline.Records.failure(failure)) == (odd, odd + "?", "d" * 32)
