"""--batch: the same job on Gemini's Batch API, through the real SDK and the fake server's
batch and file endpoints; resumable without submitting any job twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import pipeline
from conftest import API_KEY, ROOT, Run, run_subprocess, sample_prompts, write_prompts
from fake_gemini import FakeGemini, Reply, echo, error, prompt_of, scattered_429s

FAST = ("--batch-poll-s", "0.01")


def answers(result: Run) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["prompt"], r["response"]) for r in result.records()}


def jobs_per_prompt(server: FakeGemini) -> Counter[str]:
    return Counter(prompt_of(request) for job in server.batches.values() for _, request in job.requests)


def test_a_thousand_prompts_end_as_in_interactive_mode(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", [f"What is two times {i}?" for i in range(1_000)], per_file=100)
    interactive = run(inputs, "--workers", "50", "--shard-size", "50", output_dir=tmp_path / "interactive")
    assert interactive.exit_code == 0, interactive.stderr
    requests_before = len(server.requests)
    batch = run(inputs, "--batch", "--batch-size", "100", "--shard-size", "50", *FAST, output_dir=tmp_path / "batch")
    assert batch.exit_code == 0, batch.stderr
    assert answers(batch) == answers(interactive) and len(answers(batch)) == 1_000
    assert len(batch.shard_names()) == len(interactive.shard_names()) == 20
    assert len(server.requests) - requests_before == 1_000  # one request per prompt, inside the jobs
    assert len(server.batches) == 10 and set(jobs_per_prompt(server).values()) == {1}
    assert all(0 < len(job.requests) <= 100 and job.from_file for job in server.batches.values())  # keyed files
    assert "batch jobs: 10 submitted, 0 running, 10 done" in batch.stderr
    print(f"\n1,000 prompts in batch mode: {len(server.batches)} jobs, {server.batch_gets} polls")


def test_per_request_errors_and_failed_jobs_land_in_failed_jsonl(tmp_path, fake_gemini, run) -> None:
    refused = {"What is two times 3?", "What is two times 17?"}
    server = fake_gemini(lambda r: error(400, "no such thing") if r.prompt in refused else echo(r))
    server.batch_outcome = lambda job: (
        "BATCH_STATE_FAILED" if job.requests[0][0] == "shard_8.txt:1" else "BATCH_STATE_SUCCEEDED"
    )
    result = run(
        write_prompts(tmp_path / "inputs", sample_prompts(40), per_file=4), "--batch", "--batch-size", "8", *FAST
    )
    assert result.exit_code == 1
    failures = {f["prompt"]: f["error"] for f in result.failures()}
    failed_job = next(job for job in server.batches.values() if job.requests[0][0] == "shard_8.txt:1")
    assert failures == {
        **{prompt: "batch request failed, code 3: no such thing" for prompt in refused},  # INVALID_ARGUMENT
        **{
            prompt: f"batch job {failed_job.name} ended JOB_STATE_FAILED"
            for _, request in failed_job.requests
            for prompt in [prompt_of(request)]
        },
    }
    assert len(result.ids()) == 40 - len(failures)

    server.batch_outcome = lambda job: "BATCH_STATE_SUCCEEDED"
    server.behaviour = echo
    rerun = run(
        write_prompts(tmp_path / "inputs", sample_prompts(40), per_file=4), "--batch", "--batch-size", "8", *FAST
    )
    assert rerun.exit_code == 0 and not rerun.failures()
    assert sorted(rerun.ids()) == sorted(set(rerun.ids())) and len(rerun.ids()) == 40


@pytest.mark.parametrize(
    ("state", "jobs"), [("BATCH_STATE_EXPIRED", pipeline.MAX_ATTEMPTS), ("BATCH_STATE_CANCELLED", 1)]
)
def test_an_expired_job_is_submitted_again_and_a_cancelled_one_fails_its_prompts(
    tmp_path, fake_gemini, run, state, jobs
) -> None:
    """Issue 39: an expired job's prompts may pass in another (up to --max-attempts jobs); a cancelled one's were stopped on purpose."""
    server = fake_gemini()
    server.batch_outcome = lambda job: state
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(6)), "--batch", *FAST, "--retry-base-s", "0.01")
    assert result.exit_code == 1 and len(server.batches) == jobs
    failures = result.failures()
    assert {f["error"] for f in failures} == {f"batch job batches/fake{jobs:04d} ended {state.replace('BATCH', 'JOB')}"}
    assert (
        {f["attempts"] for f in failures} == {jobs} and not any(f["permanent"] for f in failures) and len(failures) == 6
    )


def test_results_out_of_order_and_without_metadata_still_reach_their_prompts(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(lambda r: error(400, "odd") if r.prompt.endswith("7?") else echo(r))
    server.batch_shuffle = True  # what an answer matched by position would get wrong
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(60)), "--batch", "--batch-size", "25", *FAST)
    assert result.exit_code == 1
    assert [(job.from_file, len(job.requests)) for job in server.batches.values()] == [
        (True, 25),
        (True, 25),
        (True, 10),
    ]
    assert {r["prompt"]: r["response"] for r in result.records()} == {
        p: f"echo: {p}" for p in sample_prompts(60) if not p.endswith("7?")
    }
    assert {f["prompt"] for f in result.failures()} == {p for p in sample_prompts(60) if p.endswith("7?")}


def test_a_rerun_collects_what_a_killed_run_left_unwritten(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(30))
    first = run(inputs, "--batch", "--batch-size", "10", *FAST)
    assert first.exit_code == 0
    last_shard = first.output_dir / first.shard_names()[-1]
    lost = [json.loads(line)["id"] for line in last_shard.open()]
    last_shard.unlink()  # as if killed before these answers reached the disk
    journal = first.output_dir / "batch_jobs.jsonl"
    with journal.open("a") as torn:  # and while appending to the journal
        torn.write('{"submitting": "pipeline shard_9')
    answered, jobs = dict(server.answered), len(server.batches)
    second = run(inputs, "--batch", "--batch-size", "10", *FAST)
    assert second.exit_code == 0, second.stderr
    assert len(server.batches) == jobs and dict(server.answered) == answered  # nothing submitted or paid again
    assert (
        "1 resumed, 0 submitted" in second.stderr
        and f"{len(lost)} answered, 0 failed, {30 - len(lost)} already done" in second.stderr
    )
    assert Counter(second.ids()) == Counter({i: 1 for i in first.ids()})
    assert journal.read_text().endswith("}\n") and "repairing batch_jobs.jsonl" in second.stderr


def test_results_the_sdk_cannot_read_stop_the_run_and_stay_collectable(tmp_path, fake_gemini, run) -> None:
    """A result google-genai's types reject (here a response of a newer shape) must not
    have the job's prompts failed: they were answered, and would be paid for again."""
    unreadable = Reply(200, {"candidates": "a shape this SDK does not know"})
    server = fake_gemini(lambda r: unreadable if r.prompt.endswith("4?") else echo(r))
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(9))
    first = run(inputs, "--batch", *FAST)
    assert first.exit_code == 1 and not first.ids() and not first.failures()
    message = first.stderr.strip().splitlines()[-1]
    assert (
        message.startswith("error: cannot read batch job batches/fake0001 (ValidationError")
        and "run the same command" in message
    )
    results = "files/fake0001-responses"  # as a google-genai that reads it would see it: an error, say
    readable = json.dumps({"error": {"code": 3, "message": "odd"}})[1:-1]
    server.files[results] = server.files[results].replace(
        f'"response": {json.dumps(unreadable.body)}'.encode(), readable.encode()
    )
    second = run(inputs, "--batch", *FAST)
    assert (
        second.exit_code == 1
        and len(second.ids()) == 8
        and [f["prompt"] for f in second.failures()] == ["What is two times 4?"]
    )
    assert len(server.batches) == 1 and sorted(server.answered.values()) == [1] * 9  # collected, not asked again


