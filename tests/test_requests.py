"""Real requests: JSONL and CSV rows with their own ids and fields, system instructions and
generation settings on the wire, JSON answers checked against a schema, a job's settings
as part of its identity; interactively and with --batch, through the real SDK."""

from __future__ import annotations

import json
import re
from collections import Counter

from conftest import generation_of, jsonl, sample_prompts, write, write_prompts
from fake_gemini import Reply, Request, answer, echo

FAST = ("--batch-poll-s", "0.01")
SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative"]}, "confidence": {"type": "number"}},
    "required": ["label", "confidence"],
    "additionalProperties": False,
}


def labeller(request: Request) -> Reply:
    """A model that labels a review as JSON."""
    label = "positive" if "good" in request.prompt else "negative"
    return answer(json.dumps({"label": label, "confidence": 0.9}), request.prompt)


def camel(value):
    """JSON with every key in camelCase: the API's JSON takes field names in either spelling,
    and google-genai writes some parts one way, a user's Batch API file another."""
    if isinstance(value, dict):
        return {re.sub(r"_([a-z])", lambda m: m[1].upper(), k): camel(v) for k, v in value.items()}
    return [camel(v) for v in value] if isinstance(value, list) else value


def instruction_of(request: Request) -> str | None:
    instruction = request.body.get("systemInstruction")
    return "".join(p["text"] for p in instruction["parts"]) if instruction else None


