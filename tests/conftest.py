"""Shared fixtures: a fake Gemini server the real SDK reaches through
GOOGLE_GEMINI_BASE_URL, prompt folders, and ways to run the pipeline in-process
(fast, most tests) or as a subprocess (exit codes, signals, what a user sees)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pipeline  # noqa: E402 (found through the sys.path set just above)
from fake_gemini import FakeGemini, Reply, Request, echo  # noqa: E402

API_KEY = "test-key-5f2c9e"


def made_once(make: Callable[..., Any]) -> Callable[..., Any]:
    """`make`, returning what it made the first time for the same arguments. Each google-genai
    Client loads the CA bundle into new TLS contexts, about 0.1 s of CPU per run; the tests
    speak plain HTTP to 127.0.0.1, so in-process runs share them (a subprocess loads its own)."""
    made: dict[Any, Any] = {}

    @functools.wraps(make)
    def make_once(*args: Any, **kwargs: Any) -> Any:
        key = (args, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = make(*args, **kwargs)
        return made[key]

    return make_once


ssl.create_default_context = made_once(ssl.create_default_context)
httpx2.create_ssl_context = made_once(httpx2.create_ssl_context)


@dataclass
class Run:
    """What one pipeline run left behind."""

    exit_code: int
    stdout: str
    stderr: str
    output_dir: Path

    def shard_names(self) -> list[str]:
        return sorted(p.name for p in self.output_dir.glob("shard_*.jsonl"))

    def records(self) -> list[dict]:
        return [json.loads(line) for name in self.shard_names() for line in (self.output_dir / name).open()]

    def failures(self) -> list[dict]:
        path = self.output_dir / "failed.jsonl"
        return [json.loads(line) for line in path.open()] if path.exists() else []

    def ids(self) -> list[str]:
        return [r["id"] for r in self.records()]


def adc_file(path: Path, token: str) -> Path:
    """Application Default Credentials (an authorized user's) whose token is valid for ever:
    google-auth never refreshes it, so no Google host is ever asked."""
    user = {"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"}
    path.write_text(json.dumps({**user, "token": token, "expiry": "2999-01-01T00:00:00Z"}))
    return path


def write_prompts(folder: Path, prompts: list[str], per_file: int = 3) -> Path:
    """Spread prompts over files shard_0.txt, shard_1.txt, ... of `per_file` lines."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(prompts), per_file):
        (folder / f"shard_{start // per_file}.txt").write_text("\n".join(prompts[start : start + per_file]) + "\n")
    return folder


def sample_prompts(n: int = 30) -> list[str]:
    return [f"What is two times {i}?" for i in range(n)]


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """pipeline.cli points its logger at the sys.stderr of the test that ran it; unhook it after."""
    yield
    pipeline.log.handlers.clear()


@pytest.fixture
def fake_gemini(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeGemini]]:
    """Start a fake server (`fake_gemini(behaviour, latency_s=...)`) and point the SDK at it."""
    servers: list[FakeGemini] = []

    def start(behaviour: Callable[[Request], Reply] = echo, latency_s: float = 0.0) -> FakeGemini:
        server = FakeGemini(behaviour, latency_s).__enter__()
        servers.append(server)
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.base_url)
        monkeypatch.setenv("GEMINI_API_KEY", API_KEY)
        monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run pipeline.cli in this process: `run(input_dir, "--workers", "3")`."""

    def run_in_process(input_dir: Path, *flags: str, output_dir: Path | None = None) -> Run:
        output_dir = output_dir or tmp_path / "outputs"
        code = pipeline.cli(["--input-dir", str(input_dir), "--output-dir", str(output_dir), *flags])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err, output_dir)

    return run_in_process


def run_subprocess(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> Run:
    """Run `python pipeline.py ARGS` as a user would, in `cwd` (outputs in cwd/outputs)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, str(ROOT / "pipeline.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr, cwd / "outputs")


def stage_run(output_dir: Path, settings: pipeline.Settings | None = None, **parts) -> pipeline.Run:
    """A pipeline.Run for calling one stage alone: the parts a test gives (a Run's fields, or
    `gate` and `files` for its limits and its readers), the rest empty."""
    settings = settings or pipeline.Settings(output_dir=output_dir)
    gate = parts.pop("gate", None) or pipeline.Gate(None)
    defaults = {
        "settings": settings,
        "client": None,
        "progress": pipeline.Progress(),
        "past": pipeline.PastRuns(output_dir),
        "limits": pipeline.Limits(
            gate, pipeline.Outage(lambda: None, "example.test", 60, gate.closed_event), pipeline.Concurrency(1)
        ),
        "prompts": asyncio.Queue(),
        "outcomes": asyncio.Queue(),
        "reading": pipeline.Reading(parts.pop("files", iter([]))),
        "asking": pipeline.Asking(pipeline.PromptMaker({})),
        "writing": pipeline.Writing(pipeline.PostProcessor(pipeline.postprocess, 0), itertools.count()),
    }
    return pipeline.Run(**{**defaults, **parts})


# ------------------------------------------------ helpers the test files share --
def fail_first(times: int, failure: Reply):
    """Fail each prompt's first `times` requests, then answer it."""
    return lambda request: failure if request.attempt <= times else echo(request)


def fast_retries(*flags: str) -> tuple[str, ...]:
    return ("--retry-base-s", "0.01", "--retry-max-s", "0.05", *flags)


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def generation_of(request: Request) -> dict:
    return request.body.get("generationConfig", {})


def start_pipeline(cwd: Path, server: FakeGemini, *flags: str, pool: bool = False) -> subprocess.Popen[str]:
    """`python pipeline.py -v FLAGS` against `server`; with `pool`, with a postprocess() slow
    enough for its pool of processes to start (tests/slow_postprocess.py)."""
    env = {**os.environ, "GEMINI_API_KEY": API_KEY, "GOOGLE_GEMINI_BASE_URL": server.base_url}
    script = ROOT / "tests" / "slow_postprocess.py" if pool else ROOT / "pipeline.py"
    return subprocess.Popen(
        [sys.executable, str(script), "-v", *flags],
        cwd=cwd,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_writes(process: subprocess.Popen[str], count: int) -> bool:
    """Read the -v log until `count` records are written; False if the run ended first."""
    assert process.stderr is not None
    for line in process.stderr:
        if " wrote " in line:
            count -= 1
            if count == 0:
                return True
    return False


def signal_once_logged(process: subprocess.Popen[str], logged: str, stop_signal: int) -> str:
    """Read the -v log until a line holds `logged`, then send `stop_signal`: the rest of the
    log, once the process has ended."""
    assert process.stderr is not None
    for line in process.stderr:
        if logged in line:
            break
    process.send_signal(stop_signal)
    return process.communicate(timeout=30)[1]
