"""Paying less for a shared prefix: --context is sent first in every request (where implicit
caching finds it), and with --cache it is held once in an explicit cache that every request
names, made once per job, deleted however the run ends, and found again by a rerun."""

from __future__ import annotations

import random
import re
import signal
from pathlib import Path

import pipeline
from conftest import signal_once_logged, start_pipeline, wait_for_writes, write_prompts
from fake_gemini import FakeGemini, echo


def context_of(folder: Path, words: int) -> Path:
    """A document of `words` tokens, as the fake server counts them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(words)
    path = folder / f"context_{words}.txt"
    path.write_text(
        " ".join(rng.choice(["codebook", "label", "example", "rule"]) for _ in range(words)), encoding="utf-8"
    )
    return path


def spend_of(stderr: str) -> float:
    return float(re.search(r"\$([0-9.e-]+) estimated", stderr)[1])


def test_a_cached_run_makes_one_cache_names_it_on_every_request_deletes_it_and_costs_under_a_quarter(
    tmp_path, fake_gemini, run
) -> None:
    inputs = write_prompts(tmp_path / "inputs", [f"question {i} about the codebook" for i in range(1000)], per_file=100)
    context, instruction = context_of(tmp_path, 5000), "Answer from the codebook alone."
    server = fake_gemini()
    cached = run(
        inputs,
        "--context",
        str(context),
        "--cache",
        "--system-instruction",
        instruction,
        "--workers",
        "50",
        output_dir=tmp_path / "cached",
    )
    assert cached.exit_code == 0, cached.stderr
    [(made, name), (deleted, same)] = server.cache_events
    assert (made, deleted, same) == ("create", "delete", name) and server.caches == {}
    assert len(server.requests) == 1000 and all(r.body.get("cachedContent") == name for r in server.requests)
    assert all(
        "systemInstruction" not in r.body and len(r.body["contents"]) == 1 for r in server.requests
    )  # both are in the cache
    assert len(server.count_tokens_requests) == 1
    records = cached.records()
    assert {r["usage"]["cached_tokens"] for r in records} == {5000 + len(instruction.split())}
    per_input, per_output, _, _ = pipeline.PRICES[pipeline.MODEL]
    uncached = (
        sum(r["usage"]["prompt_tokens"] * per_input + r["usage"]["response_tokens"] * per_output for r in records) / 1e6
    )
    assert (
        spend_of(cached.stderr) <= 0.25 * uncached
    )  # the same tokens, the prefix sent each time (as the next test sends it)


def test_a_row_with_an_instruction_of_its_own_is_sent_without_the_cache_its_context_first(
    tmp_path, fake_gemini, run
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "rows.jsonl").write_text(
        '{"id": "own", "prompt": "a", "system_instruction": "Be terse."}\n{"id": "shared", "prompt": "b"}\n'
    )
    context = context_of(tmp_path, 2000)
    server = fake_gemini()
    result = run(inputs, "--context", str(context), "--cache")
    assert result.exit_code == 0, result.stderr
    asked = {r.prompt: r.body for r in server.requests}
    assert "cachedContent" not in asked["a"] and asked["a"]["systemInstruction"]["parts"][0]["text"] == "Be terse."
    assert [turn["parts"][0]["text"] for turn in asked["a"]["contents"]] == [context.read_text(), "a"]
    assert asked["b"]["cachedContent"] and len(asked["b"]["contents"]) == 1


def test_a_prefix_under_the_minimum_is_sent_first_and_implicit_hits_are_reported(tmp_path, fake_gemini, run) -> None:
    inputs = write_prompts(tmp_path / "inputs", [f"question {i}" for i in range(20)], per_file=20)
    server = fake_gemini()
    server.implicit_caching = True
    result = run(inputs, "--context", str(context_of(tmp_path, 300)), "--cache", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    assert "under gemini-flash-latest's minimum of 1,024" in result.stderr and server.cache_events == []
    assert all(
        len(r.body["contents"]) == 2 and "cachedContent" not in r.body for r in server.requests
    )  # the context, then the prompt
    assert re.search(r"\(5700 cached, 9\d% of input\)", result.stderr)  # 19 of 20 prefixes were seen before


def test_a_cache_is_deleted_after_ctrl_c(tmp_path) -> None:
    write_prompts(tmp_path / "inputs", [f"question {i}" for i in range(40)])
    context = context_of(tmp_path, 2000)
    with FakeGemini(echo, latency_s=0.05) as server:
        process = start_pipeline(tmp_path, server, "--context", str(context), "--cache", "--workers", "2")
        assert wait_for_writes(process, 3)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
        assert process.returncode == 128 + signal.SIGINT
        assert [event for event, _ in server.cache_events] == ["create", "delete"] and server.caches == {}


def test_a_rerun_after_kill_9_uses_the_cache_it_left_and_leaves_none(tmp_path, fake_gemini, run) -> None:
    write_prompts(tmp_path / "inputs", [f"question {i}" for i in range(40)])
    context = context_of(tmp_path, 2000)
    with FakeGemini(echo, latency_s=0.05) as server:
        process = start_pipeline(tmp_path, server, "--context", str(context), "--cache", "--workers", "2")
        assert wait_for_writes(process, 3)
        process.kill()
        process.communicate(timeout=30)
        [(made, left)] = server.cache_events
        assert made == "create" and list(server.caches) == [left]  # a kill -9 deletes nothing
    rerun_server = fake_gemini()
    rerun_server.caches, rerun_server.cache_events = server.caches, []  # the same project's caches
    result = run(tmp_path / "inputs", "--context", str(context), "--cache", output_dir=tmp_path / "outputs")
    assert result.exit_code == 0, result.stderr
    assert rerun_server.cache_events == [("update", left), ("delete", left)] and rerun_server.caches == {}
    assert {r.body["cachedContent"] for r in rerun_server.requests} == {left}


def test_a_cache_deleted_by_someone_else_stops_the_run_and_the_rerun_makes_another(tmp_path, fake_gemini, run) -> None:
    inputs = write_prompts(tmp_path / "inputs", [f"question {i}" for i in range(30)], per_file=30)
    context = context_of(tmp_path, 2000)
    server = fake_gemini()

    def gone_after_ten(request):
        if len(server.requests) == 10:
            server.caches.clear()
        return echo(request)

    server.behaviour = gone_after_ten
    first = run(inputs, "--context", str(context), "--cache", "--workers", "1")
    assert first.exit_code == 1 and "context cache is gone" in first.stderr.strip().splitlines()[-1]
    server.behaviour = echo
    second = run(inputs, "--context", str(context), "--cache")
    assert second.exit_code == 0, second.stderr
    assert [event for event, _ in server.cache_events] == ["create", "create", "delete"]
    assert len({r["id"] for r in second.records()}) == 30 == len(second.records())


def test_cache_and_context_refuse_what_they_cannot_do_in_one_line(tmp_path, fake_gemini, run) -> None:
    inputs = write_prompts(tmp_path / "inputs", ["a"])
    fake_gemini()
    for flags, message in [
        (["--cache"], "--cache: nothing to cache"),
        (["--context", str(tmp_path / "missing.txt")], "--context"),
        (["--cache", "--offline", "--system-instruction", "x"], "--cache needs the API"),
    ]:
        result = run(inputs, *flags)
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr, flags
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    result = run(inputs, "--context", str(binary))
    assert result.exit_code == 2 and "not UTF-8 text" in result.stderr


def test_the_context_is_part_of_the_jobs_identity(tmp_path, fake_gemini, run) -> None:
    inputs = write_prompts(tmp_path / "inputs", ["a", "b"])
    fake_gemini()
    assert run(inputs, "--context", str(context_of(tmp_path, 10))).exit_code == 0
    changed = run(inputs, "--context", str(context_of(tmp_path, 11)))
    assert changed.exit_code == 2 and "--context changed" in changed.stderr


def varied_prompts(count: int) -> list[str]:
    """Prompts of 20 to 40 words: characters / 4 is not the fake server's count (words), so
    only the sample's measured ratio gets the estimate right."""
    rng = random.Random(count)
    return [
        " ".join(f"w{rng.randrange(10 ** rng.randrange(1, 6))}" for _ in range(rng.randrange(20, 41)))
        for _ in range(count)
    ]


