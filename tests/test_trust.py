"""Trust and hardening: the README's promises under hostile input and faults. No stage's
death hangs the run, no value in a row can kill the writer after its answer is paid, CSV is
read as the csv module reads it, ids are unique across every kind, a journaled answer is
trusted only for the request it answered, and the key never shows, not even in part; and
what a hostile user or a misbehaving server does: two runs on one folder, odd file names,
odd error bodies, files the pipeline did not write, nan flags, binary inputs, huge lines,
a full disk, a redirect, many workers and Ctrl-C."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline
from conftest import (
    API_KEY,
    ROOT,
    fail_first,
    fast_retries,
    generation_of,
    jsonl,
    sample_prompts,
    signal_once_logged,
    stage_run,
    start_pipeline,
    wait_for_writes,
    write,
    write_prompts,
)
from fake_gemini import FakeGemini, Reply, answer, echo, error, rate_limited, raw_error, safety_block


def shard_on_a_full_disk(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Writes to shard `name` fail with ENOSPC, as on a disk that filled up."""
    real_open = os.open

    def open_(path, flags, mode=0o777, **kwargs):
        if Path(path).name == name:
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def odd_prompts_fail(request) -> Reply:
    """503 for every prompt whose number is odd, until the run ends: half the workers back off."""
    return error(503, "overloaded") if int(request.prompt.split()[-1][:-1]) % 2 else echo(request)


def written_ids(output_dir: Path) -> list[str]:
    """Every id in the shards and failed.jsonl, as often as it stands there."""
    files = [*output_dir.glob("shard_*.jsonl"), output_dir / "failed.jsonl"]
    return [json.loads(line)["id"] for path in files if path.exists() for line in path.read_text().splitlines()]