def start_batch_run(cwd: Path, server: FakeGemini, *flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "GEMINI_API_KEY": API_KEY, "GOOGLE_GEMINI_BASE_URL": server.base_url}
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "pipeline.py"),
            *("-v", "--batch", "--batch-size", "100", "--batch-poll-s", "0.05"),
            *flags,
        ],
        cwd=cwd,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def unnamed_submissions(journal: Path) -> int:
    """Submissions whose job name the journal never got: created or not, nobody knows yet."""
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    return len(
        {r["submitting"] for r in records if "submitting" in r} - {r["submitted"] for r in records if "submitted" in r}
    )


def forget_last_job_name(journal: Path) -> None:
    """Drop the last "submitted" line: as if the run was killed after the API created the
    job, before the journal recorded its name."""
    lines = journal.read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if line.startswith('{"submitted"'))
    journal.write_text("".join(lines[:last] + lines[last + 1 :]))


@pytest.mark.parametrize(
    "stop_signal, mid_create",
    [(signal.SIGKILL, False), (signal.SIGKILL, True), (signal.SIGINT, False)],
    ids=["SIGKILL", "SIGKILL mid-create", "SIGINT"],
)
def test_killed_between_submission_and_completion_then_rerun(tmp_path, stop_signal, mid_create) -> None:
    write_prompts(tmp_path / "inputs", [f"prompt {i}" for i in range(1000)], per_file=100)
    with FakeGemini(batch_polls=(1000, 0)) as server:  # jobs stay pending until released below
        process = start_batch_run(tmp_path, server)
        assert process.stderr is not None
        submitted = 0
        for line in process.stderr:
            submitted += " submitted batches/" in line
            if submitted == 5:
                break
        process.send_signal(stop_signal)
        _, rest = process.communicate(timeout=10)
        assert process.returncode == (-9 if stop_signal == signal.SIGKILL else 130)
        if stop_signal == signal.SIGINT:
            assert "batch jobs still on Google's side; run the same command again" in rest
        jobs_before = len(server.batches)
        assert jobs_before >= 5 and not server.answered
        if mid_create:
            forget_last_job_name(tmp_path / "outputs" / "batch_jobs.jsonl")
        unnamed = unnamed_submissions(tmp_path / "outputs" / "batch_jobs.jsonl")  # a kill may land mid-create too
        assert unnamed >= mid_create

        server.batch_polls = (0, 1)  # now they run, and end
        rerun = start_batch_run(tmp_path, server)
        _, stderr = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, stderr
    assert f"{jobs_before} resumed" in stderr  # every job submitted before is collected, none again
    assert server.batch_lists == (1 if unnamed else 0)  # an unnamed one is looked up by its display name, once
    assert set(jobs_per_prompt(server).values()) == {1}  # no prompt was in two jobs
    assert sorted(server.answered.values()) == [1] * 1000  # nor paid for twice
    ids = Run(0, "", stderr, tmp_path / "outputs").ids()
    assert len(ids) == 1000 and len(set(ids)) == 1000
    print(f"\n{stop_signal.name}: {jobs_before} jobs submitted before the stop, {len(server.batches)} in all")


