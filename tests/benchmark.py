"""Benchmark pipeline.py against the SDK's own ceiling, across worker counts, and for
memory. Not a test: run it by hand, on a quiet machine.

    python tests/benchmark.py            # the full run, about forty minutes
    python tests/benchmark.py --quick    # fewer prompts and repetitions, for a look
    python tests/benchmark.py --only postprocess   # one section (--only may repeat)

Every contender runs as its own process, against the fake Gemini server of tests/
in another process, and contenders alternate within each repetition; the table
gives medians. Each child measures itself from just before its work to just after
("in-process": interpreter start-up and imports left out, as they would drown the
signal in short runs); the parent also takes the whole process's CPU time and
peak RSS from wait4(). The sections:

  ceiling    pipeline vs a minimal program making the same SDK calls for the same
             prompts with the same concurrency and nothing else (no files, no
             queues), at 0 ms server latency: CPU and wall time ratios
  scaling    at 100 ms server latency: pipeline time over the ideal ceil(n/W) x 100 ms
  machinery  --offline at 0 ms latency: prompts/s of the pipeline's own machinery
  memory     peak RSS of --offline runs over 10,000 and 1,000,000 prompts
  restart    a rerun of a finished 1,000,000-prompt --offline job: seconds and peak RSS
  postprocess  what the process pool costs with the shipped word count (against no
             post-processing at all, in the ceiling's setting), and what it buys with
             heavy_postprocess (20 ms of CPU per answer) under 100 ms latency: time
             against running it on the event loop, and the loop's longest stall
  journal    what the arrivals journal costs in the ceiling's setting: the pipeline
             against itself with the journal's write left out, and the CPU inside it
  concurrency  --workers 100, 500, 1000, 2000 at 1 s latency, 10 prompts per worker, the
             pipeline against the bare-SDK program: wall against the ideal 10 s, requests
             in flight at the server, client CPU, peak RSS; tests/concurrency.png when
             matplotlib is installed
  profile    cProfile of the pipeline and of the bare-SDK program at 1,000 workers, 1 s
             latency: CPU per request, and the time by package (waiting in epoll left out)
  longline   one 200 MB line read by pipeline.read_lines: seconds and peak RSS (linear, one line in memory)
  csv        CSV files read by pipeline.read_prompts: 40,001 rows after an unquoted cell
             holding a quote, and one 80 KB multi-line cell: CPU seconds (linear, streaming)
  capacity   a server admitting 100 requests in flight (429 with no details beyond):
             4,000 prompts at 200 ms, --workers 400 against --workers 100 with no limit
  outage     2,000 prompts at 50 ms, 20 workers; the server goes away for 20 s halfway:
             how long after its return the run ends, ids once, nothing failed
  scattered  400 prompts at 50 ms, 20 workers, 5% of requests a per-minute 429 asking 1 s
             (these three and media: --baseline DIR runs DIR/pipeline.py too, e.g. a worktree of the old main)
  versus     with --baseline DIR only: this pipeline.py against DIR's, both run by this benchmark,
             alternating: the machinery's three configurations and the ceiling's pipeline CPU
  costs      a flex request held 90 s by the server; --estimate against the full run's spend
             (10,000 prompts); a 5,000-token --context over 1,000 prompts with and without --cache
  media      1,000 rows each naming a 1 MB image, inline at 50 workers: pipeline vs the bare SDK
  notjson    200 rows with a response schema, a server answering prose: requests paid before
             the run stops (with --baseline DIR, DIR's pipeline.py too)
  transport  500 workers at 1 s latency on google-genai's two transports: httpx2 (the
             SDK's default; its pool holds 100 connections) and aiohttp (requirements.txt)
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is two times {}?"
HEAVY_CPU_S = 0.020  # CPU per answer of the heavy post-processing
STALL_TICK_S = 0.005
HEAVY_WORKERS = 10  # enough requests in flight (100/s at 100 ms) to keep the pool busy
TREE_TICK_S = 0.01  # how often TreeWatch samples a child's process tree


@dataclass
class Measure:
    wall_s: float  # in-process, around the work
    cpu_s: float  # in-process user + sys, all threads
    sys_s: float  # the kernel's part of cpu_s (file creation, fsync, sockets)
    children_cpu_s: float  # user + sys of its descendants (the post-processing pool, its fork server), sampled
    stall_s: float  # the event loop's longest stall (pipeline only)
    process_cpu_s: float  # the whole process, start-up included (wait4)
    peak_rss_mb: float  # the process alone (wait4)
    journal_cpu_s: float  # in-process, inside the arrivals journal's write (see timed_journal)
    tree_rss_mb: float = 0.0  # the largest sum of RSS over the process and its descendants, sampled
    processes: int = 1  # the most processes seen at once: it and its descendants


class TreeWatch:
    """Samples a process and its descendants every TREE_TICK_S from /proc (Linux): their
    summed RSS at its peak, the most processes at once, and each descendant's CPU time
    as last seen. A pool started from a fork server is not the process's child, so
    os.times() and wait4() leave it out."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_mb = 0.0
        self.most = 1
        self.cpu_s: dict[int, float] = {}  # descendant pid -> CPU seconds, as last seen
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.done.wait(TREE_TICK_S):
            tree = descendants(self.pid)
            rss = sum(stat_of(pid)[1] for pid in [self.pid, *tree])
            self.peak_rss_mb, self.most = max(self.peak_rss_mb, rss), max(self.most, 1 + len(tree))
            for pid in tree:
                self.cpu_s[pid] = max(self.cpu_s.get(pid, 0.0), stat_of(pid)[0])

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                continue
            found += children
            stack += children
    return found


def stat_of(pid: int) -> tuple[float, float]:
    """A process's CPU seconds (user + sys) and RSS in MB; zeros once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------ the children --
def child_pipeline(args: list[str], variant: str = "default") -> None:
    """Run pipeline.cli(args) and report how long it took from the inside. `variant`:
    "default" as shipped; "none" skips post-processing altogether (the baseline of its
    cost); "heavy" swaps in heavy_postprocess; "no-journal" is the shipped run with the
    arrivals journal's write left out (the baseline of its cost: never for real work).
    The report includes the event loop's longest stall, measured by a task that asks to
    wake every STALL_TICK_S, from the moment the client exists until the run ends, and
    the CPU time spent inside the journal's write (see timed_journal). BENCH_PIPELINE_DIR
    names another checkout's pipeline.py to run instead (see the section "versus")."""
    sys.path.insert(0, os.environ.get("BENCH_PIPELINE_DIR", str(ROOT)))
    if os.environ.get("BENCH_WITHOUT_AIOHTTP"):
        sys.modules["aiohttp"] = None  # type: ignore[assignment]  (the SDK then falls back to httpx2)
    if "--offline" not in args:
        import google.genai  # noqa: F401  (imported before the clock starts, as in the ceiling)
    import pipeline

    if variant == "none":
        pipeline.PostProcessor.run = pass_through  # type: ignore[method-assign]
    journal_cpu = [0.0]
    if variant == "no-journal":
        pipeline.ArrivalJournal.write = lambda self, responses: None  # type: ignore[method-assign]
    else:
        pipeline.ArrivalJournal.write = timed_journal(pipeline.ArrivalJournal.write, journal_cpu)  # type: ignore[method-assign]
    if variant == "heavy":
        parse_args = pipeline.parse_args
        pipeline.parse_args = lambda argv: replace(parse_args(argv), postprocess=heavy_postprocess)
    stalls = [0.0]
    connect, watchers = pipeline.connect, []

    def connect_then_watch(settings: Any) -> Any:  # creating genai's client blocks ~70 ms, before any request
        client = connect(settings)
        watchers.append(asyncio.get_running_loop().create_task(watch_stalls(stalls)))
        return client

    pipeline.connect = connect_then_watch
    started = os.times(), time.perf_counter()
    code = pipeline.cli(args)
    report(*started, code, stalls[0], journal_cpu[0])


