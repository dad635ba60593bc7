"""What a user sees: `python pipeline.py ...` in a shell: exit codes, one-line errors, --help."""

from __future__ import annotations

import builtins
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import pipeline
from conftest import API_KEY, ROOT, run_subprocess, sample_prompts, write_prompts
from fake_gemini import FakeGemini


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
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert "aiofiles" in done.stderr  # importtime is really listing imports
    assert "google.genai" not in done.stderr


def test_sample_inputs_are_as_specified() -> None:
    files = sorted(path for path in (ROOT / "inputs").iterdir() if path.is_file())
    assert [f.name for f in files] == sorted(f"shard_{s}.txt" for s in range(10))
    assert sorted(path.name for path in (ROOT / "inputs" / "pictures").iterdir()) == [
        "blue.png",
        "pictures.csv",
        "red.png",
    ]
    for shard in range(10):
        lines = (ROOT / "inputs" / f"shard_{shard}.txt").read_text().splitlines()
        assert lines == [f"What is two times {shard * 3 + i}?" for i in range(3)]


def test_no_api_key(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(3))
    result = run_subprocess([], tmp_path)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "GEMINI_API_KEY", "--offline")
    assert not (tmp_path / "outputs").exists()  # a refused start leaves nothing behind


def test_a_refusal_inside_the_run_is_one_line_too(tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "a.csv").write_text("text\nhello\n")  # no prompt column: found when the file is read
    result = run_subprocess(["--offline"], tmp_path)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "a.csv", "'prompt' column")


def test_version(tmp_path: Path) -> None:
    result = run_subprocess(["--version"], tmp_path)
    assert result.exit_code == 0 and result.stdout.strip() == f"pipeline.py {pipeline.__version__}"


def test_one_failure_is_one_prompt(tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "a.txt").write_bytes(b"What is two times 2?\n\xff\n")
    result = run_subprocess(["--offline", "--offline-latency-ms", "0"], tmp_path)
    assert result.exit_code == 1 and result.stderr.strip().endswith("1 prompt failed: see outputs/failed.jsonl")


def test_the_stopping_line_has_no_timestamp_without_verbose(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(30))
    with FakeGemini(latency_s=30) as server:
        env = {**os.environ, "GEMINI_API_KEY": API_KEY, "GOOGLE_GEMINI_BASE_URL": server.base_url}
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "pipeline.py")], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
        )
        assert server.wait_for_requests(1)  # requests are in flight: the run is past its start-up
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130
    assert "stopping: writing the answers received (Ctrl-C again quits at once)" in stderr.splitlines()


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
        ("--input-dir", pipeline.INPUT_DIR),
        ("--output-dir", pipeline.OUTPUT_DIR),
        ("--model", pipeline.MODEL),
        ("--system-instruction", pipeline.SYSTEM_INSTRUCTION),
        ("--temperature", pipeline.TEMPERATURE),
        ("--max-output-tokens", pipeline.MAX_OUTPUT_TOKENS),
        ("--response-schema", pipeline.RESPONSE_SCHEMA),
        ("--generation-config", pipeline.GENERATION_CONFIG),
        ("--workers", pipeline.WORKERS),
        ("--queue-size", pipeline.QUEUE_SIZE),
        ("--shard-size", pipeline.SHARD_SIZE),
        ("--max-attempts", pipeline.MAX_ATTEMPTS),
        ("--timeout-s", pipeline.TIMEOUT_S),
        ("--retry-base-s", pipeline.RETRY_BASE_S),
        ("--retry-max-s", pipeline.RETRY_MAX_S),
        ("--rpm", pipeline.RPM),
        ("--offline-latency-ms", pipeline.OFFLINE_LATENCY_MS),
        ("--postprocess-workers", pipeline.POSTPROCESS_WORKERS),
        ("--readers", pipeline.READERS),
        ("--writers", pipeline.WRITERS),
        ("--batch-size", pipeline.BATCH_SIZE),
        ("--batch-poll-s", pipeline.BATCH_POLL_S),
        ("--progress-every-s", pipeline.PROGRESS_EVERY_S),
        ("--tpm", pipeline.TPM),
        ("--max-cost-usd", pipeline.MAX_COST_USD),
    ]:
        shown = "unset" if constant is None else str(constant)  # None cannot be passed as a value
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(shown)}\)", help_text), flag
    assert "--offline " in help_text and "--verbose" in help_text