# ------------------------------------------------------------------ inputs --
def test_jsonl_and_csv_rows_keep_their_ids_fields_and_multi_line_prompts(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write(
        tmp_path / "inputs",
        "reviews.jsonl",
        jsonl(
            {"id": "r1", "prompt": "First line\nsecond line", "label": "pos", "source": "web"},
            {"prompt": "no id here", "meta": {"n": 1}},
        ),
    )
    write(inputs, "more.csv", 'id,prompt,source\nc1,"a cell\nover two lines, with ""quotes""",shop\n\n,plain,mail\n')
    result = run(inputs)
    assert result.exit_code == 0, result.stderr
    records = {r["id"]: r for r in result.records()}
    assert set(records) == {"r1", "reviews.jsonl:2", "c1", "more.csv:5"}  # a CSV row's place is where it starts
    assert (
        records["r1"]["prompt"] == "First line\nsecond line"
        and records["r1"]["response"] == "echo: First line\nsecond line"
    )
    assert (records["r1"]["label"], records["r1"]["source"]) == ("pos", "web")
    assert records["reviews.jsonl:2"]["meta"] == {"n": 1}
    assert records["c1"]["prompt"] == 'a cell\nover two lines, with "quotes"' and records["c1"]["source"] == "shop"
    assert records["more.csv:5"]["source"] == "mail"
    assert sorted(server.answered.values()) == [1] * 4
    assert run(inputs).exit_code == 0 and len(server.requests) == 4  # a rerun knows them by their ids


def test_a_field_named_like_a_record_field_is_kept_with_a_prefix(tmp_path, fake_gemini, run) -> None:
    fake_gemini()
    inputs = write(
        tmp_path / "inputs", "eval.jsonl", jsonl({"id": "q1", "prompt": "2+2?", "response": "4", "usage": "x"})
    )
    [record] = run(inputs).records()
    assert record["response"] == "echo: 2+2?" and record["input_response"] == "4" and record["input_usage"] == "x"


def test_bad_rows_fail_with_their_place_and_are_never_sent(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write(
        tmp_path / "inputs",
        "rows.jsonl",
        '{"prompt": "fine"}\nnot json\n{"id": "x"}\n{"prompt": 7}\n[1]\n'
        '{"prompt": "p", "config": {"temprature": 0.5}}\n',
    )
    write(inputs, "rows.csv", 'prompt,id\n"fine too",k\n"never closed\n')
    result = run(inputs)
    assert result.exit_code == 1
    failures = {f["id"]: f["error"] for f in result.failures()}
    assert failures["rows.jsonl:2"].startswith("line is not JSON")
    assert failures["x"] == "no prompt (rows.jsonl:3)"
    assert failures["rows.jsonl:4"] == "prompt is not a string (rows.jsonl:4)"
    assert failures["rows.jsonl:5"] == "line is not a JSON object"
    assert failures["rows.jsonl:6"] == "its settings: temprature: Extra inputs are not permitted"
    assert failures["rows.csv:3"] == "a quoted cell is never closed"
    assert sorted(result.ids()) == ["k", "rows.jsonl:1"] and len(server.requests) == 2


def test_a_csv_without_a_prompt_column_stops_the_run(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    result = run(write(tmp_path / "inputs", "a.csv", "text,label\nhello,x\n"))
    assert result.exit_code == 2 and not server.requests
    assert (
        "a.csv, line 1: the header names no 'prompt' column (read as comma-separated: text, label)"
        in result.stderr.splitlines()[-1]
    )


def test_an_id_named_twice_is_an_input_error_naming_both_places(tmp_path, fake_gemini, run) -> None:
    fake_gemini()
    inputs = write(tmp_path / "inputs", "a.jsonl", jsonl({"id": "same", "prompt": "one"}))
    write(inputs, "b.csv", "id,prompt\nother,two\nsame,three\n")
    result = run(inputs)
    assert result.exit_code == 2
    assert "id 'same' is named twice in the inputs: a.jsonl:1 and b.csv:3" in result.stderr.splitlines()[-1]
    assert Counter(result.ids())["same"] <= 1  # never merged


def test_a_batch_api_file_runs_interactively_turns_parts_and_settings_as_they_are(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    picture = {"inline_data": {"mime_type": "image/png", "data": "iVBORw0KGgo="}}
    row = {
        "key": "chat-1",
        "request": {
            "contents": [
                {"role": "user", "parts": [{"text": "Hello"}]},
                {"role": "model", "parts": [{"text": "Hi! What shall I look at?"}]},
                {"role": "user", "parts": [{"text": "Describe this picture."}, picture]},
            ],
            "systemInstruction": {"parts": [{"text": "Answer in French."}]},
            "generationConfig": {"temperature": 0.3, "maxOutputTokens": 64},
            "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
        },
        "split": "test",
    }
    result = run(write(tmp_path / "inputs", "batch_input.jsonl", jsonl(row)))
    assert result.exit_code == 0, result.stderr
    [sent] = server.requests
    assert [c["role"] for c in sent.body["contents"]] == ["user", "model", "user"]
    assert camel(sent.body["contents"][2]["parts"][1]) == {
        "inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}
    }
    assert instruction_of(sent) == "Answer in French."
    assert generation_of(sent) == {"temperature": 0.3, "maxOutputTokens": 64}
    assert sent.body["safetySettings"] == [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    [record] = result.records()
    assert (record["id"], record["prompt"], record["split"]) == ("chat-1", "Describe this picture.", "test")


# ---------------------------------------------------------------- settings --
def test_run_settings_and_a_rows_own_arrive_on_the_wire(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    config = tmp_path / "generation.json"
    config.write_text(json.dumps({"top_p": 0.5, "seed": 7, "stop_sequences": ["END"]}))
    inputs = write(
        tmp_path / "inputs",
        "rows.jsonl",
        jsonl(
            {"id": "plain", "prompt": "p1"},
            {"id": "own", "prompt": "p2", "system_instruction": "Be terse.", "config": {"temperature": 1.5, "seed": 8}},
        ),
    )
    write(inputs, "lines.txt", "p3\n")
    flags = ("--system-instruction", "You label reviews.", "--temperature", "0.2", "--max-output-tokens", "50")
    result = run(inputs, *flags, "--generation-config", str(config))
    assert result.exit_code == 0, result.stderr
    sent = {r.prompt: r for r in server.requests}
    run_wide = {"temperature": 0.2, "maxOutputTokens": 50, "topP": 0.5, "seed": 7, "stopSequences": ["END"]}
    for prompt in ("p1", "p3"):
        assert instruction_of(sent[prompt]) == "You label reviews." and generation_of(sent[prompt]) == run_wide
    assert instruction_of(sent["p2"]) == "Be terse."
    assert generation_of(sent["p2"]) == {**run_wide, "temperature": 1.5, "seed": 8}


def test_a_misspelt_setting_is_refused_before_any_request(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    config = tmp_path / "generation.json"
    config.write_text(json.dumps({"temprature": 0.5}))
    result = run(inputs, "--generation-config", str(config))
    assert result.exit_code == 2 and not server.requests
    [line] = result.stderr.strip().splitlines()
    assert line == "error: generation settings: temprature: Extra inputs are not permitted"
    config.write_text(json.dumps({"thinking_config": {"thinking_budgett": 0}}))
    nested = run(inputs, "--generation-config", str(config))
    assert nested.exit_code == 2 and "thinkingConfig.thinking_budgett" in nested.stderr and not server.requests


def test_a_changed_model_or_setting_is_refused_on_the_same_folder(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(6))
    assert run(inputs, "--temperature", "0.2").exit_code == 0
    asked = len(server.requests)
    inputs_more = write_prompts(inputs, sample_prompts(9))
    changed = [
        (["--model", "gemini-2.5-pro", "--temperature", "0.2"], "--model"),
        ([], "--temperature"),
        (["--offline", "--temperature", "0.2"], "--offline"),
    ]
    for flags, named in changed:
        result = run(inputs_more, *flags)
        assert result.exit_code == 2 and len(server.requests) == asked
        assert named in result.stderr.splitlines()[-1] and "fresh --output-dir" in result.stderr
    assert run(inputs_more, "--temperature", "0.2").exit_code == 0 and len(server.requests) == 9


# ------------------------------------------------------- structured output --
def test_a_schema_with_answers_cut_short_fails_them_as_cut_short_and_a_larger_budget_finishes_the_job(
    tmp_path, fake_gemini, run
) -> None:
    """Issue 34: JSON cut at MAX_TOKENS is cut short (the cause), not "not JSON" (the symptom);
    a plain rerun leaves it (the same budget would cut it again), a larger budget asks it."""
    prompts = [f"review {i}: {'good' if i % 3 else 'bad'} product" for i in range(40)]

    def cut_short_a_quarter(request: Request) -> Reply:
        if request.attempt == 1 and int(request.prompt.split()[1].rstrip(":")) % 4 == 0:
            return answer('{"label": "posi', request.prompt, finish_reason="MAX_TOKENS")
        return labeller(request)

    server = fake_gemini(cut_short_a_quarter)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    inputs = write_prompts(tmp_path / "inputs", prompts, per_file=10)
    result = run(inputs, "--response-schema", str(schema), "--max-output-tokens", "8")
    assert result.exit_code == 1 and "10 cut short" in result.stderr
    failures = result.failures()
    assert len(result.records()) == 30 and len(failures) == 10 and len(server.requests) == 40
    assert all(
        f["cut_short"]
        and not f["permanent"]
        and f["response"] == '{"label": "posi'
        and f["budget"] == {"max_output_tokens": 8}
        for f in failures
    )
    assert all(
        f["error"].startswith(
            "cut short at max_output_tokens 8: thinking took 0, the answer 2; raise --max-output-tokens"
        )
        for f in failures
    )
    again = run(inputs, "--response-schema", str(schema), "--max-output-tokens", "8")
    assert (
        again.exit_code == 1
        and len(server.requests) == 40
        and "10 prompts cut short before at this budget were not asked again" in again.stderr
    )
    larger = run(inputs, "--response-schema", str(schema), "--max-output-tokens", "100")
    assert larger.exit_code == 0, larger.stderr
    records = larger.records()
    assert len(records) == 40 and not larger.failures() and len(server.requests) == 50
    for record in records:
        assert record["parsed"] == {
            "label": "positive" if "good" in record["prompt"] else "negative",
            "confidence": 0.9,
        }
    assert sorted(r["budget"]["max_output_tokens"] for r in records) == [8] * 30 + [100] * 10
    body = server.requests[0].body["generationConfig"]
    assert body["responseMimeType"] == "application/json" and body["responseJsonSchema"] == SCHEMA


def test_an_answer_that_never_fits_the_schema_fails_with_the_answer_kept(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(lambda r: answer(json.dumps({"label": "neutral", "confidence": 1}), r.prompt))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    result = run(write_prompts(tmp_path / "inputs", ["meh"]), "--response-schema", str(schema), "--max-attempts", "2")
    assert result.exit_code == 1 and len(server.requests) == 2
    [failure] = result.failures()
    assert (
        failure["error"].startswith("answer does not match the schema: 'neutral' is not one of")
        and failure["attempts"] == 2
    )
    assert json.loads(failure["response"]) == {"label": "neutral", "confidence": 1}


def test_a_rows_own_schema_applies_to_that_row(tmp_path, fake_gemini, run) -> None:
    fake_gemini(lambda r: labeller(r) if r.body.get("generationConfig", {}).get("responseJsonSchema") else echo(r))
    row = {"id": "structured", "prompt": "good stuff", "config": {"response_json_schema": SCHEMA}}
    records = {
        r["id"]: r
        for r in run(write(tmp_path / "inputs", "a.jsonl", jsonl(row, {"id": "free", "prompt": "hi"}))).records()
    }
    assert records["structured"]["parsed"] == {"label": "positive", "confidence": 0.9}
    assert "parsed" not in records["free"]


# ------------------------------------------------------------------- batch --
def test_batch_mode_sends_the_same_requests_and_writes_the_same_records(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(labeller)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    inputs = write(
        tmp_path / "inputs",
        "rows.jsonl",
        jsonl(
            *({"id": f"r{i}", "prompt": f"a {'good' if i % 2 else 'bad'} one", "n": i} for i in range(6)),
            {
                "key": "b1",
                "request": {
                    "contents": [
                        {
                            "role": "user",
                            "parts": [
                                {"text": "good?"},
                                {"file_data": {"file_uri": "gs://x/y.png", "mime_type": "image/png"}},
                            ],
                        }
                    ]
                },
            },
            {"id": "hot", "prompt": "good, hot", "config": {"temperature": 1.9}},
        ),
    )
    flags = ("--system-instruction", "Label it.", "--response-schema", str(schema))
    interactive = run(inputs, *flags, output_dir=tmp_path / "interactive")
    sent_interactively = {r.prompt: r.body for r in server.requests}
    server.requests.clear()
    server.batch_shuffle = True
    batch = run(inputs, *flags, "--batch", *FAST, output_dir=tmp_path / "batch")
    assert interactive.exit_code == batch.exit_code == 0, batch.stderr
    assert {r.prompt: camel(r.body) for r in server.requests} == camel(sent_interactively)  # the very same requests

    def comparable(records: list[dict]) -> dict:
        return {r["id"]: {k: v for k, v in r.items() if k != "attempts"} for r in records}

    assert comparable(batch.records()) == comparable(interactive.records())
    assert {r["id"]: r["parsed"]["label"] for r in batch.records()}["hot"] == "positive"


# ----------------------------------------------------------------- offline --
def test_offline_takes_the_same_inputs_and_settings(tmp_path, run) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["answer"]}))
    inputs = write(tmp_path / "inputs", "a.jsonl", jsonl({"id": "x", "prompt": "What is two times 21?", "tag": 1}))
    write(inputs, "b.csv", "prompt\nhello\n")
    result = run(
        inputs, "--offline", "--offline-latency-ms", "0", "--temperature", "0.1", "--response-schema", str(schema)
    )
    assert result.exit_code == 0, result.stderr
    records = {r["id"]: r for r in result.records()}
    assert records["x"]["parsed"] == {"answer": "Two times 21 is 42."} and records["x"]["tag"] == 1
    assert records["b.csv:2"]["parsed"] == {"answer": "You said: hello"}