def timed_journal(write: Callable[[Any, list[Any]], None], spent: list[float]) -> Callable[[Any, list[Any]], None]:
    """ArrivalJournal.write, adding the main thread's CPU time inside it to spent[0]. The
    records are encoded before the clock starts: the shard needs them encoded anyway,
    so the journal's own price is the rest (joining them, and the write)."""

    pipeline = sys.modules["pipeline"]
    encode = (
        pipeline.Records.journal_line if hasattr(pipeline, "Records") else lambda response: response.record_line()
    )  # an older checkout's

    def timed(journal: Any, responses: list[Any]) -> None:
        for response in responses:
            encode(response)
        started = time.thread_time()
        write(journal, responses)
        spent[0] += time.thread_time() - started

    return timed


async def pass_through(self: Any, batch: list[Any]) -> list[Any]:
    return batch


def heavy_postprocess(prompt: str, response: str) -> dict[str, Any]:
    """About HEAVY_CPU_S of CPU per answer: what a real scorer or parser might cost."""
    deadline = time.process_time() + HEAVY_CPU_S
    while time.process_time() < deadline:
        pass
    return {"word_count": len(response.split())}


async def watch_stalls(longest: list[float]) -> None:
    while True:  # cancelled when asyncio.run() ends
        asked = time.perf_counter()
        await asyncio.sleep(STALL_TICK_S)
        longest[0] = max(longest[0], time.perf_counter() - asked - STALL_TICK_S)


def child_ceiling(prompts: int, workers: int) -> None:
    """The ceiling: the same SDK calls, same prompts, same concurrency, nothing else."""
    from google import genai
    from google.genai import types

    async def main() -> None:
        client = genai.Client(http_options=types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=1)))
        watcher = asyncio.create_task(watch_stalls(stalls))
        texts = iter([PROMPT.format(i) for i in range(prompts)])

        async def worker() -> None:
            for text in texts:
                reply = await client.aio.models.generate_content(model="gemini-flash-latest", contents=text)
                assert reply.text

        await asyncio.gather(*(worker() for _ in range(workers)))
        await client.aio.aclose()
        watcher.cancel()

    stalls = [0.0]
    started = os.times(), time.perf_counter()
    asyncio.run(main())
    report(*started, 0, stalls[0])


def child_media(rows_csv: str, workers: int) -> None:
    """The media ceiling: each row's prompt and its image, inline, by the same SDK calls at the
    same concurrency, the file read in a thread as the pipeline reads it, and nothing else."""
    import csv as csv_module

    from google import genai
    from google.genai import types

    folder = Path(rows_csv).parent
    with open(rows_csv, newline="", encoding="utf-8") as file:
        rows = iter([(row["prompt"], folder / row["files"]) for row in csv_module.DictReader(file)])

    async def main() -> None:
        client = genai.Client(http_options=types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=1)))

        async def worker() -> None:
            for text, path in rows:
                data = await asyncio.to_thread(path.read_bytes)
                parts = [{"text": text}, {"inline_data": {"mime_type": "image/png", "data": data}}]
                reply = await client.aio.models.generate_content(
                    model="gemini-flash-latest", contents=[{"role": "user", "parts": parts}]
                )
                assert reply.text

        await asyncio.gather(*(worker() for _ in range(workers)))
        await client.aio.aclose()

    started = os.times(), time.perf_counter()
    asyncio.run(main())
    report(*started, 0)


def report(times: os.times_result, wall: float, code: int, stall_s: float = 0.0, journal_cpu_s: float = 0.0) -> None:
    now = os.times()
    cpu, kernel = now.user + now.system - times.user - times.system, now.system - times.system
    children = now.children_user + now.children_system - times.children_user - times.children_system
    result = {"wall_s": time.perf_counter() - wall, "cpu_s": cpu, "sys_s": kernel, "children_cpu_s": children}
    print(
        "BENCH " + json.dumps({**result, "stall_s": stall_s, "journal_cpu_s": journal_cpu_s, "code": code}), flush=True
    )


