"""Issue 34: answers cut short by thinking said plainly and asked again with a larger
budget; refusals every prompt meets stopped early; a job tried on a few rows first.
The fake thinks as Gemini 2.5 and 3 do (fake_gemini.thinker): thoughts first, out of
maxOutputTokens, and no text part once they have taken all of it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import pipeline
from conftest import ROOT, run_subprocess, write_prompts
from fake_gemini import answer, thinker

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


def even_ones_think(tokens: int):
    """The issue's server: even-numbered prompts think `tokens`, odd ones not at all."""
    return thinker(lambda request: tokens if int(request.prompt.split()[-1]) % 2 == 0 else 0)


def numbered(count: int) -> list[str]:
    return [f"two times {i}" for i in range(count)]


def test_answers_cut_short_by_thinking_fail_with_the_figures_and_a_larger_budget_finishes_the_job(
    tmp_path, fake_gemini, run
) -> None:
    server = fake_gemini(even_ones_think(1000))
    inputs = write_prompts(tmp_path / "inputs", numbered(40), per_file=10)
    cut = run(inputs, "--max-output-tokens", "500")
    assert cut.exit_code == 1, cut.stderr
    assert sorted(cut.ids()) == sorted(f"shard_{i // 10}.txt:{i % 10 + 1}" for i in range(1, 40, 2))
    failures = cut.failures()
    assert len(failures) == 20 and all(f["cut_short"] and not f["permanent"] and "response" not in f for f in failures)
    assert {f["error"] for f in failures} == {
        "cut short at max_output_tokens 500: thinking took 500, the answer 0; raise --max-output-tokens or lower --thinking-budget (or --thinking-level)"
    }
    assert all(f["usage"]["thinking_tokens"] == 500 and f["budget"] == {"max_output_tokens": 500} for f in failures)
    summary = cut.stderr.splitlines()[-2]
    assert "20 answered, 20 failed, 20 cut short" in summary and "+ 10000 thinking" in summary  # billed, so counted
    assert "20 of the first" in cut.stderr and "thinking averaged 500 of 500 tokens" in cut.stderr  # said early, once
    assert cut.stderr.count("thinking averaged") == 1
    again = run(inputs, "--max-output-tokens", "500")  # the same budget would cut them again
    assert again.exit_code == 1 and len(server.requests) == 40
    assert "20 prompts cut short before at this budget were not asked again" in again.stderr
    larger = run(inputs, "--max-output-tokens", "2000")
    assert larger.exit_code == 0, larger.stderr
    assert len(server.requests) == 60 and {r.attempt for r in server.requests[40:]} == {
        2
    }  # only the cut ones, once each
    assert not larger.failures() and not (larger.output_dir / pipeline.FAILED_FILE).exists()
    ids = larger.ids()
    assert len(ids) == len(set(ids)) == 40
    job = json.loads((larger.output_dir / pipeline.JOB_FILE).read_text())
    assert job["budgets"] == [{"max_output_tokens": 500}, {"max_output_tokens": 2000}]


def test_accept_cut_short_writes_them_as_answers_and_counts_them(tmp_path, fake_gemini, run) -> None:
    fake_gemini(even_ones_think(1000))
    result = run(
        write_prompts(tmp_path / "inputs", numbered(40), per_file=10),
        "--max-output-tokens",
        "1003",
        "--accept-cut-short",
    )
    assert result.exit_code == 0, result.stderr
    records = result.records()
    cut = [r for r in records if r["finish_reason"] == "MAX_TOKENS"]
    assert len(records) == 40 and len(cut) == 20 and not result.failures()
    assert {r["response"] for r in cut} == {"echo: two times "}  # thoughts took 1,000 of 1,003: three words were left
    assert "20 cut short" in result.stderr.splitlines()[-2]


@pytest.mark.parametrize(
    ("flags", "sent", "recorded"),
    [
        (["--thinking-budget", "0"], {"thinkingBudget": 0}, {"thinking_budget": 0}),
        (["--thinking-level", "low"], {"thinkingLevel": "LOW"}, {"thinking_level": "low"}),
        (
            ["--thinking-budget", "-1", "--max-output-tokens", "900"],
            {"thinkingBudget": -1},
            {"max_output_tokens": 900, "thinking_budget": -1},
        ),
    ],
)
def test_the_thinking_settings_reach_thinking_config_and_each_record(
    tmp_path, fake_gemini, run, flags, sent, recorded
) -> None:
    server = fake_gemini()
    result = run(write_prompts(tmp_path / "inputs", numbered(3)), *flags)
    assert result.exit_code == 0, result.stderr
    as_sent = [
        {re.sub(r"_(.)", lambda m: m[1].upper(), k): v for k, v in r.body["generationConfig"]["thinkingConfig"].items()}
        for r in server.requests
    ]
    assert as_sent == [sent] * 3  # google-genai sends them in snake_case, which the API reads as it reads camelCase
    assert [r["budget"] for r in result.records()] == [recorded] * 3


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--thinking-level", "lots"], "--thinking-level: must be one of minimal, low, medium, high, got 'lots'"),
        (["--thinking-budget", "-2"], "--thinking-budget: must be at least -1, got -2"),
        (["--thinking-budget", "100", "--thinking-level", "low"], "--thinking-budget and --thinking-level: set one"),
    ],
)
def test_a_bad_thinking_setting_is_one_line_naming_the_flag(tmp_path, fake_gemini, capsys, flags, says) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", numbered(3))
    try:
        code = pipeline.cli(["--input-dir", str(inputs), "--output-dir", str(tmp_path / "outputs"), *flags])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2 and not server.requests and not (tmp_path / "outputs").exists()
    [line] = capsys.readouterr().err.strip().splitlines()
    assert says in line