def test_every_setting_constant_has_its_flag_and_readme_row_and_nothing_else_does(tmp_path: Path) -> None:
    source = (ROOT / "pipeline.py").read_text()
    block = source.split(" settings --\n", 1)[1].split("\n\n", 1)[
        0
    ]  # the constants users edit, up to the first blank line
    constants = set(re.findall(r"^([A-Z][A-Z0-9_]+)(?::[^=]+)? = ", block, re.MULTILINE))
    readme = (ROOT / "README.md").read_text().split("## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (?:`([A-Z0-9_]+)`)? *\| (?:`-\w`, )?`(--[a-z-]+)`", readme, re.MULTILINE)
    help_text = run_subprocess(["--help"], tmp_path).stdout.split("options:", 1)[1]
    flags = set(re.findall(r"^ {2}(?:-\w, )?(--[a-z-]+)", help_text, re.MULTILINE)) - {"--help", "--version"}
    assert constants == {constant for constant, _ in rows if constant}
    assert {flag for _, flag in rows} == flags
    assert len(rows) == len({flag for _, flag in rows})  # one row each


@pytest.mark.parametrize(
    ("constant", "value", "reason"),
    [("SHARD_SIZE", 0, "must be at least 1"), ("TIMEOUT_S", -1.0, "must be at least 0")],
)
def test_a_constant_edited_to_a_value_its_flag_refuses_gets_one_line(
    monkeypatch, capsys, constant, value, reason
) -> None:
    monkeypatch.setattr(pipeline, constant, value)
    with pytest.raises(SystemExit) as stopped:
        pipeline.parse_args([])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{constant} = {value!r} at the top of pipeline.py" in error and reason in error


def test_a_settings_help_is_in_its_declaration_not_read_from_the_source(monkeypatch, capsys) -> None:
    helps = {setting.constant: setting.help for setting in pipeline.SETTINGS}
    assert all(helps.values()) and helps["WORKERS"] == "requests in flight at once (at most 10,000)"
    real_open = io.open

    def no_source(file, *args, **kwargs):  # --help must not need pipeline.py's text
        if Path(str(file)).name == "pipeline.py":
            raise AssertionError("pipeline.py's source was read")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", no_source)
    monkeypatch.setattr(builtins, "open", no_source)
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(" ".join(text.split()) in shown for text in helps.values())


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(pip install -r requirements.txt -r tests/requirements.txt && .*)$", readme, re.MULTILINE)
    assert commands, "the README gives no test command"
    assert commands[0] in ci