def test_estimate_asks_nothing_counts_a_sample_and_lands_within_10_percent_of_the_runs_spend(
    tmp_path, fake_gemini, run
) -> None:
    inputs = write_prompts(tmp_path / "inputs", varied_prompts(10_000), per_file=1000)
    server = fake_gemini()
    estimated = run(inputs, "--estimate", "--system-instruction", "Answer in one word.", output_dir=tmp_path / "unused")
    assert estimated.exit_code == 0, estimated.stderr
    assert server.requests == [] and len(server.count_tokens_requests) <= 200  # 199 prompts and the prefix
    assert "10,000 prompts" in estimated.stdout and not (tmp_path / "unused").exists()

    few = write_prompts(tmp_path / "few", varied_prompts(1000), per_file=250)
    estimated = run(few, "--estimate", "--system-instruction", "Answer in one word.", output_dir=tmp_path / "unused")
    standard = float(re.search(r"standard +\$([0-9.]+)", estimated.stdout)[1])
    spent = run(few, "--system-instruction", "Answer in one word.", "--workers", "50")
    assert spent.exit_code == 0, spent.stderr
    assert abs(standard - spend_of(spent.stderr)) <= 0.10 * spend_of(spent.stderr)


def test_estimate_works_offline_and_names_each_price(tmp_path, run) -> None:
    inputs = write_prompts(tmp_path / "inputs", ["x" * 400] * 10)
    result = run(inputs, "--estimate", "--offline", "--rpm", "60")
    assert result.exit_code == 0, result.stderr
    assert "input tokens   1,000, the shared prefix 0" in result.stdout  # 400 characters / 4, ten times
    for row in ("standard", "flex", "batch", "with --cache", "time"):
        assert re.search(rf"^  {re.escape(row)} ", result.stdout, re.MULTILINE), row