@pytest.mark.parametrize(
    "changed",
    [
        ["--model", "gemini-2.5-flash"],
        ["--system-instruction", "be brief"],
        ["--response-schema", "schema.json"],
        ["--context", "context.txt"],
    ],
)
def test_a_changed_model_instruction_schema_or_context_still_stops_the_rerun(
    tmp_path, fake_gemini, run, changed
) -> None:
    fake_gemini(lambda request: answer(json.dumps({"label": "x"}), request.prompt))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "context.txt").write_text("a codebook")
    inputs = write_prompts(tmp_path / "inputs", numbered(3))
    assert run(inputs, "--max-output-tokens", "100").exit_code == 0
    flags = [changed[0], str(tmp_path / changed[1]) if changed[1].endswith((".json", ".txt")) else changed[1]]
    refused = run(inputs, "--max-output-tokens", "200", *flags)
    assert refused.exit_code == 2 and "holds answers asked with other settings" in refused.stderr
    assert run(inputs, "--max-output-tokens", "200").exit_code == 0  # the budget alone: the job goes on


def test_answers_that_are_never_json_stop_the_run_after_about_twenty(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(lambda request: answer("Sure! Here is the label: positive", request.prompt))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    rows = "".join(json.dumps({"id": f"r{i}", "prompt": f"label review {i}"}) + "\n" for i in range(200))
    (inputs := tmp_path / "inputs").mkdir()
    (inputs / "rows.jsonl").write_text(rows)
    result = run(inputs, "--response-schema", str(tmp_path / "schema.json"))
    assert result.exit_code == 2, result.stderr
    assert len(server.requests) <= 20 + 5  # the opening, and what was in flight at --workers 5
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the first 20 answers were all not the JSON asked for (the first: answer is not JSON")
    kept = result.failures()
    assert len(kept) >= 1 and all(f["response"] == "Sure! Here is the label: positive" for f in kept)  # paid for: kept
    assert "tokens 0 in" not in result.stderr  # the failures' tokens are counted


def test_a_not_json_answer_is_not_asked_again_at_temperature_0(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(lambda request: answer("plain words", request.prompt))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    result = run(
        write_prompts(tmp_path / "inputs", numbered(3)),
        "--response-schema",
        str(tmp_path / "schema.json"),
        "--temperature",
        "0",
    )
    assert result.exit_code == 1 and len(server.requests) == 3  # the same answer would come again
    hot = run(
        write_prompts(tmp_path / "hot", numbered(2)),
        "--response-schema",
        str(tmp_path / "schema.json"),
        output_dir=tmp_path / "hot_out",
    )
    assert hot.exit_code == 1 and len(server.requests) == 3 + 2 * pipeline.MAX_ATTEMPTS  # sampling: another try may fit


def test_all_cut_short_stops_the_run_after_about_twenty(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(thinker(lambda request: 1000))
    result = run(write_prompts(tmp_path / "inputs", numbered(200), per_file=50), "--max-output-tokens", "300")
    assert result.exit_code == 2 and len(server.requests) <= 25
    assert (
        "error: the first 20 answers were all cut short (the first: cut short at max_output_tokens 300: thinking took 300"
        in result.stderr
    )


def always_failing(prompt: str, response: str) -> dict:
    raise KeyError("score")


async def test_postprocess_failing_on_every_answer_stops_the_run_with_the_answers_kept(tmp_path, fake_gemini) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", numbered(200), per_file=50)
    settings = pipeline.Settings(
        input_dir=inputs, output_dir=tmp_path / "outputs", postprocess=always_failing, postprocess_workers=0
    )
    with pytest.raises(
        pipeline.PipelineError,
        match=r"^postprocess\(\) failed on the first 20 answers \(the first: postprocess failed: KeyError: 'score'\)",
    ):
        await pipeline.main(settings, pipeline.Progress())
    kept = [json.loads(line) for line in (tmp_path / "outputs" / pipeline.FAILED_FILE).open()]
    assert len(server.requests) < 100 and len(kept) >= 20
    assert all(f["response"].startswith("echo: two times") for f in kept)


def test_limit_asks_the_first_prompts_and_the_same_command_without_it_the_rest(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", numbered(200), per_file=50)
    tried = run(inputs, "--limit", "10")
    assert tried.exit_code == 0, tried.stderr
    assert sorted(tried.ids()) == sorted(f"shard_0.txt:{i}" for i in range(1, 11)) and len(server.requests) == 10
    assert "the same command without --limit asks the rest" in tried.stderr
    rest = run(inputs)
    assert rest.exit_code == 0 and len(server.requests) == 200
    assert sorted(r.prompt for r in server.requests) == sorted(numbered(200))  # none asked twice
    assert len(set(rest.ids())) == len(rest.ids()) == 200


def test_batch_results_cut_short_are_no_answers(tmp_path, fake_gemini, run) -> None:
    fake_gemini(even_ones_think(1000))
    result = run(
        write_prompts(tmp_path / "inputs", numbered(10), per_file=10),
        *("--max-output-tokens", "500", "--batch", "--batch-poll-s", "0.01"),
    )
    assert result.exit_code == 1, result.stderr
    failures = result.failures()
    assert len(result.records()) == 5 and len(failures) == 5 and all(f["cut_short"] for f in failures)
    assert all(f["error"].startswith("cut short at max_output_tokens 500: thinking took 500") for f in failures)


def test_estimate_counts_thinking_in_the_output(tmp_path, fake_gemini, run) -> None:
    fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", numbered(10))
    plain = run(inputs, "--estimate")
    thinking = run(inputs, "--estimate", "--thinking-budget", "100")
    bounded = run(inputs, "--estimate", "--max-output-tokens", "50", "--limit", "4")
    assert "thinking not counted" in plain.stdout
    assert "plus 100 of thinking each (--thinking-budget)" in thinking.stdout
    assert "50 each at most, thinking included" in bounded.stdout and "4 prompts" in bounded.stdout
    output = {
        name: int(
            next(line for line in r.stdout.splitlines() if "output tokens" in line)
            .split()[2]
            .rstrip(":")
            .replace(",", "")
        )
        for name, r in (("plain", plain), ("thinking", thinking), ("bounded", bounded))
    }
    assert output["thinking"] == output["plain"] + 10 * 100 and output["bounded"] == 4 * 50


def test_a_request_asked_with_a_budget_in_its_row_records_it(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(thinker(lambda request: 40))
    rows = json.dumps({"id": "own", "prompt": "two times 1", "config": {"max_output_tokens": 30}}) + "\n"
    (inputs := tmp_path / "inputs").mkdir()
    (inputs / "rows.jsonl").write_text(rows)
    result = run(inputs)
    assert result.exit_code == 1 and server.requests[0].body["generationConfig"]["maxOutputTokens"] == 30
    [failure] = result.failures()
    assert failure["budget"] == {"max_output_tokens": 30} and failure["cut_short"]


def test_the_summary_counts_the_tokens_of_every_billed_reply(tmp_path, fake_gemini, run) -> None:
    """A reply asked again (not the JSON asked for) was billed too: the token line says so, as the spend does."""
    fake_gemini(
        lambda request: (
            answer("not json at all", request.prompt)
            if request.attempt == 1
            else answer(json.dumps({"label": "x"}), request.prompt)
        )
    )
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    result = run(write_prompts(tmp_path / "inputs", numbered(4)), "--response-schema", str(tmp_path / "schema.json"))
    assert result.exit_code == 0, result.stderr
    assert (
        "/ 24 out" in result.stderr
    )  # 4 x "not json at all" (4 words, as the fake counts) and 4 x '{"label": "x"}' (2)


def test_the_readme_labelling_example_runs_against_the_fake_on_the_command_line(tmp_path) -> None:
    """`python tests/fake_gemini.py` as the README starts it: JSON of the schema asked for,
    503s on request (retried), any key."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_gemini.py"), "--port", "0", "--unavailable", "0.3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        base_url = server.stdout.readline().split()[3]
        (tmp_path / "schema.json").write_text(
            '{"type": "object", "properties": {"label": {"enum": ["positive", "negative", "mixed"]}}, "required": ["label"]}'
        )
        (reviews := tmp_path / "reviews").mkdir()
        (reviews / "reviews.jsonl").write_text(
            "".join(json.dumps({"id": f"r{i}", "prompt": f"review {i}"}) + "\n" for i in range(20))
        )
        result = run_subprocess(
            [
                "--input-dir",
                "reviews",
                "--output-dir",
                "labels",
                "--system-instruction",
                "Label the sentiment of this review.",
                "--response-schema",
                "schema.json",
                "--retry-base-s",
                "0.01",
            ],
            tmp_path,
            env={"GOOGLE_GEMINI_BASE_URL": base_url, "GEMINI_API_KEY": "any string"},
        )
    finally:
        server.terminate()
        server.communicate(timeout=10)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for path in sorted((tmp_path / "labels").glob("shard_*.jsonl")) for line in path.open()]
    assert len(records) == 20 and {r["parsed"]["label"] for r in records} == {"positive"}
    assert " 0 retries" not in result.stderr  # the 503s were retried