def readme_blocks(section: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    text = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\w*\n(.*?)```", text, re.DOTALL)


@pytest.fixture(scope="module")
def answered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loading")
    shutil.copytree(ROOT / "inputs", folder / "inputs")
    (folder / "inputs" / "ids.jsonl").write_text(
        '{"id": "007", "prompt": "a"}\n{"id": "1e3", "prompt": "b"}\n'
    )  # ids that look like numbers
    assert run_subprocess(["--offline", "--offline-latency-ms", "0"], folder).exit_code == 0
    (folder / "outputs" / "failed.jsonl").write_text('{"id": "x", "prompt": "p", "error": "e", "attempts": 1}\n')
    return folder


def test_the_readmes_shell_one_liners_load_every_answer(answered: Path) -> None:
    jq_line, python_line = readme_blocks("Loading the answers")[0].strip().splitlines()
    if shutil.which("jq"):
        done = subprocess.run(["bash", "-c", jq_line], cwd=answered, capture_output=True, text=True, check=True)
        assert len(done.stdout.splitlines()) == 32
    python_line = python_line.replace("python ", f"{sys.executable} ", 1)
    done = subprocess.run(["bash", "-c", python_line], cwd=answered, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "32"


@pytest.mark.parametrize("block, module", [(1, "pandas"), (2, "datasets"), (3, "duckdb"), (4, "polars")])
def test_the_readmes_python_snippets_load_every_answer(answered: Path, block: int, module: str, monkeypatch) -> None:
    pytest.importorskip(module)
    monkeypatch.chdir(answered)
    scope: dict = {}
    exec(readme_blocks("Loading the answers")[block], scope)
    answers = scope["answers"]
    assert len(answers) == 32
    assert {"007", "1e3"} <= set(answers["id"])  # ids stay text: "007" read as a number would be 7, "1e3" 1000.0


def test_without_a_terminal_a_progress_line_comes_every_progress_every_s(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(30))
    flags = ["--offline", "--workers", "1", "--offline-latency-ms", "100", "--progress-every-s", "0.5"]
    result = run_subprocess(flags, tmp_path)  # stderr is a pipe
    assert result.exit_code == 0, result.stderr
    progress = re.findall(r"^(\d+)/30 prompts \((\d+)%\), 0 failed, [\d.]+/s, ETA \S+$", result.stderr, re.MULTILINE)
    assert len(progress) >= 3, result.stderr
    done = [int(n) for n, _ in progress]
    assert done == sorted(done) and done[-1] > done[0] and all(int(p) == 100 * int(n) // 30 for n, p in progress)
    assert "shard_" not in result.stderr  # nothing per prompt without -v


def on_a_terminal(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    interrupt_after: Callable[[], object] | None = None,
    rows: int = 24,
) -> tuple[int, str]:
    """Run pipeline.py with stderr on a 120-column pseudo-terminal of `rows` rows, as a person
    sees it; Ctrl-C once `interrupt_after()` returns. Its exit status and everything it showed."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "pipeline.py"), *args], cwd=cwd, env=env, stdout=follower, stderr=follower
    )
    os.close(follower)
    if interrupt_after is not None:
        threading.Thread(target=lambda: interrupt_after() and process.send_signal(signal.SIGINT), daemon=True).start()
    screen = b""
    while select.select([leader], [], [], 60)[0]:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child is gone: EIO
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    return process.wait(timeout=10), screen.decode(errors="replace")


def test_on_a_terminal_the_bar_shows_the_total_and_eta_from_the_resumed_count(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(10), per_file=10)
    assert run_subprocess(["--offline", "--offline-latency-ms", "0"], tmp_path).exit_code == 0
    write_prompts(tmp_path / "inputs", sample_prompts(30), per_file=10)  # the same 10, and 20 more
    status, screen = on_a_terminal(["--offline", "--workers", "1", "--offline-latency-ms", "100"], tmp_path)
    assert status == 0, screen
    counts = re.findall(
        r"(\d+)(?:/30| prompts) \[", screen
    )  # every frame, before the total is counted too (a busy machine)
    assert counts and counts[0] == "10", screen  # starts at what earlier runs answered
    frames = re.findall(r"(\d+)/30 \[[\d:]+<([\d:?]+),", screen)
    assert frames[-1][0] == "30" and any(eta not in ("?", "00:00") for _, eta in frames), (
        screen
    )  # and counts down an ETA


def test_a_terminal_of_0_rows_gets_progress_lines(tmp_path: Path) -> None:
    """script, docker -t and ssh -tt from a script give a terminal that reports 0 rows: no bar can show there."""
    write_prompts(tmp_path / "inputs", sample_prompts(30))
    flags = ["--offline", "--workers", "1", "--offline-latency-ms", "50", "--progress-every-s", "0.3"]
    status, screen = on_a_terminal(flags, tmp_path, rows=0)
    assert status == 0, screen
    assert re.search(r"^\d+/30 prompts \(\d+%\), 0 failed, [\d.]+/s, ETA \S+", screen, re.MULTILINE), screen


def test_on_a_terminal_a_clean_run_shows_its_spend(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(30))
    with FakeGemini(latency_s=0.05) as server:
        env = {**os.environ, "GEMINI_API_KEY": API_KEY, "GOOGLE_GEMINI_BASE_URL": server.base_url}
        status, screen = on_a_terminal(["--workers", "2"], tmp_path, env)
    assert status == 0, screen
    bar_frames = [frame for frame in re.split(r"[\r\n]+", screen) if "prompts/s" in frame and "/30" in frame]
    assert any(re.search(r", \$0\.\d+\]", frame) for frame in bar_frames), screen  # nothing failed, the spend shows


def test_a_small_spend_is_written_without_an_exponent() -> None:
    assert [pipeline.dollars(usd) for usd in (5.25e-05, 0.0199, 0.42, 0.0, 1234.567)] == [
        "$0.0000525",
        "$0.0199",
        "$0.42",
        "$0",
        "$1,234.57",
    ]


def test_on_a_terminal_the_stopping_line_prints_above_the_bar(tmp_path: Path) -> None:
    write_prompts(tmp_path / "inputs", sample_prompts(30))
    with FakeGemini(latency_s=30) as server:
        env = {**os.environ, "GEMINI_API_KEY": API_KEY, "GOOGLE_GEMINI_BASE_URL": server.base_url}
        status, screen = on_a_terminal([], tmp_path, env, interrupt_after=lambda: server.wait_for_requests(5))
    assert status == 130
    lines = [
        line.strip() for line in re.split(r"[\r\n]+", screen)
    ]  # what each line starts with, after the bar is cleared
    assert "stopping: writing the answers received (Ctrl-C again quits at once)" in lines, screen


def test_the_readme_and_the_help_name_the_records_fields_in_their_order(tmp_path: Path) -> None:
    """RECORD declares the records; the README's two paragraphs on them and --help follow it."""
    readme = (ROOT / "README.md").read_text()
    names = {field.name for field in pipeline.RECORD}
    answer = readme.split("\nIn order: ", 1)[1].split("\n\n", 1)[0]
    failure = readme.split("\nA `failed.jsonl` line holds ", 1)[1].split("\n\n", 1)[0]
    for paragraph, fields in ((answer, pipeline.ANSWER_FIELDS), (failure, pipeline.FAILURE_FIELDS)):
        named = [name for name in re.findall(r"`([a-z_0-9]+)`", paragraph) if name in names]
        assert list(dict.fromkeys(named)) == [field.name for field in fields]
    help_text = run_subprocess(["--help"], tmp_path).stdout
    assert f"a shard's:        {', '.join(field.name for field in pipeline.ANSWER_FIELDS)}" in help_text
    assert all(f"    {field.name:<14} {field.meaning}" in help_text for field in pipeline.RECORD)
