"""What a user sees: `python pipeline.py ...` in a shell: exit codes, one-line errors, --help."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, ROOT, run_subprocess, sample_prompts, write_prompts
from fake_gemini import FakeGemini

import pipeline


def assert_one_line_error(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_offline_answers_the_sample_inputs_into_six_shards(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "inputs", tmp_path / "inputs")
    result = run_subprocess(["--offline"], tmp_path)
    assert result.exit_code == 0, result.stderr
    assert result.shard_names() == [f"shard_{i:05d}.jsonl" for i in range(6)]
    answers = {r["prompt"]: r["response"] for r in result.records()}
    assert answers == {f"What is two times {n}?": f"Two times {n} is {2 * n}." for n in range(30)}
    assert re.search(r"30 answered, 0 failed, 0 already done, 0 retries, .* prompts/s", result.stderr)


def test_offline_does_not_import_the_sdk(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(3))
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "pipeline.py"), "--offline", "--offline-latency-ms", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    assert "aiofiles" in done.stderr  # importtime is really listing imports
    assert "google.genai" not in done.stderr


def test_sample_inputs_are_as_specified() -> None:
    files = sorted((ROOT / "inputs").iterdir())
    assert [f.name for f in files] == sorted(f"shard_{s}.txt" for s in range(10))
    for shard in range(10):
        lines = (ROOT / "inputs" / f"shard_{shard}.txt").read_text().splitlines()
        assert lines == [f"What is two times {shard * 3 + i}?" for i in range(3)]


def test_no_api_key(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(3))
    result = run_subprocess([], tmp_path)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "GEMINI_API_KEY", "--offline")


def test_google_api_key_is_accepted_too(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(3))
    with FakeGemini() as server:
        env = {"GOOGLE_API_KEY": API_KEY, "GOOGLE_GEMINI_BASE_URL": server.base_url}
        result = run_subprocess([], tmp_path, env)
    assert result.exit_code == 0, result.stderr
    assert {r.api_key for r in server.requests} == {API_KEY}


def test_missing_input_dir(tmp_path: Path) -> None:
    result = run_subprocess(["--offline", "--input-dir", "nowhere"], tmp_path)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "nowhere", "--input-dir")


def test_empty_input_dir_has_nothing_to_do(tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "blank.txt").write_text("\n  \n\r\n")
    result = run_subprocess(["--offline"], tmp_path)
    assert result.exit_code == 0
    assert "nothing to do" in result.stderr
    assert result.shard_names() == []


def test_unusable_output_dir(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(3))
    (tmp_path / "a_file").write_text("")
    result = run_subprocess(["--offline", "--output-dir", "a_file/out"], tmp_path)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "a_file/out")


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--workers", "0"], "--workers"),
        (["--queue-size", "-1"], "--queue-size"),
        (["--shard-size", "0"], "--shard-size"),
        (["--max-attempts", "0"], "--max-attempts"),
        (["--timeout", "0"], "--timeout"),
        (["--retry-base-s", "-2"], "--retry-base-s"),
        (["--retry-base-s", "5", "--retry-max-s", "1"], "--retry-max-s"),
        (["--offline-latency-ms", "-1"], "--offline-latency-ms"),
        (["--rpm", "0"], "--rpm"),
        (["--postprocess-workers", "-1"], "--postprocess-workers"),
        (["--readers", "0"], "--readers"),
        (["--writers", "0"], "--writers"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-poll-s", "0"], "--batch-poll-s"),
        (["--workers", "many"], "--workers"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flags_get_one_line_and_exit_2(tmp_path: Path, flags: list[str], named: str) -> None:
    result = run_subprocess(["--offline", *flags], tmp_path)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, named)


def test_help_lists_every_setting_with_its_constant_as_default(tmp_path: Path) -> None:
    result = run_subprocess(["--help"], tmp_path)
    assert result.exit_code == 0
    help_text = " ".join(result.stdout.split())
    for flag, constant in [
        ("--input-dir", pipeline.INPUT_DIR), ("--output-dir", pipeline.OUTPUT_DIR), ("--model", pipeline.MODEL),
        ("--system-instruction", pipeline.SYSTEM_INSTRUCTION), ("--temperature", pipeline.TEMPERATURE),
        ("--max-output-tokens", pipeline.MAX_OUTPUT_TOKENS), ("--response-schema", pipeline.RESPONSE_SCHEMA),
        ("--generation-config", pipeline.GENERATION_CONFIG),
        ("--workers", pipeline.GENERATE_WORKERS), ("--queue-size", pipeline.QUEUE_SIZE),
        ("--shard-size", pipeline.SHARD_SIZE), ("--max-attempts", pipeline.MAX_ATTEMPTS),
        ("--timeout", pipeline.REQUEST_TIMEOUT_S), ("--retry-base-s", pipeline.RETRY_BASE_S),
        ("--retry-max-s", pipeline.RETRY_MAX_S), ("--rpm", pipeline.REQUESTS_PER_MINUTE),
        ("--offline-latency-ms", pipeline.OFFLINE_LATENCY_MS),
        ("--postprocess-workers", pipeline.POSTPROCESS_WORKERS), ("--readers", pipeline.READERS),
        ("--writers", pipeline.WRITERS), ("--batch-size", pipeline.BATCH_SIZE), ("--batch-poll-s", pipeline.BATCH_POLL_S),
    ]:  # fmt: skip
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(str(constant))}\)", help_text), flag
    assert "--offline " in help_text and "--verbose" in help_text


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(pip install -r requirements.txt -r tests/requirements.txt && .*)$", readme, re.MULTILINE)
    assert commands, "the README gives no test command"
    assert commands[0] in ci
