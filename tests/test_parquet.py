"""Parquet inputs: a request per row, read in record batches, answered once each, the other
columns carried with their types; pyarrow optional; data files that are no prompts refused."""

from __future__ import annotations

import builtins
import datetime
import decimal
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import sample_prompts

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_rows(path: Path, rows: int, row_group_size: int = 1000, **columns: list) -> Path:
    """A Parquet file of `rows` prompts (every third row naming its own id), plus `columns`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {
        "id": [f"own-{i}" if i % 3 == 0 else None for i in range(rows)],
        "prompt": [f"What is {i} plus one?" for i in range(rows)],
        "n": list(range(rows)),
        "score": [i / 4 for i in range(rows)],
        "tags": [["x", str(i)] for i in range(rows)],
        **columns,
    }
    pq.write_table(pa.table(table), path, row_group_size=row_group_size)
    return path


def test_twenty_thousand_rows_are_answered_once_each_with_their_ids_and_typed_columns(tmp_path, run) -> None:
    inputs = tmp_path / "inputs"
    write_rows(inputs / "rows.parquet", 20_000)
    assert pq.ParquetFile(inputs / "rows.parquet").num_row_groups == 20
    first = run(inputs, "--offline", "--offline-latency-ms", "0", "--workers", "64")
    assert first.exit_code == 0, first.stderr
    records = first.records()
    ids = Counter(record["id"] for record in records)
    assert len(ids) == 20_000 and set(ids.values()) == {1}
    expected = {
        f"own-{i}" if i % 3 == 0 else f"rows.parquet:{i + 1}": i for i in range(20_000)
    }  # a row's default id: its number
    assert {record["id"]: record["n"] for record in records} == expected
    row = next(record for record in records if record["n"] == 4001)
    assert row["prompt"] == "What is 4001 plus one?" and row["score"] == 1000.25 and row["tags"] == ["x", "4001"]
    assert isinstance(row["n"], int) and isinstance(row["score"], float)
    again = run(inputs, "--offline", "--offline-latency-ms", "0")
    assert again.exit_code == 0 and "0 answered" in again.stderr and "20000 already done" in again.stderr


def test_timestamps_decimals_structs_and_bad_rows(tmp_path, fake_gemini, run) -> None:
    """Timestamps and decimals come out as ISO text and strings; a struct config applies to its row
    (its nulls are no settings); bytes, NaN and a row without a prompt fail that row, never sent."""
    server = fake_gemini()
    inputs = tmp_path / "inputs"
    table = pa.table(
        {
            "prompt": ["a", "b", None, "d", "e"],
            "when": [datetime.datetime(2026, 1, 2, 3, 4, 5)] * 5,
            "price": [decimal.Decimal("1.10")] * 5,
            "config": [{"temperature": 0.25, "top_k": None}, {"temperature": None, "top_k": 3}, None, None, None],
            "blob": [None, None, None, b"\x00\x01", None],
            "ratio": [0.5, 0.5, 0.5, 0.5, float("nan")],
        }
    )
    inputs.mkdir()
    pq.write_table(table, inputs / "t.parquet")
    result = run(inputs)
    assert result.exit_code == 1, result.stderr
    by_id = {record["id"]: record for record in result.records()}
    assert sorted(by_id) == ["t.parquet:1", "t.parquet:2"] and len(server.requests) == 2
    assert by_id["t.parquet:1"]["when"] == "2026-01-02T03:04:05" and by_id["t.parquet:1"]["price"] == "1.10"
    configs = {
        request.body["contents"][-1]["parts"][0]["text"]: request.body.get("generationConfig", {})
        for request in server.requests
    }
    assert configs["a"] == {"temperature": 0.25} and configs["b"] == {"topK": 3}
    failures = {failure["id"]: failure["error"] for failure in result.failures()}
    assert failures.keys() == {"t.parquet:3", "t.parquet:4", "t.parquet:5"}
    assert (
        failures["t.parquet:3"].startswith("no prompt")
        and "bytes" in failures["t.parquet:4"]
        and "nan" in failures["t.parquet:5"]
    )
    assert (
        failures["t.parquet:3"] == "no prompt (t.parquet:3)"
    )  # a row failing as a JSONL row would; the others: their id is their place


def test_an_edited_row_stops_the_rerun(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    write_rows(inputs / "rows.parquet", 30, row_group_size=10)
    fake_gemini()
    assert run(inputs).exit_code == 0
    prompts = [f"What is {i} plus one?" for i in range(30)]
    prompts[14] = "something else entirely"
    write_rows(inputs / "rows.parquet", 30, row_group_size=10, prompt=prompts)
    server = fake_gemini()
    second = run(inputs)
    message = second.stderr.strip().splitlines()[-1]
    assert second.exit_code == 2 and "rows.parquet:15" in message and "Traceback" not in second.stderr
    assert not server.requests


def test_without_pyarrow_a_parquet_file_stops_the_run_in_one_line(tmp_path, fake_gemini, run, monkeypatch) -> None:
    inputs = write_rows(tmp_path / "inputs" / "rows.parquet", 5).parent
    (inputs / "more.txt").write_text("\n".join(sample_prompts(3)) + "\n")
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    monkeypatch.delitem(__import__("sys").modules, "pyarrow.parquet", raising=False)
    server = fake_gemini()
    result = run(inputs)
    assert (
        result.exit_code == 2
        and result.stderr.strip().splitlines()[-1] == "error: rows.parquet needs pyarrow: pip install pyarrow"
    )
    assert not server.requests and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "name, data, said",
    [
        ("rows.parquet", b"id,prompt\nr1,hello\n", "is not a Parquet file"),
        ("torn.parquet", None, "is not a Parquet file"),
        ("noprompt.parquet", "no prompt column", "no 'prompt' column"),
        ("table.arrow", b"ARROW1\x00\x00\xff\xff\xff\xff", "an Arrow or Feather file"),
        ("x.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f8'}", "a NumPy .npy file"),
        ("data.zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "a zip archive"),
        ("blob", b"\x00\x01\x02\x03binary\nWhat is two times 2?\n", "NUL bytes on its first line"),
        ("rows.jsonl", b"\x00\x00\x00\x0c\x00\x00\n", "NUL bytes on its first line"),
    ],
)
def test_a_file_no_prompt_can_come_from_stops_the_run_naming_it(tmp_path, fake_gemini, run, name, data, said) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.txt").write_text("What is two times 1?\n")
    if data is None:  # a Parquet file cut off mid-write
        whole = write_rows(tmp_path / "whole.parquet", 100).read_bytes()
        (inputs / name).write_bytes(whole[: len(whole) // 2])
    elif isinstance(data, str):
        pq.write_table(pa.table({"text": ["a"]}), inputs / name)
    else:
        (inputs / name).write_bytes(data)
    server = fake_gemini()
    result = run(inputs)
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and name in last and said in last, result.stderr
    assert not server.requests and not result.records() and "Traceback" not in result.stderr


def test_a_parquet_files_total_comes_from_its_metadata_and_its_rows_from_record_batches(tmp_path, monkeypatch) -> None:
    """The progress total is the metadata's row count (no pass over the data); the rows come
    a record batch at a time, never the whole file at once."""
    import asyncio

    import pipeline

    path = write_rows(tmp_path / "rows.parquet", 5000, row_group_size=1000)
    read = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def iter_batches(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            read.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    assert asyncio.run(pipeline.count_rows(path)) == 5000 and not read

    async def rows() -> list:
        return [row async for batch in pipeline.parquet_rows(path) for row in batch]

    assert len(asyncio.run(rows())) == 5000 and max(read) <= pipeline.PARQUET_ROWS and sum(read) == 5000
    assert json.dumps([row.columns for row in asyncio.run(rows())][:3])  # JSON-native


def test_a_parquet_file_damaged_midway_stops_the_run_naming_it(tmp_path, fake_gemini, run) -> None:
    """Bytes zeroed in a later row group: the rows before are answered (kept for the rerun), the
    damage stops the run in one line naming the file; a prompt a damage filled with NULs fails alone."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    table = pa.table({"prompt": [f"What is {i} plus 1? " + "x" * 50 for i in range(5000)], "n": list(range(5000))})
    pq.write_table(table, inputs / "rows.parquet", row_group_size=1000, compression="none")
    data = bytearray((inputs / "rows.parquet").read_bytes())
    middle = int(len(data) * 0.7)
    data[middle : middle + 40] = bytes(40)
    (inputs / "rows.parquet").write_bytes(data)
    fake_gemini()
    result = run(inputs, "--workers", "20")
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and "rows.parquet is damaged after row" in last and "Traceback" not in result.stderr
    assert len(result.records()) >= 1000 and all("\x00" not in record["prompt"] for record in result.records())


def test_a_prompt_holding_a_nul_byte_fails_its_row_unsent(tmp_path, fake_gemini, run) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(
        pa.table({"prompt": ["fine", "not\x00text"], "system_instruction": [None, None]}), inputs / "t.parquet"
    )
    server = fake_gemini()
    result = run(inputs)
    assert result.exit_code == 1 and result.ids() == ["t.parquet:1"] and len(server.requests) == 1
    [failure] = result.failures()
    assert failure["id"] == "t.parquet:2" and "NUL" in failure["error"] and failure["attempts"] == 0


def test_ids_are_one_namespace_with_the_other_inputs(tmp_path, fake_gemini, run) -> None:
    """A Parquet row naming another row's default id ("rows.parquet:2") stops the run (exit 2),
    naming both places, as a JSONL row would."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(pa.table({"id": [None, None, "rows.parquet:2"], "prompt": ["a", "b", "c"]}), inputs / "rows.parquet")
    server = fake_gemini()
    result = run(inputs)
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and "'rows.parquet:2' is named twice" in last and "rows.parquet:3" in last, (
        result.stderr
    )
    assert len(server.requests) <= 2 and "Traceback" not in result.stderr