# ---------------------------------------------------------------- harness --
def measure(child_args: list[str], env: dict[str, str] | None = None, tree: bool = False) -> Measure:
    """Run a child of this script and read both its own report and wait4()'s; with `tree`,
    also sample its process tree (TreeWatch: the sampling costs CPU, so only where the
    figures need it: a pool's processes and memory)."""
    process = subprocess.Popen(
        [sys.executable, __file__, *child_args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    watch = TreeWatch(process.pid) if tree else None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if watch is not None:
        watch.stop()
    process.returncode = os.waitstatus_to_exitcode(status)
    [line] = [line for line in output.splitlines() if line.startswith("BENCH ")]
    inner = json.loads(line.removeprefix("BENCH "))
    if inner["code"] != 0:
        raise RuntimeError(f"{child_args} exited {inner['code']}")
    process_cpu = usage.ru_utime + usage.ru_stime
    children_cpu = max(inner["children_cpu_s"], sum(watch.cpu_s.values()) if watch else 0.0)
    return Measure(
        inner["wall_s"],
        inner["cpu_s"],
        inner["sys_s"],
        children_cpu,
        inner["stall_s"],
        process_cpu,
        usage.ru_maxrss / 1024,
        inner.get("journal_cpu_s", 0.0),
        max(watch.peak_rss_mb if watch else 0.0, usage.ru_maxrss / 1024),
        watch.most if watch else 1,
    )


class FakeServer:
    """tests/fake_gemini.py in its own process, so that its CPU is not counted. `flags`:
    more of its command line (--capacity, --away-after); `counts` holds what it saw, once stopped."""

    def __init__(self, latency_ms: float, *flags: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "fake_gemini.py"),
                "--port",
                "0",
                "--latency-ms",
                str(latency_ms),
                *flags,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().split()[3]
        self.env = {"GOOGLE_GEMINI_BASE_URL": self.base_url, "GEMINI_API_KEY": "benchmark-key"}
        self.counts: dict[str, Any] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.process.terminate()
        rest, _ = self.process.communicate()
        self.counts = json.loads(rest.splitlines()[-1]) if rest.strip() else {}


def make_inputs(folder: Path, prompts: int, per_file: int = 10_000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, prompts, per_file):
        lines = (PROMPT.format(i) for i in range(start, min(start + per_file, prompts)))
        (folder / f"prompts_{start // per_file}.txt").write_text("\n".join(lines) + "\n")
    return folder


def pipeline_args(inputs: Path, scratch: Path, *flags: str, variant: str = "default") -> list[str]:
    output = Path(tempfile.mkdtemp(dir=scratch))
    return ["pipeline", variant, "--input-dir", str(inputs), "--output-dir", str(output), *flags]


def alternating(
    kinds: list[str],
    reps: int,
    args_of: Callable[[str], list[str]],
    env: dict[str, str],
    tree: bool = False,
    env_of: dict[str, dict[str, str]] | None = None,
) -> dict[str, list[Measure]]:
    """`reps` runs of each kind of child, their order reversed every other repetition;
    `env_of` adds to `env` by kind."""
    runs: dict[str, list[Measure]] = {kind: [] for kind in kinds}
    for rep in range(reps):
        for kind in kinds if rep % 2 == 0 else kinds[::-1]:
            runs[kind].append(measure(args_of(kind), {**env, **(env_of or {}).get(kind, {})}, tree))
    return runs


def median(values: list[float]) -> float:
    return statistics.median(values)


def quartiles(values: list[float]) -> list[float]:
    """The first quartile, the median and the third."""
    return statistics.quantiles(values, n=4) if len(values) > 1 else values * 3


# --------------------------------------------------------------- sections --
def ceiling(scratch: Path, prompts: int, reps: int) -> None:
    """The default settings, and big shards and queues to show what files cost."""
    inputs = make_inputs(scratch / "ceiling_inputs", prompts)
    settings = {
        "default settings": [],
        "QUEUE_SIZE=100, SHARD_SIZE=1000": ["--queue-size", "100", "--shard-size", "1000"],
    }
    with FakeServer(latency_ms=0) as server:
        for workers in (5, 50):
            contenders = {"ceiling": ["ceiling", str(prompts), str(workers)]}
            for label, flags in settings.items():
                contenders[label] = ["--workers", str(workers), *flags]
            runs: dict[str, list[Measure]] = {name: [] for name in contenders}
            for rep in range(reps):
                names = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
                for name in names:
                    args = contenders[name] if name == "ceiling" else pipeline_args(inputs, scratch, *contenders[name])
                    runs[name].append(measure(args, server.env))
            c = runs["ceiling"]
            for label in settings:
                p = runs[label]
                cpu = median([a.cpu_s / b.cpu_s for a, b in zip(p, c, strict=True)])
                wall = median([a.wall_s / b.wall_s for a, b in zip(p, c, strict=True)])
                whole = median([a.process_cpu_s / b.process_cpu_s for a, b in zip(p, c, strict=True)])
                print(
                    f"| ceiling, {prompts} prompts, 0 ms, {workers} workers, {label} | CPU {cpu:.3f}x "
                    f"(whole process {whole:.3f}x), wall {wall:.3f}x | pipeline {median([m.cpu_s for m in p]):.2f} s CPU "
                    f"({median([m.sys_s for m in p]):.2f} s of it kernel) / {median([m.wall_s for m in p]):.2f} s wall; "
                    f"ceiling {median([m.cpu_s for m in c]):.2f} s ({median([m.sys_s for m in c]):.2f} s) / "
                    f"{median([m.wall_s for m in c]):.2f} s |",
                    flush=True,
                )


def scaling(scratch: Path, prompts: int, reps: int) -> None:
    """Against the ideal, and against the ceiling program under the same latency."""
    inputs = make_inputs(scratch / "scaling_inputs", prompts)
    with FakeServer(latency_ms=100) as server:
        for workers in (1, 5, 20, 50):
            pipeline_runs, ceiling_runs = [], []
            for _ in range(reps):
                pipeline_runs.append(measure(pipeline_args(inputs, scratch, "--workers", str(workers)), server.env))
                if workers > 1:  # at 1 worker both are 100 s of waiting
                    ceiling_runs.append(measure(["ceiling", str(prompts), str(workers)], server.env))
            ideal = math.ceil(prompts / workers) * 0.1
            wall = median([m.wall_s for m in pipeline_runs])
            busy = median([m.cpu_s / m.wall_s for m in pipeline_runs])
            versus = (
                f"; the ceiling program: {median([m.wall_s for m in ceiling_runs]) / ideal:.3f}x ideal"
                if ceiling_runs
                else ""
            )
            print(
                f"| scaling, {prompts} prompts, 100 ms, {workers} workers | {wall / ideal:.3f}x ideal "
                f"| {wall:.2f} s vs {ideal:.1f} s ideal; client CPU busy {busy:.0%} of the time{versus} |",
                flush=True,
            )


def machinery(scratch: Path, prompts: int, reps: int) -> None:
    inputs = make_inputs(scratch / "machinery_inputs", prompts)
    big = ["--queue-size", "100", "--shard-size", "1000"]
    settings = {
        "default settings": [],
        "QUEUE_SIZE=100, SHARD_SIZE=1000": big,
        "QUEUE_SIZE=100, SHARD_SIZE=1000, POSTPROCESS_WORKERS=0": [*big, "--postprocess-workers", "0"],
    }
    disks = (
        {"disk": scratch, "tmpfs": Path(tempfile.mkdtemp(dir="/dev/shm"))}
        if Path("/dev/shm").is_dir()
        else {"disk": scratch}
    )
    for label, flags in settings.items():
        for disk, where in disks.items():
            args = ["--offline", "--offline-latency-ms", "0", *flags]
            runs = [measure(pipeline_args(inputs, where, *args)) for _ in range(reps)]
            rate = prompts / median([m.wall_s for m in runs])
            print(
                f"| machinery, {prompts} prompts, --offline, {label}, outputs on {disk} | {rate:,.0f} prompts/s | |",
                flush=True,
            )
    for where in disks.values():
        if where != scratch:
            shutil.rmtree(where, ignore_errors=True)


def memory(scratch: Path, sizes: list[int]) -> None:
    peaks = {}
    for prompts in sizes:
        inputs = make_inputs(scratch / f"memory_inputs_{prompts}", prompts)
        flags = ["--offline", "--offline-latency-ms", "0", "--queue-size", "100", "--shard-size", "1000"]
        peaks[prompts] = measure(
            pipeline_args(inputs, scratch, *flags), tree=True
        ).tree_rss_mb  # the pool's processes too
        shutil.rmtree(inputs)
    small, large = sizes[0], sizes[-1]
    print(
        f"| memory, --offline, QUEUE_SIZE=100, SHARD_SIZE=1000 | {peaks[large] / peaks[small]:.3f}x "
        f"| peak RSS of all its processes {peaks[small]:.1f} MB at {small:,} prompts, {peaks[large]:.1f} MB at {large:,} |",
        flush=True,
    )


def restart(scratch: Path, prompts: int, reps: int) -> None:
    """A rerun of a finished job (nothing left to do): what resuming costs before any request,
    against the plainest loop that checks every input line against every shard record. The
    timed runs alternate unwatched; one more of each is watched for its processes and their
    memory (TreeWatch reads /proc a hundred times a second, which slows what it watches)."""
    inputs = make_inputs(scratch / "restart_inputs", prompts)
    flags = ["--offline", "--offline-latency-ms", "0", "--queue-size", "100", "--shard-size", "1000"]
    args = pipeline_args(inputs, scratch, *flags)
    first = measure(args, tree=True)

    def args_of(kind: str) -> list[str]:
        return args if kind == "pipeline" else ["plain_restart", *args[3:6:2]]

    runs = alternating(["pipeline", "plain"], reps, args_of, {})
    watched = {kind: measure(args_of(kind), tree=True) for kind in ("pipeline", "plain")}
    rerun, plain = runs["pipeline"], runs["plain"]
    print(
        f"| restart, rerun of a finished {prompts:,}-prompt --offline job | {median([m.wall_s for m in rerun]):.2f} s "
        f"against the plain loop's {median([m.wall_s for m in plain]):.2f} s | whole processes {median([m.process_cpu_s for m in rerun]):.2f} s "
        f"against {median([m.process_cpu_s for m in plain]):.2f} s CPU; medians of {reps}, alternating; watched once: peak RSS "
        f"{watched['pipeline'].tree_rss_mb:.0f} MB in {watched['pipeline'].processes} process(es), the plain loop "
        f"{watched['plain'].tree_rss_mb:.0f} MB; the first run: {first.wall_s:.1f} s, {first.tree_rss_mb:.0f} MB in {first.processes} |",
        flush=True,
    )
    shutil.rmtree(inputs)


def child_plain_restart(inputs: str, outputs: str) -> None:
    """The plainest resume: every shard record read with json.loads, then every input line
    checked against them (its id, file:line, answered with this very prompt)."""
    times, wall = os.times(), time.perf_counter()
    answered = {}
    for path in Path(outputs).glob("shard_*.jsonl"):
        with open(path, encoding="utf-8") as file:
            for line in file:
                record = json.loads(line)
                answered[record["id"]] = record["prompt"]
    unanswered = 0
    for path in Path(inputs).iterdir():
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                text = line.rstrip("\n")
                unanswered += bool(text.strip()) and answered.get(f"{path.name}:{number}") != text
    report(times, wall, 1 if unanswered else 0)


def postprocessing(scratch: Path, prompts: int, heavy_prompts: int, reps: int, cost_reps: int) -> None:
    """What the pool costs when postprocess() is cheap (the shipped word count, against no
    post-processing at all, in the ceiling's setting), and what it buys when it is heavy."""
    inputs = make_inputs(scratch / "postprocess_inputs", prompts)
    with FakeServer(latency_ms=0) as server:
        for workers in (5, 50):

            def postprocessed(kind: str, workers: int = workers) -> list[str]:
                no_pool = ["--postprocess-workers", "0"] if kind == "none" else []
                return pipeline_args(inputs, scratch, "--workers", str(workers), *no_pool, variant=kind)

            runs = alternating(["default", "none"], cost_reps, postprocessed, server.env, tree=True)  # the pool's CPU
            pairs = list(zip(runs["default"], runs["none"], strict=True))
            cpu = median([a.cpu_s / b.cpu_s for a, b in pairs])
            pool = median([(a.cpu_s + a.children_cpu_s) / b.cpu_s for a, b in pairs])
            wall = median([a.wall_s / b.wall_s for a, b in pairs])
            print(
                f"| postprocess cost, {prompts} prompts, 0 ms, {workers} workers, word count in the pool "
                f"vs no post-processing | CPU {cpu:.3f}x (pool processes included {pool:.3f}x), wall {wall:.3f}x "
                f"| {median([m.cpu_s for m in runs['default']]):.2f} s vs {median([m.cpu_s for m in runs['none']]):.2f} s CPU |",
                flush=True,
            )
    inputs = make_inputs(scratch / "heavy_inputs", heavy_prompts)
    processes = str(os.cpu_count() or 1)
    with FakeServer(latency_ms=100) as server:
        runs: dict[str, list[Measure]] = {processes: [], "0": [], "ceiling": []}
        for rep in range(reps):
            for count in (processes, "0") if rep % 2 == 0 else ("0", processes):
                args = pipeline_args(
                    inputs, scratch, "--workers", str(HEAVY_WORKERS), "--postprocess-workers", count, variant="heavy"
                )
                runs[count].append(measure(args, server.env, tree=True))  # the pool's CPU
            runs["ceiling"].append(measure(["ceiling", str(heavy_prompts), str(HEAVY_WORKERS)], server.env))
        pool, inline = runs[processes], runs["0"]
        speedup = median([b.wall_s / a.wall_s for a, b in zip(pool, inline, strict=True)])
        print(
            f"| postprocess heavy ({HEAVY_CPU_S * 1000:.0f} ms CPU each), {heavy_prompts} prompts, 100 ms, {HEAVY_WORKERS} workers "
            f"| pool of {processes} {speedup:.2f}x faster than inline; longest event-loop stall "
            f"{median([m.stall_s for m in pool]) * 1000:.1f} ms vs {median([m.stall_s for m in inline]) * 1000:.1f} ms "
            f"| {median([m.wall_s for m in pool]):.2f} s vs {median([m.wall_s for m in inline]):.2f} s; the ceiling "
            f"program's own longest stall (SDK only, no post-processing): {median([m.stall_s for m in runs['ceiling']]) * 1000:.1f} ms |",
            flush=True,
        )


def journal(scratch: Path, prompts: int, reps: int) -> None:
    """What the arrivals journal costs where it costs the most: in the ceiling's setting
    (0 ms latency, default settings: answers are taken one or two at a time, so nearly
    one write each), the pipeline as shipped against the same pipeline with the journal's
    write left out, alternating. The pairs' ratios are given with their middle half (the
    machine's own noise), and the CPU spent inside the write, measured from the inside."""
    inputs = make_inputs(scratch / "journal_inputs", prompts)
    with FakeServer(latency_ms=0) as server:
        for workers in (5, 50):

            def journaled(kind: str, workers: int = workers) -> list[str]:
                return pipeline_args(inputs, scratch, "--workers", str(workers), variant=kind)

            runs = alternating(["default", "no-journal"], reps, journaled, server.env)
            pairs = list(zip(runs["default"], runs["no-journal"], strict=True))
            cpu = quartiles([a.cpu_s / b.cpu_s for a, b in pairs])
            wall = quartiles([a.wall_s / b.wall_s for a, b in pairs])
            inside = median([m.journal_cpu_s / m.cpu_s for m in runs["default"]])
            print(
                f"| journal cost, {prompts} prompts, 0 ms, {workers} workers, default settings, with vs without the "
                f"journal | CPU {cpu[1]:.3f}x (middle half {cpu[0]:.3f} to {cpu[2]:.3f}), wall {wall[1]:.3f}x "
                f"({wall[0]:.3f} to {wall[2]:.3f}) | {reps} pairs; inside the journal's write: "
                f"{median([m.journal_cpu_s for m in runs['default']]) * 1000:.1f} ms, {inside:.1%} of the run's CPU |",
                flush=True,
            )


def transport(scratch: Path, workers: int, reps: int) -> None:
    """Whether --workers N really puts N requests in flight, on each of the SDK's transports."""
    prompts = workers * 5
    inputs = make_inputs(scratch / "transport_inputs", prompts)
    ideal = 5 * 1.0
    with FakeServer(latency_ms=1000) as server:
        for name, env in (("httpx2", {"BENCH_WITHOUT_AIOHTTP": "1"}), ("aiohttp", {})):
            runs = [
                measure(
                    pipeline_args(inputs, scratch, "--workers", str(workers), "--shard-size", "1000"),
                    {**server.env, **env},
                )
                for _ in range(reps)
            ]
            wall = median([m.wall_s for m in runs])
            print(
                f"| transport {name}, {prompts} prompts, 1 s, {workers} workers | {wall / ideal:.2f}x ideal "
                f"| {wall:.1f} s vs {ideal:.0f} s ideal; peak RSS {median([m.peak_rss_mb for m in runs]):.0f} MB |",
                flush=True,
            )


def concurrency(scratch: Path, counts: list[int], reps: int) -> None:
    """Whether --workers N puts N requests in flight, and what the pipeline adds to bare SDK
    calls at that concurrency: medians of `reps` runs, the two contenders alternating. The
    fake server runs in this process, so that it can count the requests in flight (its CPU
    is not the child's)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_gemini import FakeGemini

    rows = []
    for workers in counts:
        prompts = workers * 10
        inputs = make_inputs(scratch / f"concurrency_{workers}", prompts)
        runs: dict[str, list[tuple[Measure, int]]] = {"pipeline": [], "bare SDK": []}
        for _ in range(reps):
            for name, measured in runs.items():
                if name == "pipeline":
                    args = pipeline_args(inputs, scratch, "--workers", str(workers), "--shard-size", "1000")
                else:
                    args = ["ceiling", str(prompts), str(workers)]
                with FakeGemini(latency_s=1.0) as server:
                    run = measure(args, {"GOOGLE_GEMINI_BASE_URL": server.base_url, "GEMINI_API_KEY": "benchmark-key"})
                    arrivals = sorted(request.at for request in server.requests)
                measured.append((run, max(bisect.bisect_left(arrivals, at + 1.0) - i for i, at in enumerate(arrivals))))
        for name, measured in runs.items():
            wall = median([run.wall_s for run, _ in measured])
            cpu = median([run.process_cpu_s for run, _ in measured])
            rows.append((workers, name, prompts / wall))
            print(
                f"| concurrency, {name}, {workers} workers, {prompts} prompts, 1 s | {wall / 10:.2f}x ideal "
                f"| median of {reps}: {wall:.1f} s vs 10 s (runs {', '.join(f'{run.wall_s:.1f}' for run, _ in measured)}); "
                f"{median([flying for _, flying in measured]):.0f} requests in flight at the server; client CPU {cpu:.1f} s "
                f"({cpu / prompts * 1000:.2f} ms per request); peak RSS {max(run.peak_rss_mb for run, _ in measured):.0f} MB |",
                flush=True,
            )
        pipeline_wall, bare_wall = (median([run.wall_s for run, _ in runs[name]]) for name in runs)
        print(
            f"| concurrency, {workers} workers: pipeline over bare SDK | {pipeline_wall / bare_wall:.2f}x wall | |",
            flush=True,
        )
    draw_concurrency(rows, ROOT / "tests" / "concurrency.png")


def draw_concurrency(rows: list[tuple[int, str, float]], path: Path) -> None:
    """Prompts/s against workers, for the pipeline, the bare SDK and the ideal: a curve reads faster than a table."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no picture")
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    workers = sorted({w for w, _, _ in rows})
    axes.plot(workers, workers, "k--", label="ideal (workers / 1 s)")
    for name, style in (("pipeline", "o-"), ("bare SDK", "s-")):
        axes.plot([w for w, n, _ in rows if n == name], [r for _, n, r in rows if n == name], style, label=name)
    axes.set(xlabel="--workers", ylabel="prompts/s", title="1 s latency, 10 prompts per worker, 2-core VM")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"# picture: {path.relative_to(ROOT)}")


