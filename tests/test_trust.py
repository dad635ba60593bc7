"""The README's promises under hostile input and faults (issue 23): no stage's death hangs
the run, no value in a row can kill the writer after its answer is paid, CSV is read as
the csv module reads it, ids are unique across every kind, a journaled answer is trusted
only for the request it answered, and the key never shows, not even in part."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import API_KEY, sample_prompts, write_prompts
from fake_gemini import echo, error

import pipeline


def shard_on_a_full_disk(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Writes to shard `name` fail with ENOSPC, as on a disk that filled up."""
    real_open = os.open

    def open_(path, flags, mode=0o777, **kwargs):
        if Path(path).name == name:
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_)


# ---------------------------------------------------------------- shutdown --
@pytest.mark.timeout(40)
def test_a_dead_writer_ends_the_run_while_generators_sleep_in_a_back_off(tmp_path, fake_gemini, run, monkeypatch) -> None:
    server = fake_gemini(lambda request: error(503, "overloaded") if int(request.prompt.split()[-1][:-1]) % 2 else echo(request))
    shard_on_a_full_disk(monkeypatch, "shard_00002.jsonl")
    started = time.monotonic()
    result = run(write_prompts(tmp_path / "inputs", sample_prompts(400), per_file=100), "--workers", "50",
                 "--retry-base-s", "1", "--shard-size", "10", "--postprocess-workers", "0")
    elapsed = time.monotonic() - started
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write to") and "No space left on device" in result.stderr
    assert elapsed < 20, elapsed  # loose: the fix ends it in about a second, the bug never
    assert server.requests
