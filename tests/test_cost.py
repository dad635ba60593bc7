"""Quota and cost: --tpm paces input tokens, every billed token is counted and priced,
--max-cost stops a run, and what no retry fixes is neither sent again and again nor asked
again by a plain rerun."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter

import pytest

import pipeline
from conftest import sample_prompts, write_prompts
from fake_gemini import (
    PerWindowTokenQuota,
    answer,
    echo,
    error,
    prompt_tokens_of,
    safety_block,
    unknown_model,
)


def test_tpm_uses_the_token_quota_without_hitting_it(tmp_path, fake_gemini, run) -> None:
    """Each prompt is 12 long words: 30 tokens by characters / 4, 12 as the server
    counts them. The pipeline learns that from the answers and paces by what it learnt."""
    limit, window_s = 480, 1.0  # input tokens per second: 40 of these prompts, 28,800 tokens a minute
    server = fake_gemini(PerWindowTokenQuota(limit, window_s), latency_s=0.005)
    prompts = [" ".join(f"word{i:04d}x" for _ in range(12)) for i in range(200)]
    result = run(
        write_prompts(tmp_path / "inputs", prompts, per_file=20), "--tpm", str(limit * 60 / window_s), "--workers", "10"
    )
    assert result.exit_code == 0, result.stderr
    used: Counter[int] = Counter()  # input tokens answered per window
    for prompt, at in zip(server.answered_prompts, server.answered_at, strict=True):
        used[int(at // window_s)] += prompt_tokens_of(prompt)
    interior = range(min(used) + 1, max(used))
    achieved = sum(used[w] for w in interior) / (len(interior) * limit)
    refused = (len(server.requests) - len(prompts)) / len(server.requests)
    print(f"\n--tpm: {achieved:.1%} of the token limit, {refused:.1%} of requests got a 429")
    assert achieved >= 0.90
    assert refused <= 0.02


def thinking_echo(request):
    return answer(f"echo: {request.prompt}", request.prompt, thinking=7, cached=2)


async def test_thinking_and_cached_tokens_are_in_every_record_and_priced(tmp_path, fake_gemini) -> None:
    fake_gemini(thinking_echo)
    prompts = sample_prompts(6)
    settings = pipeline.Settings(input_dir=write_prompts(tmp_path / "inputs", prompts), output_dir=tmp_path / "outputs")
    settings.output_dir.mkdir()
    progress = pipeline.Progress()
    await pipeline.main(settings, progress)
    tally = progress.tally
    records = [json.loads(line) for path in settings.output_dir.glob("shard_*.jsonl") for line in path.open()]
    assert len(records) == 6
    assert all(r["usage"]["thinking_tokens"] == 7 and r["usage"]["cached_tokens"] == 2 for r in records)
    assert (tally.thinking_tokens, tally.cached_tokens) == (42, 12)
    per_input, per_output, per_cached, _ = pipeline.PRICES[pipeline.MODEL]  # the default model has a price
    expected = sum(
        (prompt_tokens_of(p) * per_input + 2 * per_cached + (len(f"echo: {p}".split()) + 7) * per_output) / 1e6
        for p in prompts
    )
    assert math.isclose(progress.spend.spent_usd, expected)
    summary = progress.summary()
    assert (
        "(12 cached, 29% of input)" in summary
        and "+ 42 thinking" in summary
        and f"{pipeline.dollars(expected)} estimated" in summary
    )


def test_a_model_without_a_price_says_so_once_and_shows_no_figure(tmp_path, fake_gemini, run) -> None:
    fake_gemini()
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(6)), "--model", "my-tuned-model")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("no price for my-tuned-model") == 1 and "estimated" not in result.stderr


def test_max_cost_stops_early_and_a_rerun_finishes_paying_nothing_twice(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    prompts = sample_prompts(1000)
    inputs = write_prompts(tmp_path / "inputs", prompts, per_file=100)
    per_input, per_output, _, _ = pipeline.PRICES[pipeline.MODEL]
    full = sum((prompt_tokens_of(p) * per_input + len(f"echo: {p}".split()) * per_output) / 1e6 for p in prompts)
    flags = ("--workers", "20", "--shard-size", "100")
    first = run(inputs, *flags, "--max-cost", f"{full / 2:.6f}")
    assert first.exit_code == 1, first.stderr
    stopped = re.search(r"stopped after (\d+) prompts: the budget of \$[\d.]+ is spent \(\$([\d.]+)\)", first.stderr)
    assert stopped, first.stderr
    answered = len(first.records())
    assert 0 < answered < 1000 and int(stopped[1]) == answered
    assert float(stopped[2]) <= full / 2 * 1.01  # the budget held, to the precision shown
    assert not (tmp_path / "outputs" / "failed.jsonl").exists()  # nothing marked failed
    second = run(inputs, *flags)
    assert second.exit_code == 0, second.stderr
    ids = Counter(r["id"] for r in second.records())
    assert len(ids) == 1000 and set(ids.values()) == {1}
    assert sorted(server.answered.values()) == [1] * 1000  # nothing paid twice


def test_an_unknown_model_stops_the_run_after_one_request_per_worker(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(unknown_model)
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(60)), "--model", "gemini-9-ultra", "--workers", "4")
    assert result.exit_code == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "gemini-9-ultra" in message and "Traceback" not in result.stderr
    assert len(server.requests) <= 4
    fake_gemini()  # the name corrected, the same folder: nothing was answered, so no other job is mixed in
    assert run(write_prompts(tmp_path / "inputs", sample_prompts(60)), "--workers", "4").exit_code == 0


def test_when_the_first_20_outcomes_are_one_permanent_error_the_run_stops(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(lambda request: error(400, "Invalid value at 'generation_config.top_k' (TYPE_INT32), \"x\""))
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(300)), "--workers", "5")
    assert result.exit_code == 2
    assert "the first 20 prompts all failed the same way" in result.stderr and "top_k" in result.stderr
    assert len(server.requests) <= 20 + 5


def test_a_plain_rerun_leaves_what_was_refused_for_good_and_retry_failed_asks_it(tmp_path, fake_gemini, run) -> None:
    blocked, overloaded = "What is two times 3?", "What is two times 4?"
    server = fake_gemini(
        lambda r: (
            safety_block() if r.prompt == blocked else error(503, "overloaded") if r.prompt == overloaded else echo(r)
        )
    )
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(8))
    first = run(inputs, "--max-attempts", "2", "--retry-base-s", "0.01", "--retry-max-s", "0.02")
    assert first.exit_code == 1
    failed = {f["prompt"]: f for f in map(json.loads, (tmp_path / "outputs" / "failed.jsonl").open())}
    assert (failed[blocked]["permanent"], failed[overloaded]["permanent"]) == (True, False)

    server = fake_gemini()
    second = run(inputs)
    assert [r.prompt for r in server.requests] == [overloaded]  # attempts spent on 503s may pass now: asked again
    assert second.exit_code == 1
    assert "1 prompt refused for good before was not asked again (--retry-failed asks them)" in second.stderr
    assert [json.loads(line)["prompt"] for line in (tmp_path / "outputs" / "failed.jsonl").open()] == [blocked]

    server = fake_gemini()
    third = run(inputs, "--retry-failed")
    assert third.exit_code == 0, third.stderr
    assert [r.prompt for r in server.requests] == [blocked]
    assert not (tmp_path / "outputs" / "failed.jsonl").exists()


def test_the_progress_display_shows_the_spend() -> None:
    progress = shown_run(pipeline.Spend((0.5, 3.0, 0.05, 1.0)))
    progress.spend.bill(type("Usage", (), {"prompt_token_count": 400_000, "candidates_token_count": 60_000})())
    assert progress.line().endswith(", $0.38") and progress.postfix() == "$0.38"
    assert "$" not in shown_run(pipeline.Spend(None)).line()  # no price, no figure


def shown_run(spend: pipeline.Spend) -> pipeline.Progress:
    """A Progress showing a run whose Gate has this Spend, its host reachable, never full."""
    progress = pipeline.Progress()
    outage = pipeline.Outage(lambda: None, "example.test", 60, asyncio.Event())
    progress.shown = pipeline.Shown(
        pipeline.Limits(pipeline.Gate(None, None, spend), outage, pipeline.Concurrency(1)),
        pipeline.Media(pipeline.FilesFolder(pipeline.Path()), 20),
        pipeline.Limit(None),
    )
    return progress


def bad_setting(request):
    violation = {"field": "generation_config.top_k", "description": 'Invalid value (TYPE_INT32), "x"'}
    return error(
        400,
        "Invalid value at 'generation_config.top_k'",
        {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation]},
    )


def test_a_setting_the_api_refuses_stops_the_run_at_once_unless_it_is_a_rows_own(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(bad_setting)
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(60)), "--workers", "4")
    assert result.exit_code == 2 and len(server.requests) <= 4
    assert "generation_config.top_k" in result.stderr.strip().splitlines()[-1]

    rows = tmp_path / "rows"
    rows.mkdir()
    lines = [{"prompt": "mine", "config": {"top_k": 3}}, *({"prompt": f"p{i}"} for i in range(4))]
    (rows / "r.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    server = fake_gemini(lambda r: bad_setting(r) if r.prompt == "mine" else echo(r))
    result = run(rows, output_dir=tmp_path / "rows_out")
    assert result.exit_code == 1  # only the row with settings of its own failed; the run went on
    assert len((tmp_path / "rows_out" / "failed.jsonl").read_text().splitlines()) == 1


def spent_of(stderr: str) -> float:
    """The estimated spend a run's summary line reports, in dollars."""
    return float(re.search(r"\$([\d.,]+) estimated", stderr)[1].replace(",", ""))