def test_a_submission_the_api_never_received_is_asked_again(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(9))
    journal = tmp_path / "outputs" / "batch_jobs.jsonl"
    journal.parent.mkdir()
    prompts = [[f"shard_{i // 3}.txt:{i % 3 + 1}", p] for i, p in enumerate(sample_prompts(9))]
    journal.write_text(json.dumps({"submitting": "pipeline lost 00", "prompts": prompts}) + "\n")  # killed mid-create
    result = run(inputs, "--batch", *FAST)
    assert result.exit_code == 0, result.stderr
    assert server.batch_lists == 1 and len(server.batches) == 1
    assert sorted(server.answered.values()) == [1] * 9 and len(result.ids()) == 9
    assert json.loads(journal.read_text().splitlines()[1]) == {"submitted": "pipeline lost 00", "job": None}


def test_batch_and_offline_do_not_mix(tmp_path) -> None:
    result = run_subprocess(["--batch", "--offline"], tmp_path)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--batch" in result.stderr


def test_results_that_may_pass_again_are_submitted_again_in_the_same_run(tmp_path, fake_gemini, run) -> None:
    """Issue 39: 1,000 prompts in jobs of 250, 5% of results a per-request RESOURCE_EXHAUSTED
    (gRPC code 8): one run answers all, each once, with no failure left for the morning."""
    server = fake_gemini(scattered_429s(0.05))
    inputs = write_prompts(tmp_path / "inputs", [f"prompt {i}" for i in range(1000)], per_file=100)
    result = run(inputs, "--batch", "--batch-size", "250", *FAST, "--retry-base-s", "0.01")
    assert result.exit_code == 0, result.stderr
    ids = result.ids()
    assert len(ids) == len(set(ids)) == 1000 and not result.failures()
    assert sorted(server.answered.values()) == [1] * 1000  # none answered twice
    again = [prompt for prompt, jobs in jobs_per_prompt(server).items() if jobs > 1]
    assert again and len(server.batches) > 4  # some were in a later job (their results were code 8 first)
    assert {r["attempts"] for r in result.records() if r["prompt"] in again} - {1} and f"{len(again)}" in result.stderr
    summary = result.stderr.strip().splitlines()[-2]
    assert "prompts/s" not in summary and "resubmitted" in summary