def test_batch_jobs_name_the_cache_which_outlives_a_ctrl_c_until_the_rerun_collects_them(tmp_path) -> None:
    write_prompts(tmp_path / "inputs", [f"question {i}" for i in range(40)], per_file=20)
    context = context_of(tmp_path, 2000)
    flags = ("--batch", "--batch-size", "20", "--batch-poll-s", "0.01", "--context", str(context), "--cache")
    with FakeGemini(batch_polls=(1000, 0)) as server:  # the jobs stay pending until released below
        process = start_pipeline(tmp_path, server, *flags)
        rest = signal_once_logged(process, " submitted batches/", signal.SIGINT)
        assert process.returncode == 130
        [(_, name)] = [event for event in server.cache_events if event[0] == "create"]
        assert server.caches[name]["ttl_s"] == pipeline.BATCH_JOB_LIFE_S and "kept the context cache" in rest
        requests = [request for job in server.batches.values() for _, request in job.requests]
        assert requests and all(r["cachedContent"] == name and len(r["contents"]) == 1 for r in requests)

        server.batch_polls = (0, 1)  # now they run, and end
        rerun = start_pipeline(tmp_path, server, *flags)
        _, stderr = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, stderr
        assert [event for event in server.cache_events if event[0] != "update"] == [("create", name), ("delete", name)]
        assert server.caches == {} and sorted(server.answered.values()) == [1] * 40
        assert all(r.body["cachedContent"] == name for r in server.requests)  # answered inside the jobs, cache and all


def test_the_cache_is_renewed_while_the_run_lasts(tmp_path, fake_gemini, run, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "CACHE_RENEW_S", 0.05)
    inputs = write_prompts(tmp_path / "inputs", [f"question {i}" for i in range(20)], per_file=20)
    server = fake_gemini(latency_s=0.05)
    result = run(inputs, "--context", str(context_of(tmp_path, 2000)), "--cache", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    events = [event for event, _ in server.cache_events]
    assert events[0] == "create" and events[-1] == "delete" and events.count("update") >= 3  # a run of 1 s or more


def test_a_caches_storage_is_billed_by_the_token_hour() -> None:
    spend = pipeline.Spend((0.5, 3.0, 0.05, 1.0))
    spend.store(2_000_000, 1800)  # two million tokens for half an hour, at $1 per million an hour
    assert spend.spent_usd == 1.0


def test_max_cost_prices_the_cached_prefix_at_the_cached_price(tmp_path, fake_gemini, run) -> None:
    """Priced as if sent, the 2,000 cached tokens of each request would stop the run far short
    of its budget; priced as the answers say they were served, it stops close to it."""
    prompts = [f"question {i}" for i in range(1000)]
    inputs = write_prompts(tmp_path / "inputs", prompts, per_file=100)
    per_input, per_output, per_cached, _ = pipeline.PRICES[pipeline.MODEL]
    each = (
        2 * per_input + 2000 * per_cached + 3 * per_output
    ) / 1e6  # "question N", the cached context, "echo: question N"
    fake_gemini()
    result = run(
        inputs,
        "--context",
        str(context_of(tmp_path, 2000)),
        *("--cache", "--workers", "20", "--max-cost-usd"),
        f"{each * 500:.6f}",
    )
    assert result.exit_code == 1 and "budget" in result.stderr, result.stderr
    assert 450 <= len(result.records()) <= 500


def test_a_run_stopped_by_an_error_deletes_its_cache(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rows = [f'{{"id": "r{i}", "prompt": "question {i}"}}' for i in range(30)] + [
        '{"id": "r3", "prompt": "a second r3"}'
    ]
    (inputs / "rows.jsonl").write_text("\n".join(rows) + "\n")
    server = fake_gemini()
    result = run(inputs, "--context", str(context_of(tmp_path, 2000)), "--cache")
    assert result.exit_code == 2 and "named twice" in result.stderr
    assert [event for event, _ in server.cache_events] == ["create", "delete"] and server.caches == {}


def test_a_prefix_the_api_finds_too_small_to_cache_is_sent_first_instead(tmp_path, fake_gemini, run) -> None:
    """CACHE_MIN_TOKENS says 1,024 for this model; an API that wants 4,096 says so, and the run goes on."""
    inputs = write_prompts(tmp_path / "inputs", [f"question {i}" for i in range(5)], per_file=5)
    server = fake_gemini()
    server.cache_min_tokens = 4096
    result = run(inputs, "--context", str(context_of(tmp_path, 2000)), "--cache")
    assert result.exit_code == 0, result.stderr
    assert "too small to cache" in result.stderr and server.caches == {} and server.cache_events == []
    assert all(len(r.body["contents"]) == 2 and "cachedContent" not in r.body for r in server.requests)