def child_profile(which: str, inputs: str, output: str, workers: int) -> None:
    """Run the pipeline or the bare-SDK program under cProfile; print its time by package."""
    import collections
    import cProfile
    import pstats

    sys.path.insert(0, str(ROOT))
    prompts = sum(1 for path in Path(inputs).iterdir() for _ in path.open())
    profile = cProfile.Profile()
    started = time.process_time()
    profile.enable()
    if which == "pipeline":
        import pipeline

        pipeline.cli(["--input-dir", inputs, "--output-dir", output, "--workers", str(workers), "--shard-size", "1000"])
    else:
        child_ceiling(prompts, workers)
    profile.disable()
    cpu = time.process_time() - started
    packages: collections.Counter[str] = collections.Counter()
    for (path, _, name), (_, _, own_s, _, _) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        if name == "<method 'poll' of 'select.epoll' objects>":
            continue  # waiting, not working
        packages[next((label for key, label in PACKAGES if key in path), "other")] += own_s
    shares = ", ".join(f"{label} {seconds:.2f} s" for label, seconds in packages.most_common())
    print(
        f"| profile, {which}, {workers} workers, {prompts} prompts, 1 s | {cpu / prompts * 1000:.2f} ms CPU per request under cProfile | {shares} |"
    )


PACKAGES = [
    ("pipeline.py", "pipeline.py"),
    ("google/genai", "google-genai"),
    ("pydantic", "pydantic"),
    ("aiohttp", "aiohttp"),
    ("/asyncio/", "asyncio"),
    ("/json/", "json"),
    ("~", "builtins"),
]