def every_file_text(*folders: Path) -> str:
    return "".join(p.read_text(errors="replace") for folder in folders for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- shutdown --
@pytest.mark.timeout(40)
def test_a_dead_writer_ends_the_run_while_generators_sleep_in_a_back_off(
    tmp_path, fake_gemini, run, monkeypatch
) -> None:
    server = fake_gemini(odd_prompts_fail)
    shard_on_a_full_disk(monkeypatch, "shard_00002.jsonl")
    started = time.monotonic()
    result = run(
        write_prompts(tmp_path / "inputs", sample_prompts(400), per_file=100),
        *("--workers", "50", "--retry-base-s", "1", "--shard-size", "10", "--postprocess-workers", "0"),
    )
    elapsed = time.monotonic() - started
    assert result.exit_code == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write to") and "No space left on device" in last
    assert elapsed < 20, elapsed  # loose: it ends in about a second; before the fix, never
    assert server.requests


@pytest.mark.timeout(40)
def test_a_signal_during_that_shutdown_still_prints_the_stages_error_first(
    tmp_path, fake_gemini, run, monkeypatch
) -> None:
    fake_gemini(odd_prompts_fail)
    shard_on_a_full_disk(monkeypatch, "shard_00001.jsonl")
    real_shut_down = pipeline.shut_down

    async def signalled_shut_down(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the run is stopping for the writer's error
        await asyncio.sleep(5)
        await real_shut_down(*args)

    monkeypatch.setattr(pipeline, "shut_down", signalled_shut_down)
    result = run(
        write_prompts(tmp_path / "inputs", sample_prompts(400), per_file=100),
        *("--workers", "50", "--shard-size", "10", "--postprocess-workers", "0", "--retry-base-s", "1"),
    )
    assert result.exit_code == 143
    lines = result.stderr.strip().splitlines()
    assert "No space left on device" in lines[-2] and lines[-1].startswith("interrupted:")


@pytest.mark.timeout(40)
def test_a_dead_reader_ends_the_run_within_the_grace_while_requests_hang(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(latency_s=30)  # every request hangs
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(20), per_file=20)
    write(inputs, "a.jsonl", jsonl({"id": "r1", "prompt": "p1"}, {"id": "r1", "prompt": "p2"}))  # read first: a clash
    started = time.monotonic()
    result = run(inputs, "--workers", "10")
    elapsed = time.monotonic() - started
    assert result.exit_code == 2 and "'r1' is named twice" in result.stderr.strip().splitlines()[-1]
    assert elapsed < 10, elapsed  # the 1.5 s grace, not the 30 s requests (loose for a busy machine)
    assert server.requests and not result.records()


# -------------------------------------------------- odd values in every field --
ODD_VALUES = {  # as they stand in a JSONL line: each decodes to something JSON Lines cannot carry back out
    "lone surrogate": '"bad \\udc80 field"',
    "NaN": "NaN",
    "Infinity": "-Infinity",
    "a float out of range": "1e999",
    "an integer of 5,000 digits": "9" * 5000,
    "nesting 2,000 deep": "[" * 2000 + "]" * 2000,
    "nesting 100 deep": "[" * 100 + "]" * 100,
}
FIELDS = ["prompt", "id", "system_instruction", "config", "note", "nested", "a field's name"]


def odd_line(field_name: str, value: str) -> str:
    row = {"id": "x250", "prompt": "What is two times 250?", "note": "plain"}
    if field_name == "nested":
        return json.dumps(row)[:-1] + f', "deep": {{"a": [1, {{"b": {value}}}]}}}}'
    if field_name == "a field's name":
        return json.dumps(row)[:-1] + f', "bad \\udc80 name": {value}}}'
    if field_name == "config":
        return json.dumps(row)[:-1] + f', "config": {{"temperature": {value}}}}}'
    if field_name in row:
        return json.dumps({k: v for k, v in row.items() if k != field_name})[:-1] + f', "{field_name}": {value}}}'
    return json.dumps(row)[:-1] + f', "{field_name}": {value}}}'


def test_an_odd_value_in_any_field_fails_its_row_alone_before_it_is_sent(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    odd = [odd_line(field_name, value) for field_name in FIELDS for value in ODD_VALUES.values()]  # 49 rows
    good = [json.dumps({"id": f"r{i}", "prompt": f"What is two times {i}?"}) for i in range(3)]
    inputs = write(tmp_path / "inputs", "a.jsonl", "\n".join([good[0], *odd, *good[1:]]) + "\n")
    places = {f"a.jsonl:{n}" for n in range(2, 2 + len(odd))}
    first = run(inputs, "--postprocess-workers", "0")
    assert "internal error" not in first.stderr and "Traceback" not in first.stderr, first.stderr
    assert first.exit_code == 2 and "'x250' is named twice" in first.stderr  # every odd row that could name x250 did
    assert sorted(server.answered) == ["What is two times 0?"]  # the odd rows were never sent
    inputs = write(
        tmp_path / "inputs",
        "a.jsonl",
        "\n".join([good[0], *(line.replace('"x250"', f'"x{n}"') for n, line in enumerate(odd)), *good[1:]]) + "\n",
    )
    for _ in range(2):  # and a rerun pays nothing again, writes nothing twice
        result = run(inputs, "--postprocess-workers", "0", output_dir=tmp_path / "again")
        assert result.exit_code == 1, result.stderr
        failures = result.failures()
        assert len(failures) == len(odd) and all(f["permanent"] and f["attempts"] == 0 for f in failures)
        assert all(f["id"] in places or f["error"].endswith(f"(a.jsonl:{int(f['id'][1:]) + 2})") for f in failures)
        ids = written_ids(result.output_dir)
        assert len(ids) == len(set(ids)) == len(odd) + 3
    assert sorted(server.answered.values()) == [1, 1, 2]  # r1, r2 once; r0 once in each folder
    for line in (result.output_dir / "shard_00000.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a shard"))


def test_the_lone_surrogate_row_of_the_report_names_the_field_and_is_never_paid(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    line = '{"id":"x250","prompt":"What is two times 250?","note":"bad \\udc80 field"}'
    inputs = write(tmp_path / "inputs", "a.jsonl", jsonl({"id": "x1", "prompt": "What is two times 1?"}) + line + "\n")
    for _ in range(3):
        result = run(inputs)
        assert result.exit_code == 1 and "internal error" not in result.stderr
    [failure] = result.failures()
    assert failure["id"] == "x250" and "note holds a lone surrogate" in failure["error"]
    assert len(server.requests) == 1  # x1, once, over three runs


def test_control_characters_and_unicode_in_every_field_are_answered_and_written_as_sent(
    tmp_path, fake_gemini, run
) -> None:
    server = fake_gemini()
    odd = "tab\t nul\x00 bell\x07 line\u2028sep \U0001f600 e\u0301 \ufeff"
    inputs = write(
        tmp_path / "inputs",
        "a.jsonl",
        jsonl({"id": odd, "prompt": f"What is {odd}?", "note": odd, "deep": [[{odd: odd}]]}),
    )
    result = run(inputs)
    assert result.exit_code == 0, result.stderr
    [record] = result.records()
    assert (record["id"], record["note"], record["deep"]) == (odd, odd, [[{odd: odd}]])
    assert server.requests[0].prompt == f"What is {odd}?"


def test_an_answer_with_a_lone_surrogate_from_the_server_is_written_not_fatal(tmp_path, fake_gemini, run) -> None:
    body = answer("ok").body
    body["candidates"][0]["content"]["parts"][0]["text"] = "half \udc80 a pair"
    body["modelVersion"] = "model-\ud800"
    server = fake_gemini(lambda request: Reply(200, body))
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(3)))
    assert result.exit_code == 0, result.stderr
    assert {r["response"] for r in result.records()} == {"half ? a pair"} and len(server.requests) == 3


def test_a_json_answer_with_nan_or_too_deep_is_not_as_asked_and_the_run_goes_on(tmp_path, fake_gemini, run) -> None:
    answers = iter(["NaN", "[" * 100 + "]" * 100, '{"answer": 1e999}', '{"answer": "fine"}'] * 3)
    server = fake_gemini(lambda request: answer(next(answers)))
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    result = run(
        write_prompts(tmp_path / "inputs", sample_prompts(3)),
        "--response-schema",
        str(schema),
        *("--max-attempts", "4", "--workers", "1"),
    )
    assert result.exit_code == 0, result.failures()
    assert [r["parsed"] for r in result.records()] == [{"answer": "fine"}] * 3 and len(server.requests) == 12


# --------------------------------------------------------------------- CSV --
def test_a_quote_inside_an_unquoted_cell_is_a_character_and_the_rows_after_it_are_rows(
    tmp_path, fake_gemini, run
) -> None:
    server = fake_gemini()
    rows = "".join(
        f"r{i},What is two times {i}?\n" for i in range(1, 5_001)
    )  # 40,000 and the CPU: tests/benchmark.py --only csv
    inputs = write(tmp_path / "inputs", "b.csv", 'id,prompt\nr0,The 5" screen\n' + rows)
    result = run(inputs, "--offline", "--offline-latency-ms", "0", "--shard-size", "5000", "--postprocess-workers", "0")
    assert result.exit_code == 0, result.stderr
    records = result.records()
    assert len({r["id"] for r in records}) == len(records) == 5_001 and not server.requests
    assert records[0]["prompt"] == 'The 5" screen' and records[-1]["id"] == "r5000"


async def test_csv_is_read_as_excel_writes_it_line_ends_long_cells_and_broken_rows(tmp_path) -> None:
    long_cell = "x" * 300_000  # the csv module's own limit is 131,072
    multi_line = "\n".join(f'line {i} of a long cell, with a quote "" and a comma,' for i in range(2000))  # 80 kB
    data = (
        'id,prompt\r\nr0,The 5" screen\rr1,"' + multi_line + '"\r\n'
        "r2,bare CR line\rr3,"
        + long_cell
        + '\n\nr4,x\x00y\nr5,bad \xff\xfe\nr6,"ab"cd\n,no id\nr7,"never closed\nr8,z\n'
    )
    (tmp_path / "a.csv").write_bytes(data.encode("utf-8", "surrogateescape").replace("\xff\xfe".encode(), b"\xff\xfe"))
    prompts = [p async for run in pipeline.read_prompts(tmp_path / "a.csv", pipeline.PromptMaker({})) for p in run]
    r1_ends = 2 + 2000  # the header, r0 (its bare CR a line end), then r1's 2,000 lines
    assert [(p.id, p.error is None) for p in prompts] == [
        ("r0", True),
        ("r1", True),
        ("r2", True),
        ("r3", True),
        (f"a.csv:{r1_ends + 4}", False),
        (f"a.csv:{r1_ends + 5}", False),
        ("r6", True),
        (f"a.csv:{r1_ends + 7}", True),
        (f"a.csv:{r1_ends + 8}", False),
    ]
    assert prompts[0].text == 'The 5" screen' and prompts[1].text == multi_line.replace('""', '"')
    assert prompts[3].text == long_cell and prompts[6].text == "abcd" and prompts[7].text == "no id"
    assert "NUL" in prompts[4].error and "UTF-8" in prompts[5].error and "never closed" in prompts[8].error
    assert await pipeline.count_rows(tmp_path / "a.csv") == 9


async def test_tsv_files_are_read_tab_separated(tmp_path) -> None:
    (tmp_path / "a.tsv").write_text("id\tprompt\tnote\nt1\thello, world\ta;b\n")
    [prompt] = [p async for run in pipeline.read_prompts(tmp_path / "a.tsv", pipeline.PromptMaker({})) for p in run]
    assert (prompt.id, prompt.text, prompt.fields) == ("t1", "hello, world", {"note": "a;b"})


@pytest.mark.parametrize(
    ("name", "header", "says"),
    [
        ("a.csv", "id;prompt", "read as comma-separated: id;prompt); it looks semicolon-separated"),
        ("a.csv", "id\tprompt", "it looks tab-separated"),
        ("a.tsv", "id,prompt", "read as tab-separated: id,prompt); it looks comma-separated"),
    ],
)
def test_a_header_without_a_prompt_column_says_how_it_was_split_before_any_request(
    tmp_path, fake_gemini, run, name, header, says
) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    (inputs / f"z_{name}").write_text(f"{header}\n1{header[2]}hello\n")
    result = run(inputs)
    assert result.exit_code == 2 and not server.requests and not list(result.output_dir.glob("shard_*"))
    assert says in result.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------- ids --
@pytest.mark.parametrize(
    ("files", "places"),
    [
        (
            {"a.txt": "What is two times 1?\n", "b.jsonl": jsonl({"id": "a.txt:1", "prompt": "What is two times 2?"})},
            ("a.txt:1 (a row with no id of its own)", "b.jsonl:1"),
        ),
        (
            {"a.csv": "id,prompt\n,What is two times 1?\na.csv:2,What is two times 2?\n"},
            ("a.csv:2 (a row with no id of its own)", "a.csv:3"),
        ),
        (
            {"a.jsonl": jsonl({"id": "b.txt:1", "prompt": "What is two times 2?"}), "b.txt": "What is two times 1?\n"},
            ("b.txt:1 (a row with no id of its own)", "a.jsonl:1"),
        ),
    ],
)
def test_a_named_id_equal_to_a_default_id_exits_2_naming_both_and_writes_it_once(
    tmp_path, fake_gemini, run, files, places
) -> None:
    fake_gemini()
    inputs = tmp_path / "inputs"
    for name, text in files.items():
        write(inputs, name, text)
    result = run(inputs)
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "is named twice in the inputs" in last and places[0] in last and places[1] in last
    ids = written_ids(result.output_dir)
    assert len(ids) == len(set(ids))


def test_a_row_naming_its_own_place_as_its_id_is_no_clash(tmp_path, fake_gemini, run) -> None:
    fake_gemini()
    inputs = write(tmp_path / "inputs", "a.jsonl", jsonl({"id": "a.jsonl:1", "prompt": "p1"}, {"prompt": "p2"}))
    result = run(inputs)
    assert result.exit_code == 0, result.stderr and sorted(result.ids()) == ["a.jsonl:1", "a.jsonl:2"]


# ---------------------------------------------------------------- journal --
def journal_answers(outputs: Path, *responses: pipeline.Response) -> Path:
    outputs.mkdir(exist_ok=True)
    journal = outputs / "arrivals.ab12cd.0.0.jsonl"  # as a run killed while its writer waited for the pool left it
    journal.write_text("".join(pipeline.Records.journal_line(r) for r in responses))
    return journal


def test_a_journaled_answer_to_an_edited_prompt_or_an_unknown_id_is_not_written(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(
        tmp_path / "inputs", ["What is two times 0?", "What is two times 1 (edited)?", "What is two times 2?"]
    )
    stale = pipeline.Response(
        pipeline.Prompt("shard_0.txt:2", "What is two times 1?"), "it is 2", "m-7", "STOP", 1, 6, 3
    )
    kept = pipeline.Response(
        pipeline.Prompt("shard_0.txt:3", "What is two times 2?"), "it is 4", "m-7", "STOP", 1, 6, 3
    )
    gone = pipeline.Response(pipeline.Prompt("shard_9.txt:1", "no longer an input"), "x", "m-7", "STOP", 1, 6, 3)
    journal = journal_answers(tmp_path / "outputs", stale, kept, gone)
    result = run(inputs)
    assert result.exit_code == 0, result.stderr
    records = {r["id"]: r for r in result.records()}
    assert set(records) == {"shard_0.txt:1", "shard_0.txt:2", "shard_0.txt:3"}
    assert records["shard_0.txt:2"]["response"] == "echo: What is two times 1 (edited)?"
    assert records["shard_0.txt:3"]["response"] == "it is 4" and "What is two times 2?" not in server.answered
    assert "shard_9.txt:1" in result.stderr and not journal.exists()
    assert run(inputs).exit_code == 0  # and the next rerun finds nothing edited


def test_a_journaled_answer_to_a_row_whose_settings_changed_is_asked_again(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    row = {"id": "r1", "prompt": "What is two times 1?", "config": {"temperature": 0.1}}
    inputs = write(tmp_path / "inputs", "a.jsonl", jsonl(row))
    before = pipeline.PromptMaker({}).from_json(json.dumps(row), "a.jsonl:1")
    journal_answers(tmp_path / "outputs", pipeline.Response(before, "old", "m-7", "STOP", 1, 6, 1))
    write(inputs, "a.jsonl", jsonl({**row, "config": {"temperature": 0.9}}))
    result = run(inputs)
    assert result.exit_code == 0 and [r["response"] for r in result.records()] == ["echo: What is two times 1?"]
    assert generation_of(server.requests[0])["temperature"] == 0.9


def test_an_edited_row_level_setting_is_an_edited_input(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    row = {"id": "r1", "prompt": "What is two times 1?", "system_instruction": "Be brief."}
    inputs = write(tmp_path / "inputs", "a.jsonl", jsonl(row, {"id": "r2", "prompt": "p2", "config": {"seed": 1}}))
    assert run(inputs).exit_code == 0 and len(server.requests) == 2
    assert run(inputs).exit_code == 0 and len(server.requests) == 2  # unchanged: nothing to do
    for edited in ({**row, "system_instruction": "Be long."}, {**row, "config": {"seed": 2}}):
        write(inputs, "a.jsonl", jsonl(edited, {"id": "r2", "prompt": "p2", "config": {"seed": 1}}))
        result = run(inputs)
        assert result.exit_code == 2 and "r1 is not the prompt" in result.stderr and len(server.requests) == 2


# --------------------------------------------------------------------- key --
def test_a_key_with_a_trailing_space_quoted_back_in_full_or_in_part_leaves_no_trace(
    tmp_path, fake_gemini, run, monkeypatch
) -> None:
    key = "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"

    def quote_the_key(request) -> Reply:
        if request.attempt == 1:
            return error(400, f"API key {request.api_key} not valid; key prefix {request.api_key[:20]}")
        return error(503, "x" * 480 + f" your key was {request.api_key}")  # cut at 500: a piece of it at the end

    server = fake_gemini(quote_the_key)
    monkeypatch.setenv("GEMINI_API_KEY", key + " \n")
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(4)), "-v", *fast_retries())
    assert {r.api_key for r in server.requests} == {key}  # sent stripped
    seen = result.stdout + result.stderr + every_file_text(result.output_dir)
    assert result.failures() and all(key[i : i + 16] not in seen for i in range(len(key) - 15))


def test_describe_redacts_before_it_cuts_and_has_no_stray_space(monkeypatch) -> None:
    key = "k" * 8 + "0123456789abcdefghij"
    monkeypatch.setenv("GEMINI_API_KEY", key)

    class APIError(Exception):
        code, status, details = 503, None, {}
        message = "y" * (pipeline.MESSAGE_CHARS - 20) + key

    text = pipeline.describe(APIError(), pipeline.Settings())
    assert text.startswith("503: ") and all(key[i : i + 16] not in text for i in range(len(key) - 15))


# ----------------------------------------------------------------- schemas --
def test_a_run_wide_schema_with_a_ref_to_nothing_is_refused_before_any_request(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"answer": {"$ref": "#/$defs/missing"}}}')
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(3)), "--response-schema", str(schema))
    assert result.exit_code == 2 and not server.requests
    assert "$ref '#/$defs/missing' points at nothing" in result.stderr.strip().splitlines()[-1]