def test_a_flex_run_asks_flex_records_it_and_costs_half_of_standard(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(12))
    standard = run(inputs, output_dir=tmp_path / "standard")
    assert standard.exit_code == 0, standard.stderr
    assert all("serviceTier" not in request.body for request in server.requests)  # unset: the API's default
    assert all("service_tier" not in record["usage"] for record in standard.records())
    asked = len(server.requests)
    flex = run(inputs, "--service-tier", "flex", output_dir=tmp_path / "flex")
    assert flex.exit_code == 0, flex.stderr
    assert [request.body.get("serviceTier") for request in server.requests[asked:]] == ["flex"] * 12
    assert {record["usage"]["service_tier"] for record in flex.records()} == {"flex"} and len(flex.records()) == 12
    assert "served 12 flex" in flex.stderr
    assert math.isclose(
        spent_of(flex.stderr), spent_of(standard.stderr) / 2, rel_tol=0.01
    )  # the same tokens, half the price
    # The flex timeout is 15 minutes unless --timeout-s says otherwise: the SDK sends it as X-Server-Timeout.
    assert {request.server_timeout for request in server.requests[asked:]} == {"900"}
    assert {request.server_timeout for request in server.requests[:asked]} == {"60"}


def test_a_priority_request_served_at_standard_is_recorded_and_priced_as_standard(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    server.tier_served = lambda asked: "standard"  # priority may fall back, silently but for the header
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(6))
    plain = run(inputs, output_dir=tmp_path / "plain")
    priority = run(inputs, "--service-tier", "priority", "--timeout-s", "30", output_dir=tmp_path / "priority")
    assert priority.exit_code == 0, priority.stderr
    assert {record["usage"]["service_tier"] for record in priority.records()} == {"standard"}
    assert "served 6 standard" in priority.stderr
    assert math.isclose(spent_of(priority.stderr), spent_of(plain.stderr), rel_tol=0.01)
    assert {request.server_timeout for request in server.requests[-6:]} == {"30"}  # --timeout-s given: it wins


def test_service_tier_refuses_what_it_cannot_do_in_one_line(tmp_path, fake_gemini, run, capsys) -> None:
    fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(2))
    with pytest.raises(SystemExit) as refused:
        run(inputs, "--service-tier", "cheap")
    assert refused.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: argument --service-tier: must be one of standard, flex, priority, got 'cheap' (see --help)\n"
    )
    batch = run(inputs, "--service-tier", "flex", "--batch")
    assert (
        batch.exit_code == 2
        and batch.stderr.strip()
        == "error: --service-tier does not apply to --batch: the Batch API has a price of its own (half)"
    )


def test_offline_flex_answers_say_they_were_served_flex(tmp_path, run) -> None:
    result = run(
        write_prompts(tmp_path / "inputs", sample_prompts(3)),
        *("--offline", "--offline-latency-ms", "0", "--service-tier", "flex"),
    )
    assert result.exit_code == 0, result.stderr
    assert [record["usage"]["service_tier"] for record in result.records()] == ["flex"] * 3