def profile(scratch: Path, workers: int) -> None:
    """Where the CPU goes, the pipeline and the bare-SDK program side by side, at 1 s latency."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_gemini import FakeGemini

    inputs = make_inputs(scratch / "profile_inputs", workers * 10)
    for which in ("pipeline", "bare SDK"):
        output = tempfile.mkdtemp(dir=scratch)
        with FakeGemini(latency_s=1.0) as server:
            env = {**os.environ, "GOOGLE_GEMINI_BASE_URL": server.base_url, "GEMINI_API_KEY": "benchmark-key"}
            args = [sys.executable, __file__, "profile", which, str(inputs), output, str(workers)]
            done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
        print(next(line for line in done.stdout.splitlines() if line.startswith("| profile")), flush=True)


def child_longline(path: str) -> None:
    """Read one file's lines through the pipeline's reader; report time and peak RSS."""
    sys.path.insert(0, str(ROOT))
    import resource

    import pipeline

    async def read() -> int:
        return sum([len(line) async for _, lines in pipeline.read_lines(Path(path)) for line in lines])

    started = time.perf_counter()
    size = asyncio.run(read())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"| longline, a {size / 1e6:.0f} MB line | {time.perf_counter() - started:.2f} s | peak RSS {peak:.0f} MB |",
        flush=True,
    )


def longline(scratch: Path, megabytes: int) -> None:
    path = scratch / "longline.txt"
    path.write_bytes(b"x" * (megabytes * 1_000_000))
    subprocess.run([sys.executable, __file__, "longline", str(path)], check=True)
    path.unlink()


def child_csv(path: str) -> None:
    """Make every prompt of one CSV file through the pipeline's reader; report CPU seconds."""
    sys.path.insert(0, str(ROOT))
    import pipeline

    async def read() -> int:
        return sum([len(run) async for run in pipeline.read_prompts(Path(path), pipeline.PromptMaker({}))])

    started = time.process_time()  # the worker thread's CPU included
    count = asyncio.run(read())
    print(f"| csv, {Path(path).stem} | {time.process_time() - started:.2f} s CPU | {count:,} prompts |", flush=True)