def test_a_rows_schema_with_a_ref_to_nothing_fails_that_row_alone_unsent(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    bad = {"responseJsonSchema": {"properties": {"a": {"$ref": "#/$defs/missing"}}}}
    inputs = write(
        tmp_path / "inputs",
        "a.jsonl",
        jsonl({"id": "bad", "prompt": "p0", "config": bad}, {"id": "ok", "prompt": "p1"}),
    )
    for _ in range(2):
        result = run(inputs)
        assert result.exit_code == 1 and [f["id"] for f in result.failures()] == ["bad"]
    assert [r.prompt for r in server.requests] == ["p1"]


def test_a_rows_own_schema_replaces_the_run_wide_one_of_either_kind(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini(lambda request: answer('{"answer": "x"}'))
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    own = {"responseSchema": {"type": "OBJECT", "properties": {"answer": {"type": "STRING"}}}}
    inputs = write(
        tmp_path / "inputs",
        "a.jsonl",
        jsonl({"id": "own", "prompt": "p0", "config": own}, {"id": "run", "prompt": "p1"}),
    )
    assert run(inputs, "--response-schema", str(schema)).exit_code == 0
    sent = {r.prompt: generation_of(r) for r in server.requests}
    assert "responseSchema" in sent["p0"] and "responseJsonSchema" not in sent["p0"]
    assert "responseJsonSchema" in sent["p1"] and "responseSchema" not in sent["p1"]


# ---------------------------------------------------- one line, never a hang --
def test_a_symlink_loop_in_the_input_folder_is_one_line(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    os.symlink("loop.txt", inputs / "loop.txt")
    result = run(inputs)
    assert result.exit_code == 2 and not server.requests
    assert "loop.txt: Too many levels of symbolic links" in result.stderr.strip().splitlines()[-1]


@pytest.mark.timeout(20)
def test_a_fifo_among_the_inputs_is_refused_at_start_and_a_linked_input_file_is_read(
    tmp_path, fake_gemini, run
) -> None:
    """A FIFO would hang the reader (or feed it without end): one line, nothing written. A
    link to a regular file elsewhere is the user's own choice: its prompts are asked."""
    server = fake_gemini()
    inputs = write_prompts(tmp_path / "inputs", sample_prompts(3))
    elsewhere = write_prompts(tmp_path / "elsewhere", ["a linked prompt"])
    [linked] = list(elsewhere.iterdir())
    os.symlink(linked, inputs / "linked.txt")
    os.mkfifo(inputs / "pipe.jsonl")
    refused = run(inputs)
    assert refused.exit_code == 2 and not server.requests and not refused.output_dir.exists()
    assert refused.stderr.strip().splitlines() == [
        f"error: input file {inputs / 'pipe.jsonl'} is not a regular file (a FIFO, socket or device): move it out of the input folder"
    ]
    (inputs / "pipe.jsonl").unlink()
    result = run(inputs)
    assert result.exit_code == 0, result.stderr
    assert "a linked prompt" in {r["prompt"] for r in result.records()}


def test_a_torn_shard_that_cannot_be_repaired_is_one_line(tmp_path, fake_gemini, run, monkeypatch) -> None:
    server = fake_gemini()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "shard_00000.jsonl").write_bytes(b'{"id": "shard_0.txt:1", "pro')  # torn by a kill

    def read_only(path, length):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "truncate", read_only)
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(3)))
    assert result.exit_code == 2 and not server.requests
    assert "cannot repair" in result.stderr and "Permission denied" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["shard_00000.jsonl", "failed.jsonl", "job.json", "arrivals.ab12cd.0.0.jsonl"])
