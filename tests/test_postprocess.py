"""Post-processing in a process pool, and several readers and writers."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import pipeline
from conftest import write_prompts
from fake_gemini import echo, error, invalid_key


def prompts_of_known_length(n: int) -> list[str]:
    """Prompt i has i + 1 words, so the echoed answer ("echo: " + prompt) has i + 2."""
    return [" ".join(["word"] * (i + 1)) for i in range(n)]


# User functions must be top-level, so that the pool can find them by name.
def fails_on_three_words(prompt: str, response: str) -> dict:
    if len(prompt.split()) == 3:
        raise ValueError("three is right out")
    if len(prompt.split()) == 4:
        return {"not json": {1, 2}}
    if len(prompt.split()) == 5:
        return {"id": "mine now"}
    return {"chars": len(response)}


def settings_for(tmp_path: Path, prompts: list[str], **overrides) -> pipeline.Settings:
    (tmp_path / "outputs").mkdir(exist_ok=True)
    inputs = write_prompts(tmp_path / "inputs", prompts, per_file=4)
    return pipeline.Settings(input_dir=inputs, output_dir=tmp_path / "outputs", **overrides)


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(output_dir.glob("shard_*.jsonl")) for line in path.open()]


def assert_gone(pids: set[int]) -> None:
    """Every process in `pids` has exited and been reaped (none is left behind)."""
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("processes", ["2", "0"], ids=["pool", "inline"])
def test_word_counts_are_right(tmp_path, fake_gemini, run, processes) -> None:
    fake_gemini()
    result = run(write_prompts(tmp_path / "inputs", prompts_of_known_length(40)), "--postprocess-workers", processes)
    assert result.exit_code == 0, result.stderr
    found = {r["prompt"]: r["word_count"] for r in result.records()}
    assert found == {prompt: i + 2 for i, prompt in enumerate(prompts_of_known_length(40))}


def slowly_where_it_ran(prompt: str, response: str) -> dict:
    busy_until = time.thread_time() + 0.03  # more CPU than INLINE_MAX_S: not worth doing on the event loop
    while time.thread_time() < busy_until:
        pass
    return {"pid": os.getpid()}


async def test_postprocess_runs_in_the_pool_and_leaves_no_process_behind(tmp_path, fake_gemini) -> None:
    fake_gemini()
    settings = settings_for(
        tmp_path, prompts_of_known_length(30), postprocess=slowly_where_it_ran, postprocess_workers=2
    )
    await pipeline.main(settings, pipeline.Progress())
    ran_in = [r["pid"] for r in records(settings.output_dir)]
    assert len(ran_in) == 30 and ran_in.count(os.getpid()) <= 1  # here at most the first, while the pool started
    pids = set(ran_in) - {os.getpid()}
    assert 1 <= len(pids) <= 2
    assert multiprocessing.active_children() == []
    assert_gone(pids)


async def test_a_rerun_with_nothing_to_do_starts_no_process(tmp_path, fake_gemini, monkeypatch) -> None:
    fake_gemini()
    settings = settings_for(
        tmp_path, prompts_of_known_length(30), postprocess=slowly_where_it_ran, postprocess_workers=2
    )
    started: list[object] = []
    real_start = multiprocessing.process.BaseProcess.start
    monkeypatch.setattr(
        multiprocessing.process.BaseProcess, "start", lambda process: started.append(process) or real_start(process)
    )
    await pipeline.main(settings, pipeline.Progress())
    assert started, "the first run's answers started no pool: this test would prove nothing"
    started.clear()
    progress = pipeline.Progress()
    await pipeline.main(settings, progress)
    assert progress.tally.skipped == 30 and started == []


async def test_no_process_left_behind_when_the_run_fails(tmp_path, fake_gemini) -> None:
    def refuse_late(request):
        return invalid_key() if "word " * 20 in request.prompt + " " else echo(request)

    fake_gemini(refuse_late)
    settings = settings_for(tmp_path, prompts_of_known_length(30), postprocess=slowly_where_it_ran, workers=2)
    with pytest.raises(pipeline.PipelineError, match="API key was refused"):
        await pipeline.main(settings, pipeline.Progress())
    pids = {r["pid"] for r in records(settings.output_dir)} - {os.getpid()}
    assert multiprocessing.active_children() == []
    assert_gone(pids)


@pytest.mark.parametrize("processes", [2, 0], ids=["pool", "inline"])
async def test_a_postprocess_error_fails_that_prompt_not_the_run(tmp_path, fake_gemini, processes) -> None:
    fake_gemini()
    settings = settings_for(
        tmp_path, prompts_of_known_length(8), postprocess=fails_on_three_words, postprocess_workers=processes
    )
    progress = pipeline.Progress()
    await pipeline.main(settings, progress)
    tally = progress.tally
    assert (tally.answered, tally.failed) == (5, 3)
    assert {r["prompt"]: r["chars"] for r in records(settings.output_dir)} == {
        p: len("echo: " + p) for p in prompts_of_known_length(8) if len(p.split()) not in (3, 4, 5)
    }
    failed = {f["id"]: f for f in map(json.loads, (settings.output_dir / "failed.jsonl").open())}
    assert failed["shard_0.txt:3"]["error"] == "postprocess failed: ValueError: three is right out"
    assert failed["shard_0.txt:4"]["error"].startswith("postprocess failed: TypeError: Object of type set")
    assert (
        failed["shard_1.txt:1"]["error"]
        == "postprocess failed: ValueError: returned 'id', which resuming needs as it is"
    )
    assert failed["shard_0.txt:3"]["response"] == "echo: word word word"  # the paid-for answer is kept


async def test_three_readers_and_three_writers(tmp_path, fake_gemini, monkeypatch) -> None:
    """Every prompt answered once; each file read and written by one task only; failures
    from every writer end in one exact failed.jsonl, and a rerun with other counts resumes."""
    fake_gemini(lambda request: error(503, "no") if request.prompt.endswith("7?") else echo(request), latency_s=0.002)
    prompts = [f"What is two times {i}?" for i in range(300)]
    settings = settings_for(tmp_path, prompts, readers=3, writers=3, workers=8, shard_size=7, max_attempts=1)
    read_by: dict[str, set[str]] = defaultdict(set)
    written_by: dict[str, set[str]] = defaultdict(set)
    real_read_prompts, real_write_all = pipeline.read_prompts, pipeline.write_all

    def reading(path, maker, *answered):
        read_by[path.name].add(asyncio.current_task().get_name())
        return real_read_prompts(path, maker, *answered)

    def writing(fd, data):
        written_by[Path(os.readlink(f"/proc/self/fd/{fd}")).name].add(asyncio.current_task().get_name())
        real_write_all(fd, data)

    monkeypatch.setattr(pipeline, "read_prompts", reading)
    monkeypatch.setattr(pipeline, "write_all", writing)
    progress = pipeline.Progress()
    await pipeline.main(settings, progress)
    tally = progress.tally

    assert all(len(tasks) == 1 for tasks in read_by.values()) and len(read_by) == 75
    assert len(set().union(*read_by.values())) == 3  # the three readers shared the files
    assert all(len(tasks) == 1 for tasks in written_by.values())
    shard_writers = {task for name, tasks in written_by.items() if name.startswith("shard_") for task in tasks}
    assert len(shard_writers) >= 2  # several writers really wrote
    ids = Counter(r["id"] for r in records(settings.output_dir))
    assert set(ids.values()) == {1} and len(ids) == 270
    failed = [json.loads(line)["prompt"] for line in (settings.output_dir / "failed.jsonl").open()]
    assert sorted(failed) == sorted(p for p in prompts if p.endswith("7?"))
    assert [p.name for p in settings.output_dir.glob("failed*")] == ["failed.jsonl"]  # journals merged

    fake_gemini(echo)  # a rerun with two writers answers the 30 that failed, and only those
    progress = pipeline.Progress()
    await pipeline.main(settings.__class__(**{**settings.__dict__, "writers": 2}), progress)
    tally = progress.tally
    assert (tally.skipped, tally.answered) == (270, 30)
    ids = Counter(r["id"] for r in records(settings.output_dir))
    assert set(ids.values()) == {1} and len(ids) == 300
    assert not list(settings.output_dir.glob("failed*"))


async def test_a_killed_runs_writer_journals_are_read_and_merged(tmp_path, fake_gemini) -> None:
    fake_gemini(lambda request: error(400, "still no") if request.prompt == "b" else echo(request))
    settings = settings_for(tmp_path, ["a", "b", "c"])
    journal = settings.output_dir / "failed.2.jsonl"  # as a killed run with --writers 3 leaves it
    journal.write_text(json.dumps({"id": "shard_0.txt:1", "prompt": "a", "error": "old", "attempts": 1}) + "\n")
    past = await pipeline.load_past_runs(settings.output_dir)
    assert list(past.failures) == ["shard_0.txt:1"]
    await pipeline.main(settings, pipeline.Progress())
    assert [p.name for p in settings.output_dir.glob("failed*")] == ["failed.jsonl"]
    [line] = (settings.output_dir / "failed.jsonl").read_text().splitlines()
    assert json.loads(line)["prompt"] == "b"