def csv_rows(scratch: Path) -> None:
    quoted = scratch / "40001-rows-after-a-quote.csv"
    quoted.write_text(
        'id,prompt\nr0,The 5" screen\n' + "".join(f"r{i},What is two times {i}?\n" for i in range(1, 40_001))
    )
    cell = scratch / "an-80-KB-multi-line-cell.csv"
    cell.write_text('id,prompt\nr0,"' + "\n".join(f"line {i} of a long cell" for i in range(4000)) + '"\n')
    for path in (quoted, cell):
        subprocess.run([sys.executable, __file__, "csv", str(path)], check=True)


def parquet(scratch: Path, rows: int, reps: int) -> None:
    """The same rows of 400-character prompts as one Parquet file (row groups of 10,000) and
    as one JSONL file, --offline with no latency, alternating: what reading Parquet costs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [f"{i:08d} " + ("Summarise the following passage in one sentence. " * 8)[:391] for i in range(rows)]
    folders = {kind: scratch / f"parquet_{kind}" for kind in ("parquet", "jsonl")}
    for folder in folders.values():
        folder.mkdir()
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": prompts}),
        folders["parquet"] / "rows.parquet",
        row_group_size=10_000,
    )
    with open(folders["jsonl"] / "rows.jsonl", "w") as file:
        file.writelines(json.dumps({"id": f"r{i}", "prompt": prompt}) + "\n" for i, prompt in enumerate(prompts))
    flags = ["--offline", "--offline-latency-ms", "0", "--workers", "100", "--shard-size", "1000"]
    runs = alternating(
        ["parquet", "jsonl"], reps, lambda kind: pipeline_args(folders[kind], scratch, *flags), {}, tree=True
    )
    wall = {kind: median([m.wall_s for m in runs[kind]]) for kind in runs}
    rss = {kind: median([m.tree_rss_mb for m in runs[kind]]) for kind in runs}
    print(
        f"| parquet, {rows:,} rows of 400-char prompts, --offline --offline-latency-ms 0 | {wall['parquet'] / wall['jsonl']:.2f}x the time, "
        f"{rss['parquet'] / rss['jsonl']:.2f}x the peak memory of the same rows as JSONL | {wall['parquet']:.1f} s and {rss['parquet']:.0f} MB "
        f"against {wall['jsonl']:.1f} s and {rss['jsonl']:.0f} MB; medians of {reps}, alternating |",
        flush=True,
    )
    for folder in folders.values():
        shutil.rmtree(folder)


def user_run(
    root: Path, inputs: Path, scratch: Path, flags: list[str], server: FakeServer, timeout_s: float
) -> dict[str, Any]:
    """`python pipeline.py` of the checkout at `root`, as a user runs it: wall time from the
    outside (start-up included), exit status (None: still running after `timeout_s`), ids written."""
    output = Path(tempfile.mkdtemp(dir=scratch))
    args = [sys.executable, str(root / "pipeline.py"), "--input-dir", str(inputs), "--output-dir", str(output), *flags]
    started = time.time()
    try:
        code: int | None = subprocess.run(
            args, env={**os.environ, **server.env}, capture_output=True, timeout=timeout_s, check=False
        ).returncode
    except subprocess.TimeoutExpired:
        code = None
    ended = time.time()
    ids = [json.loads(line)["id"] for shard in output.glob("shard_*.jsonl") for line in shard.open()]
    failed = output / "failed.jsonl"
    return {
        "code": code,
        "wall_s": ended - started,
        "ended": ended,
        "ids": len(ids),
        "unique_ids": len(set(ids)),
        "failed": sum(1 for _ in failed.open()) if failed.exists() else 0,
    }


def checkouts(baseline: str | None) -> dict[str, Path]:
    """This checkout, and the one --baseline names (e.g. a git worktree of an older main)."""
    return {"this": ROOT, **({"baseline": Path(baseline)} if baseline else {})}


def versus(scratch: Path, reps: int, baseline: str | None) -> None:
    """This pipeline.py against --baseline's, both run by this benchmark's child, alternating
    within each repetition: the machinery (100,000 prompts --offline, prompts/s) and the
    ceiling's pipeline (2,000 prompts at 0 ms, CPU seconds), medians."""
    if baseline is None:
        raise SystemExit("--only versus needs --baseline DIR (a checkout of the code to compare with)")
    sides = {name: {"BENCH_PIPELINE_DIR": str(path)} for name, path in checkouts(baseline).items()}
    inputs = make_inputs(scratch / "versus_inputs", 100_000)
    big = ["--queue-size", "100", "--shard-size", "1000"]
    for label, flags in {
        "default settings": [],
        "QUEUE_SIZE=100, SHARD_SIZE=1000": big,
        "and POSTPROCESS_WORKERS=0": [*big, "--postprocess-workers", "0"],
    }.items():
        runs = alternating(
            list(sides),
            reps,
            lambda side, flags=flags: pipeline_args(inputs, scratch, "--offline", "--offline-latency-ms", "0", *flags),
            {},
            env_of=sides,
        )
        rates = {side: [100_000 / m.wall_s for m in runs[side]] for side in sides}
        print(
            f"| versus, machinery, {label} | {median(rates['this']) / median(rates['baseline']):.2f}x | "
            f"{median(rates['this']):,.0f} against {median(rates['baseline']):,.0f} prompts/s; runs {[round(r) for r in rates['this']]} against {[round(r) for r in rates['baseline']]} |",
            flush=True,
        )
    inputs = make_inputs(scratch / "versus_ceiling_inputs", 2000)
    with FakeServer(latency_ms=0) as server:
        for workers, flags in (("5", []), ("5", big), ("50", []), ("50", big)):
            runs = alternating(
                list(sides),
                reps,
                lambda side, workers=workers, flags=flags: pipeline_args(inputs, scratch, "--workers", workers, *flags),
                server.env,
                env_of=sides,
            )
            cpu = {side: median([m.cpu_s for m in runs[side]]) for side in sides}
            print(
                f"| versus, ceiling's pipeline, {workers} workers{', ' + ' '.join(flags) if flags else ''} | CPU {cpu['this'] / cpu['baseline']:.3f}x | "
                f"{cpu['this']:.2f} against {cpu['baseline']:.2f} s |",
                flush=True,
            )