@pytest.mark.timeout(20)
def test_a_fifo_by_the_name_of_one_of_our_files_is_refused_not_waited_on(tmp_path, fake_gemini, run, name) -> None:
    server = fake_gemini()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    os.mkfifo(outputs / name)
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(3)))
    assert result.exit_code == 2 and not server.requests
    assert f"{name} is not a regular file" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--workers", "10000000"), ("--readers", "65"), ("--postprocess-workers", "100000"), ("--model", " ")],
)
def test_settings_past_their_bounds_are_one_line(tmp_path, fake_gemini, run, flag, value) -> None:
    server = fake_gemini()
    with pytest.raises(SystemExit) as stopped:
        run(write_prompts(tmp_path / "inputs", sample_prompts(3)), flag, value)
    assert stopped.value.code == 2 and not server.requests


def test_a_prompt_over_the_tpm_fails_at_once_with_the_numbers_and_the_rest_are_answered(
    tmp_path, fake_gemini, run
) -> None:
    server = fake_gemini()
    prompts = ["short one", "x " * 4000, "short two"]
    started = time.monotonic()
    result = run(write_prompts(tmp_path / "inputs", prompts), "--tpm", "1000")
    assert result.exit_code == 1 and time.monotonic() - started < 30
    [failure] = result.failures()
    assert (
        failure["id"] == "shard_0.txt:2" and "needs about 2,000 input tokens, more than --tpm 1000" in failure["error"]
    )
    assert sorted(server.answered) == ["short one", "short two"]


def test_a_prompt_costing_more_than_the_whole_budget_fails_alone_with_the_numbers(tmp_path, fake_gemini, run) -> None:
    server = fake_gemini()
    result = run(
        write_prompts(tmp_path / "inputs", ["short one", "x " * 40_000, "short two"]), "--max-cost-usd", "0.001"
    )
    assert result.exit_code == 1, result.stderr
    [failure] = result.failures()
    assert "alone, more than --max-cost-usd 0.001" in failure["error"] and "budget" not in result.stderr
    assert sorted(server.answered) == ["short one", "short two"]


def test_twenty_safety_blocks_in_a_row_point_at_the_prompts_not_the_model(tmp_path, fake_gemini, run) -> None:
    fake_gemini(lambda request: safety_block())
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(40)), "--workers", "1")
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "safety_settings" in last and "--model" not in last


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
