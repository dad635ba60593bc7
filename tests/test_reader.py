"""The reader: which lines become prompts, with which ids, in which order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import pipeline
from conftest import stage_run


async def read_all(input_dir: Path) -> list[pipeline.Prompt]:
    queue: asyncio.Queue[pipeline.Prompt] = asyncio.Queue()
    await pipeline.read_inputs(
        stage_run(input_dir, prompts=queue, files=iter(await pipeline.list_input_files(input_dir)))
    )
    return [queue.get_nowait() for _ in range(queue.qsize())]


async def test_blank_lines_crlf_whitespace_and_bom(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbffirst\r\n\r\n   \n\t second \t\r\n\nlast line without newline")
    prompts = await read_all(tmp_path)
    assert [(p.id, p.text) for p in prompts] == [
        ("a.txt:1", "first"),
        ("a.txt:4", "second"),
        ("a.txt:6", "last line without newline"),
    ]
    assert all(p.error is None for p in prompts)


async def test_natural_order_skips_hidden_files_and_subdirectories(tmp_path: Path) -> None:
    for name in ["shard_10.txt", "shard_2.txt", "shard_1.txt", ".hidden.txt"]:
        (tmp_path / name).write_text(f"from {name}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.txt").write_text("nested\n")
    prompts = await read_all(tmp_path)
    assert [p.id for p in prompts] == ["shard_1.txt:1", "shard_2.txt:1", "shard_10.txt:1"]


async def test_invalid_utf8_line_is_marked_not_dropped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"good one\nbad \xff\xfe line\ngood two\n")
    prompts = await read_all(tmp_path)
    assert [p.id for p in prompts] == ["a.txt:1", "a.txt:2", "a.txt:3"]
    bad = prompts[1]
    assert "not valid UTF-8" in (bad.error or "") and bad.text.startswith("bad ")
    assert prompts[0].error is None and prompts[2].error is None


async def test_lines_split_across_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "READ_CHUNK_BYTES", 7)  # far shorter than a line
    lines = [f"prompt number {i} é" for i in range(50)]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts = await read_all(tmp_path)
    assert [p.text for p in prompts] == lines
    assert prompts[-1].id == "a.txt:50"


async def test_reader_waits_on_a_full_queue(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("".join(f"p{i}\n" for i in range(20)))
    queue: asyncio.Queue[pipeline.Prompt] = asyncio.Queue(maxsize=3)
    reader = asyncio.create_task(
        pipeline.read_inputs(stage_run(tmp_path, prompts=queue, files=iter([tmp_path / "a.txt"])))
    )
    while not queue.full():
        await asyncio.sleep(0)
    for _ in range(5):  # give the reader every chance to overrun the bound
        await asyncio.sleep(0)
    assert queue.qsize() == 3 and not reader.done()
    taken = [await queue.get() for _ in range(20)]
    await reader
    assert [p.text for p in taken] == [f"p{i}" for i in range(20)]