def capacity(scratch: Path, prompts: int, reps: int, baseline: str | None) -> None:
    """A server that admits 100 requests in flight and answers 429 (no details) beyond:
    --workers 400 against it, and the control: --workers 100 against no limit."""
    inputs = make_inputs(scratch / "capacity_inputs", prompts, per_file=1000)
    cases = {
        "--workers 100, no limit": ([], ["--workers", "100"]),
        "--workers 400, server admits 100": (["--capacity", "100"], ["--workers", "400"]),
    }
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(reps):
        for name, root in checkouts(baseline).items():
            for case, (server_flags, flags) in cases.items() if rep % 2 == 0 else reversed(cases.items()):
                with FakeServer(200, *server_flags) as server:
                    run = user_run(
                        root, inputs, scratch, [*flags, "--queue-size", "1000", "--shard-size", "1000"], server, 90
                    )
                runs.setdefault((name, case), []).append({**run, **server.counts})
    for name in checkouts(baseline):
        control = median([r["wall_s"] for r in runs[(name, "--workers 100, no limit")]])
        for case in cases:
            done = runs[(name, case)]
            wall = median([r["wall_s"] for r in done])
            refused = median([r["refused_full"] / max(r["requests"], 1) for r in done])
            finished = (
                "all finished"
                if all(r["code"] == 0 for r in done)
                else f"exit statuses {[r['code'] for r in done]} (None: stopped after 90 s)"
            )
            print(
                f"| unstated capacity, {prompts} prompts, 200 ms, {case} ({name}) | {wall:.2f} s, {wall / control:.2f}x its control "
                f"| ideal {prompts / 100 * 0.2:.0f} s; 429s {refused:.1%} of requests; ids written {median([r['unique_ids'] for r in done]):.0f}; {finished} |",
                flush=True,
            )