def test_with_max_attempts_1_a_result_that_may_pass_again_fails_not_for_good_and_a_rerun_answers_it(
    tmp_path, fake_gemini, run
) -> None:
    server = fake_gemini(scattered_429s(0.05))
    inputs = write_prompts(tmp_path / "inputs", [f"prompt {i}" for i in range(200)], per_file=100)
    result = run(inputs, "--batch", *FAST, "--max-attempts", "1")
    assert result.exit_code == 1 and len(server.batches) == 1
    failures = result.failures()
    assert failures and all(
        f["error"].startswith("batch request failed, code 8:") and not f["permanent"] for f in failures
    )
    again = run(inputs, "--batch", *FAST)
    assert again.exit_code == 0, again.stderr
    assert not again.failures() and len(again.ids()) == 200
    assert [len(job.requests) for job in server.batches.values()] == [200, len(failures)]  # the rerun asked only those


def test_a_kill_9_with_resubmissions_in_flight_pays_nothing_twice(tmp_path) -> None:
    write_prompts(tmp_path / "inputs", [f"prompt {i}" for i in range(1000)], per_file=100)
    with FakeGemini(scattered_429s(0.05), batch_polls=(0, 1)) as server:
        process = start_batch_run(
            tmp_path, server, "--retry-base-s", "0.01", "--batch-size", "250", "--batch-poll-s", "0.3"
        )
        assert process.stderr is not None
        for line in process.stderr:
            if "resubmitting" in line:  # a job ended with results worth asking again: they are on their way to another
                break
        for line in process.stderr:
            if " submitted batches/" in line:  # ...which is now created, its results not yet in
                break
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=10)
        jobs_before = len(server.batches)
        server.batch_polls = (
            0,
            30,
        )  # the resubmitted job outlasts a back-off and a gathering: its prompts must not go in a third job
        rerun = start_batch_run(tmp_path, server, "--retry-base-s", "0.01", "--batch-size", "250")
        _, stderr = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, stderr
    assert jobs_before >= 5 and sorted(server.answered.values()) == [1] * 1000  # no prompt paid for twice
    assert (
        len(server.batches) == jobs_before and "0 submitted" in stderr
    )  # each resubmitted one belongs to its later job only
    ids = Run(0, "", stderr, tmp_path / "outputs").ids()
    assert len(ids) == len(set(ids)) == 1000