def outage(scratch: Path, prompts: int, reps: int, baseline: str | None) -> None:
    """A server that goes away (refusing connections) for 20 s after half the requests, and
    comes back on the same port: how soon after its return the run ends, and how it ends."""
    inputs = make_inputs(scratch / "outage_inputs", prompts, per_file=500)
    for name, root in checkouts(baseline).items():
        for _ in range(reps):
            with FakeServer(50, "--away-after", str(prompts // 2), "--away-s", "20") as server:
                run = user_run(root, inputs, scratch, ["--workers", "20"], server, 180)
            after = run["ended"] - server.counts["back_at"] if server.counts.get("back_at") else float("nan")
            print(
                f"| outage, {prompts} prompts, 50 ms, 20 workers, server away 20 s ({name}) | exit {run['code']}, "
                f"{after:.1f} s after the server's return | ids written {run['unique_ids']} of {prompts} (each once: "
                f"{run['ids'] == run['unique_ids']}); {run['failed']} in failed.jsonl; paid twice {server.counts['paid'] - server.counts['prompts_paid']} |",
                flush=True,
            )


def scattered(scratch: Path, prompts: int, reps: int, baseline: str | None) -> None:
    """5% of requests answered with a per-minute 429 (QuotaFailure) asking for 1 s: every
    such 429 holds every worker (the shared back-off), as before the server-full limit."""
    inputs = make_inputs(scratch / "scattered_inputs", prompts, per_file=100)
    walls: dict[str, list[float]] = {}
    for rep in range(reps):
        for name, root in (
            list(checkouts(baseline).items()) if rep % 2 == 0 else list(checkouts(baseline).items())[::-1]
        ):
            with FakeServer(50, "--per-minute-429s", "0.05") as server:
                run = user_run(root, inputs, scratch, ["--workers", "20"], server, 180)
            assert run["code"] == 0 and run["unique_ids"] == prompts, run
            walls.setdefault(name, []).append(run["wall_s"])
    for name, times in walls.items():
        print(
            f"| scattered 429s, {prompts} prompts, 50 ms, 20 workers, 5% per-minute 429s asking 1 s ({name}) | {median(times):.2f} s | runs: {', '.join(f'{t:.2f}' for t in times)} |",
            flush=True,
        )


def costs(scratch: Path, prompts: int) -> None:
    """Issue 26's levers end to end, `python pipeline.py` against the fake server (here, in a
    thread: its behaviour is a function): a flex request the server holds 90 s; --estimate
    against the spend of the full run of the same `prompts`; a 5,000-token --context over
    1,000 prompts with --cache and without."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_cache import context_of, spend_of, varied_prompts

    from fake_gemini import FakeGemini, echo

    def pipeline(inputs: Path, server: FakeGemini, *flags: str) -> subprocess.CompletedProcess[str]:
        args = [
            sys.executable,
            str(ROOT / "pipeline.py"),
            "--input-dir",
            str(inputs),
            "--output-dir",
            tempfile.mkdtemp(dir=scratch),
            *flags,
        ]
        env = {**os.environ, "GOOGLE_GEMINI_BASE_URL": server.base_url, "GEMINI_API_KEY": "benchmark-key"}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)

    inputs = make_inputs(scratch / "flex_inputs", 5, per_file=5)
    held = PROMPT.format(0)
    with FakeGemini(lambda request: replace(echo(request), delay_s=90.0 if request.prompt == held else 0.0)) as server:
        started = time.perf_counter()
        done = pipeline(inputs, server, "--service-tier", "flex")
        wall = time.perf_counter() - started
    print(
        f"| flex, the server holds one of 5 requests 90 s | exit {done.returncode} after {wall:.1f} s | that prompt asked "
        f"{sum(r.prompt == held for r in server.requests)} time(s), answered {server.answered[held]}; X-Server-Timeout "
        f"{server.requests[0].server_timeout} |",
        flush=True,
    )
    inputs = scratch / "estimate_inputs"
    inputs.mkdir()
    for start in range(0, prompts, 1000):
        (inputs / f"prompts_{start // 1000}.txt").write_text(
            "\n".join(varied_prompts(prompts)[start : start + 1000]) + "\n"
        )
    with FakeGemini() as server:
        estimated = pipeline(inputs, server, "--estimate")
        counted = len(server.count_tokens_requests)
        spent = pipeline(inputs, server, "--workers", "50", "--shard-size", "1000")
    standard = float(estimated.stdout.split("standard", 1)[1].split("$", 1)[1].split()[0])
    print(
        f"| --estimate, {prompts:,} prompts of 20 to 40 words | standard {standard:.4f} $ against the full run's {spend_of(spent.stderr):.4f} $: "
        f"{standard / spend_of(spent.stderr):.3f}x | countTokens {counted}, generateContent during the estimate 0 (then {len(server.requests)} for the run) |",
        flush=True,
    )
    inputs = make_inputs(scratch / "cache_inputs", 1000, per_file=100)
    context = context_of(scratch, 5000)
    with FakeGemini() as server:
        cached = pipeline(
            inputs, server, "--context", str(context), "--cache", "--workers", "50", "--shard-size", "1000"
        )
        events = list(server.cache_events)
        plain = pipeline(inputs, server, "--context", str(context), "--workers", "50", "--shard-size", "1000")
    print(
        f"| --context of 5,000 tokens over 1,000 prompts, --cache against none | spend {spend_of(cached.stderr):.4f} $ against "
        f"{spend_of(plain.stderr):.4f} $: {spend_of(cached.stderr) / spend_of(plain.stderr):.3f}x | cache calls: "
        f"{', '.join(event for event, _ in events)}; exits {cached.returncode}, {plain.returncode} |",
        flush=True,
    )


def media(scratch: Path, prompts: int, reps: int, baseline: str | None) -> None:
    """Rows naming 1 MB images, sent inline at 50 workers, 0 ms: the pipeline against the
    bare SDK sending the same parts (child_media), and --baseline's pipeline, alternating."""
    inputs = scratch / "media_inputs"
    (inputs / "images").mkdir(parents=True)
    for i in range(100):
        (inputs / "images" / f"image_{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(1_000_000))
    (inputs / "rows.csv").write_text(
        "id,prompt,files\n"
        + "".join(f"r{i},describe picture {i},images/image_{i % 100:03d}.png\n" for i in range(prompts))
    )
    sides = {name: {"BENCH_PIPELINE_DIR": str(path)} for name, path in checkouts(baseline).items()}
    with FakeServer(latency_ms=0) as server:

        def args_of(kind: str) -> list[str]:
            if kind == "sdk":
                return ["media", str(inputs / "rows.csv"), "50"]
            return pipeline_args(inputs, scratch, "--workers", "50", "--queue-size", "100", "--shard-size", "1000")

        runs = alternating(["sdk", *sides], reps, args_of, server.env, env_of=sides)
    c = runs["sdk"]
    for name in sides:
        p = runs[name]
        print(
            f"| media, {name}, {prompts} rows each naming a 1 MB image (100 distinct), inline, 50 workers, 0 ms | wall "
            f"{median([a.wall_s / b.wall_s for a, b in zip(p, c, strict=True)]):.3f}x the bare SDK's, CPU "
            f"{median([a.cpu_s / b.cpu_s for a, b in zip(p, c, strict=True)]):.3f}x | pipeline {median([m.wall_s for m in p]):.2f} s wall, "
            f"{median([m.cpu_s for m in p]):.2f} s CPU; the SDK alone {median([m.wall_s for m in c]):.2f} s, {median([m.cpu_s for m in c]):.2f} s; medians of {reps} |",
            flush=True,
        )
    shutil.rmtree(inputs)


def notjson(scratch: Path, baseline: str | None) -> None:
    """Issue 34's run: 200 rows with a response schema against a server answering prose.
    Each checkout's pipeline.py as a user runs it: requests paid, exit status, seconds."""
    inputs = scratch / "notjson_inputs"
    inputs.mkdir()
    (inputs / "rows.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"label review {i}"}) + "\n" for i in range(200))
    )
    schema = scratch / "label_schema.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]})
    )
    for name, tree in checkouts(baseline).items():
        with FakeServer(0, "--prose") as server:
            started = time.monotonic()
            args = [
                sys.executable,
                str(tree / "pipeline.py"),
                "--input-dir",
                str(inputs),
                "--output-dir",
                tempfile.mkdtemp(dir=scratch),
                "--response-schema",
                str(schema),
                "--retry-base-s",
                "0.01",
            ]
            done = subprocess.run(args, env={**os.environ, **server.env}, capture_output=True, text=True, check=False)
            wall = time.monotonic() - started
        print(
            f"| not JSON, {name}: 200 rows with a schema, a server answering prose | {server.counts['requests']} requests, exit "
            f"{done.returncode} | {wall:.1f} s; its last line: {done.stderr.strip().splitlines()[-1][:120]} |",
            flush=True,
        )


SECTIONS = [
    "ceiling",
    "scaling",
    "machinery",
    "memory",
    "restart",
    "postprocess",
    "journal",
    "transport",
    "concurrency",
    "profile",
    "longline",
    "csv",
    "parquet",
    "capacity",
    "outage",
    "scattered",
    "versus",
    "costs",
    "media",
    "notjson",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repetitions")
    parser.add_argument("--only", choices=[*SECTIONS], action="append")
    parser.add_argument(
        "--baseline",
        help="capacity, outage, scattered, versus, media, notjson: also run the pipeline.py of this checkout (a git worktree of an older commit)",
    )
    args = parser.parse_args()
    quick = args.quick
    only = set(args.only or SECTIONS)
    print(f"# {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    print(f"# {sys.executable} {' '.join(sys.argv[1:]) or ''}".rstrip())
    print("| what | result | details |\n|---|---|---|", flush=True)
    # Outputs go where a user's would: on the disk the repo is on. (On the machine these
    # figures come from, creating a file under /tmp costs ten times the kernel time.)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", ROOT / "tests"), prefix=".bench-") as folder:
        scratch = Path(folder)
        if "ceiling" in only:
            ceiling(scratch, 500 if quick else 2000, 3 if quick else 7)
        if "scaling" in only:
            scaling(scratch, 200 if quick else 1000, 1 if quick else 3)
        if "machinery" in only:
            machinery(scratch, 20_000 if quick else 100_000, 1 if quick else 3)
        if "memory" in only:
            memory(scratch, [10_000, 100_000 if quick else 1_000_000])
        if "restart" in only:
            restart(scratch, 100_000 if quick else 1_000_000, 1 if quick else 3)
        if "postprocess" in only:
            postprocessing(
                scratch, 500 if quick else 2000, 100 if quick else 300, 1 if quick else 5, 1 if quick else 11
            )
        if "journal" in only:
            journal(scratch, 500 if quick else 2000, 1 if quick else 41)
        if "transport" in only:
            transport(scratch, 500, 1 if quick else 3)
        if "concurrency" in only:
            concurrency(scratch, [100, 500] if quick else [100, 500, 1000, 2000], 1 if quick else 3)
        if "profile" in only:
            profile(scratch, 1000)
        if "longline" in only:
            longline(scratch, 200)
        if "csv" in only:
            csv_rows(scratch)
        if "parquet" in only:
            parquet(scratch, 30_000 if quick else 300_000, 1 if quick else 3)
        if "capacity" in only:
            capacity(scratch, 4000, 1 if quick else 3, args.baseline)
        if "outage" in only:
            outage(scratch, 2000, 1, args.baseline)
        if "scattered" in only:
            scattered(scratch, 400, 1 if quick else 4, args.baseline)
        if "media" in only:
            media(scratch, 200 if quick else 1000, 1 if quick else 3, args.baseline)
        if "notjson" in only:
            notjson(scratch, args.baseline)
        if "costs" in only:
            costs(scratch, 2000 if quick else 10_000)
        if "versus" in only and args.baseline:
            versus(scratch, 2 if quick else 6, args.baseline)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "pipeline":
        child_pipeline(sys.argv[3:], variant=sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "profile":
        child_profile(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "longline":
        child_longline(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "csv":
        child_csv(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "plain_restart":
        child_plain_restart(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "media":
        child_media(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "ceiling":
        child_ceiling(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
