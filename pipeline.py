"""Run a folder of prompt files through Gemini, many requests at once, into sharded JSON Lines.

    python pipeline.py --offline          # try it: a built-in simulated model, no key needed
    GEMINI_API_KEY=... python pipeline.py # the real thing

Each *.jsonl, *.csv or *.parquet file in INPUT_DIR holds a request per row (its own id, system
instruction, generation settings, the files it asks about, fields of yours); in any other file each
non-blank line is one prompt, known by the id "<file name>:<line number>".
Answers go to OUTPUT_DIR/shard_00000.jsonl,
shard_00001.jsonl, ... (SHARD_SIZE records each); prompts that failed for good
go to OUTPUT_DIR/failed.jsonl with the reason. Run the same command again after
a crash or Ctrl-C and it continues: answered prompts are skipped, failed ones
retried. Exit status: 0 all answered, 1 some failed, 2 bad settings, input or
key, 130 interrupted (143 by SIGTERM).

How it is built: what you edit, the shape of a run, then the machinery each stage leans on.
  settings   the constants below: each declared once (value, kind, comment), and each also
             a flag (SETTINGS, read into Settings); GENERATION_FIELDS, REQUEST_FIELDS and
             BUDGET_FIELDS, the ones every request carries (the job's, the run's, and what
             bounds an answer's length); PRICES, TIER_PRICES; and postprocess(), yours to edit
  records    Prompt in (a NamedTuple: never changed); Response or Failure out; RECORD, their
             fields in the output files, declared once; Records, the one codec of every line
             written and read back; AnswerFormat, the JSON an answer must be; Tally, the counts of
             what happened; Run, what the stages of one run share (the queues, the settings,
             the client, the Limits every request passes, the Progress, each stage's own part)
  main       main(): open_run (in phases: the Job, the host and the lock, the past, the
             parts), start what an earlier run left (start_leftovers), one reader,
             WORKERS generators and one writer (READERS and WRITERS more), wait until every
             prompt is answered (all_answered), shut down (shut_down) on success, error and
             Ctrl-C alike; stops at once if a stage dies (supervised)
  stages     the three coroutines, linked by two bounded queues: read_inputs streams prompts
             from the input files, routed by PastRuns.route; generate_content asks the model
             for each; write_outputs takes the outcomes (each answer journaled as it is
             taken) and hands each batch to its Writer, whose write() does the rest
  requests   Job: the job's settings, context and identity, made once; PromptMaker: how
             rows become requests, the run's settings (validated through
             google-genai's types) with a row's own over them, and CONTEXT sent first (or the
             run's cache named: naming, contents); Ids, one namespace for all
  reader     each input file as its InputFormat says (INPUT_FORMATS: lines, JSONL rows; CSV,
             TSV and Parquet Rows through rows_format and from_row), streaming; each checked at
             start-up (inputs_checked: a table's header, a data file that holds no prompts)
  asking     answer(): one prompt's attempts, retried in place, never re-queued, so never
             deadlocked; retried(), the one loop that tries any API call again, as its
             RetryPolicy says (GENERATION, API_CALL, POLL, COUNT, DELETE...; classify,
             backoff_s, wait_to_retry), for prompts, caches, files, counts and batches; an answer
             cut short at its budget (to_outcome) or not the JSON asked for (not_as_asked) is a
             Failure that keeps it; FailFast stops a run whose first answers all fail alike;
             CutShortWarning says early when most are cut short.
             Every request (ask) is `async with outage, concurrency, gate.admit(tokens)`
  limits     Gate (--rpm, --tpm, a per-minute 429's shared back-off, --max-cost-usd); Spend,
             the estimated cost from PRICES; Concurrency, fewer requests in flight while the
             server says it is full; Outage, the host unreachable: one probe asks
  cache      ContextCache: with --cache, the instruction and CONTEXT held once for the run
             (open_cache finds the one a killed run left, or makes it; renewed; deleted at the end)
  files      Media: the files rows name, each read once for its hash (part of the row's
             fingerprint), inline while a request is small, else uploaded once per content
             (recorded in uploads.jsonl for reruns), deleted once no row needs it
  batch      generate_in_batches(run): with --batch, the generator stage instead, with the
             same contract: prompts go in jobs of Gemini's Batch API, recorded in a
             BatchJournal so that a rerun collects them (collect_earlier_jobs)
  pool       PostProcessor: runs postprocess() over answers for the writers: on the event
             loop while it is quick, else in a process pool (started then), in batches
  writer     Writer: the files one writer owns, ShardWriter, ArrivalJournal (each answer
             as it is taken: a kill loses none) and FailureLog, and its one verb, write()
  resume     load_past_runs: what the output dir already holds (PastRuns: answered prompts,
             Answered, 8 bytes each by place or 16 as Fingerprints; failures, those refused for
             good left alone, and those cut short at this run's budget); repairs torn lines;
             record_job: one folder, one model and one set of settings (and each run's budget)
  estimate   --estimate: the job's tokens (countTokens on a sample, scaled), its cost at each
             price and its time (estimate, estimate_table), without a generateContent
  progress   Progress: the bar, or a line every PROGRESS_EVERY_S, and the summary line
  offline    OfflineClient, a stand-in for genai.Client with the same call shape
  CLI        parse_args (the flags, from SETTINGS), start-up checks (check_credentials:
             Gemini API or Vertex AI), the lock on the output dir, the summary and exit status
"""

from __future__ import annotations

__version__ = "0.14.0"  # --version prints it

import argparse
import array
import asyncio
import bisect
import contextlib
import csv
import dataclasses
import datetime
import enum
import errno
import fcntl
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import mimetypes
import mmap
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import re
import signal
import socket
import sys
import threading
import time
import typing
import urllib.parse
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, make_dataclass
from json.decoder import scanstring
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from types import SimpleNamespace
from typing import Annotated, Any, BinaryIO

import aiofiles
import aiofiles.os

# ---------------------------------------------------------------- settings --
# Each setting is declared here and only here: NAME: Annotated[kind, "its --help"] = value.
# The kind (defined below) says what a value must be; the text is what --help says of it (as
# typer reads Annotated). Every one is also the flag --name-in-lower-case (WORKERS is --workers),
# whose default is the value: edit the value, or give the flag.
INPUT_DIR: Annotated[
    Folder, "folder of prompt files: *.jsonl, *.csv and *.parquet a request per row, other files a prompt per line"
] = "inputs"
FILES_DIR: Annotated[
    Folder | None,
    "the folder the files rows name are relative to, and the only one they are read from (unset: INPUT_DIR)",
] = None
OUTPUT_DIR: Annotated[Folder, "where shards and failed.jsonl are written (created if missing)"] = "outputs"
MODEL: Annotated[Text, "the Gemini model that answers every prompt"] = "gemini-flash-latest"
SYSTEM_INSTRUCTION: Annotated[Text | None, "system instruction for every request (a row's own replaces it)"] = None
TEMPERATURE: Annotated[NonNegative | None, "sampling temperature, 0 to 2 (unset: the model's default)"] = None
MAX_OUTPUT_TOKENS: Annotated[
    AtLeastOne | None,
    "longest answer, in tokens, its thinking included (unset: the model's default); a rerun may raise it",
] = None
THINKING_BUDGET: Annotated[
    ThinkingBudget | None,
    "tokens the model may think before it answers (Gemini 2.5): 0 no thinking where the model allows, -1 its own "
    "choice",
] = None
THINKING_LEVEL: Annotated[
    ThinkingLevel | None, "minimal, low, medium or high: how much the model thinks (Gemini 3; not with THINKING_BUDGET)"
] = None
ACCEPT_CUT_SHORT: Annotated[
    Switch, "write answers cut short at MAX_OUTPUT_TOKENS as answers (finish_reason MAX_TOKENS), not as failures"
] = False
RESPONSE_SCHEMA: Annotated[
    File | None, 'a JSON Schema file: answers are asked as JSON, checked against it, and decoded into "parsed"'
] = None
GENERATION_CONFIG: Annotated[
    File | None, "a JSON file of other GenerateContentConfig fields (top_p, seed, safety_settings, thinking_config...)"
] = None
CONTEXT: Annotated[
    Files | None,
    "text files placed before every prompt, in this order (a document, a codebook, examples): the shared prefix, "
    "sent first",
] = None
CACHE: Annotated[
    Switch,
    "put SYSTEM_INSTRUCTION and CONTEXT in one explicit cache for the run: that prefix billed at the cached price, "
    "plus storage by the hour",
] = False
MEDIA_RESOLUTION: Annotated[
    Resolution | None,
    "low, medium or high: how many tokens an image or a video frame costs (unset: the model's default)",
] = None
INLINE_LIMIT_MB: Annotated[
    Positive,
    "a request carries the files its row names inline up to this many MB in all (the API now takes 100); the others "
    "are uploaded once, through the Files API",
] = 20.0
SERVICE_TIER: Annotated[
    Tier | None, "flex: half the price, an answer may take up to 15 minutes; priority: faster, dearer (unset: standard)"
] = None
WORKERS: Annotated[Workers, "requests in flight at once (at most 10,000)"] = 5
QUEUE_SIZE: Annotated[AtLeastOne, "bound of each queue (at least WORKERS): how far reading may run ahead"] = 5
SHARD_SIZE: Annotated[AtLeastOne, "records per output shard (the last shard may hold fewer)"] = 5
MAX_ATTEMPTS: Annotated[AtLeastOne, "tries per prompt, the first included, before it counts as failed"] = 5
TIMEOUT_S: Annotated[
    Positive | None, "seconds before one request is abandoned and retried (unset: 60, or 900 with --service-tier flex)"
] = None
RETRY_BASE_S: Annotated[Positive, "first back-off after a transient failure, in seconds; doubles each attempt"] = 1.0
RETRY_MAX_S: Annotated[Positive, "longest back-off between two attempts, in seconds (server-given delays excepted)"] = (
    60.0
)
OUTAGE_LIMIT_S: Annotated[
    Positive,
    "how long the API's host may stay unreachable before the run stops, to be rerun (25 s if it never answered)",
] = 900.0
RPM: Annotated[
    Positive | None, "requests per minute your quota allows: requests start evenly spaced below it (unset: no limit)"
] = None
TPM: Annotated[
    Positive | None,
    "input tokens per minute your quota allows: requests start so as to stay below it (unset: no limit)",
] = None
MAX_COST_USD: Annotated[
    Positive | None, "stop starting requests before the estimated spend passes this many US dollars (unset: no limit)"
] = None
RETRY_FAILED: Annotated[
    Switch,
    "a rerun also asks again the prompts the API refused for good (400s, safety blocks), and those cut short at this "
    "budget",
] = False
POSTPROCESS_WORKERS: Annotated[
    Processes,
    "processes running postprocess() once it is too slow for the event loop, by default the CPU count (at most 256); "
    "0: never",
] = os.cpu_count() or 1
READERS: Annotated[Tasks, "tasks reading input files, each taking the next unread file (at most 64)"] = 1
WRITERS: Annotated[Tasks, "tasks writing outputs, each into shards of its own (at most 64)"] = 1
OFFLINE_LATENCY_MS: Annotated[NonNegative, "simulated latency of each --offline answer, in milliseconds"] = 50.0
BATCH: Annotated[Switch, "send the prompts as jobs of Gemini's Batch API: half the price, results within 24 h"] = False
BATCH_SIZE: Annotated[AtLeastOne, "prompts per batch job, at most"] = 10_000
BATCH_POLL_S: Annotated[Positive, "seconds between two looks at a running batch job (up to 600 while pending)"] = 30.0
PROGRESS_EVERY_S: Annotated[
    Positive, "when stderr is not a terminal (a log file, CI, a scheduler), seconds between two progress lines"
] = 30.0
ESTIMATE: Annotated[
    Switch, "ask nothing: count the input tokens (free) and print what the job would cost and take at each price"
] = False
LIMIT: Annotated[
    AtLeastOne | None,
    "take only the job's first N prompts, in reading order, to try it on a few; the same command without it continues",
] = None

# The settings above that every request carries, by the GenerateContentConfig field each fills
# (GENERATION_CONFIG's fields go under them). A new one, say TOP_P: NonNegative | None = None,
# is its constant above and its line here; the request, the job's identity (job.json) and the
# message naming a changed setting all follow from this table.
GENERATION_FIELDS = {
    "system_instruction": "systemInstruction",
    "temperature": "temperature",
    "response_schema": "responseJsonSchema",
    "media_resolution": "mediaResolution",
}
REQUEST_FIELDS = {  # the same for settings every request carries that are not the job's: a rerun may change them
    "service_tier": "serviceTier",
}
# The settings that bound how long an answer may be, by where they go in the request (a dot:
# nested). Not the job's identity: a rerun with a larger budget asks again what was cut short
# and leaves the answers alone. job.json lists each run's; each record says its own (budget).
BUDGET_FIELDS = {
    "max_output_tokens": "maxOutputTokens",
    "thinking_budget": "thinkingConfig.thinkingBudget",
    "thinking_level": "thinkingConfig.thinkingLevel",
}

# What a model costs, in US dollars per million tokens: input, output (thinking included),
# cached input, and an explicit cache's storage per hour. The standard tier, prompts up to
# 200k tokens; the Batch API costs half. A model is priced by the longest name here that its
# name starts with. Copied on 2026-11-28 from copies of https://ai.google.dev/gemini-api/docs/pricing
# (README, "What it costs"): check them there, and add the models you use.
PRICES: dict[str, tuple[float, float, float, float]] = {
    "gemini-flash-latest": (0.50, 3.00, 0.05, 1.00),  # the alias: priced as the model it named then, Gemini 3 Flash
    "gemini-3-flash-preview": (0.50, 3.00, 0.05, 1.00),
    "gemini-3-pro-preview": (2.00, 12.00, 0.20, 4.50),
    "gemini-2.5-pro": (1.25, 10.00, 0.125, 4.50),
    "gemini-2.5-flash": (0.30, 2.50, 0.03, 1.00),
    "gemini-2.5-flash-lite": (0.10, 0.40, 0.01, 1.00),
}
# The fewest tokens an explicit cache may hold, by the longest model name it starts with ("":
# any other). From ai.google.dev/gemini-api/docs/caching, read 2026-11-29 (a later copy says
# 2,048 for 2.5 Flash: if the API refuses a cache as too small, the run says so and stops).
CACHE_MIN_TOKENS = {"gemini-2.5-pro": 4096, "gemini-3-pro": 4096, "": 1024}
CACHE_TTL_S = 3600.0  # a context cache lives this long past its last renewal...
CACHE_RENEW_S = 900.0  # ...renewed this often while the run lasts
CACHE_DELETE_S = 10.0  # at the end, deleting it may take this long; then it is left to expire
# a batch job ends within this long (it expires after 48 h): a cache it names is kept so long
BATCH_JOB_LIFE_S = 48 * 3600.0
CACHE_NAME_PREFIX = "pipeline.py job "  # a cache's display name: this, and the job's identity hashed
# --estimate asks countTokens at most this often: the shared prefix, and prompts spread over the inputs
ESTIMATE_SAMPLE = 200
ESTIMATE_ATTEMPTS = 3  # ...each count tried this many times
ESTIMATE_LATENCY_S = 5.0  # --estimate's assumed time for one answer at the standard tier, for the projected time

# Not settings: fixed by the design.
READ_CHUNK_BYTES = 1 << 20  # input is read this much at a time, so memory stays flat
STOP_GRACE_S = 1.5  # on Ctrl-C, how long requests in flight may still land (exit within 2 s)
SHARDS_PER_SYNC = 16  # full shards fsynced and closed together in one worker-thread job
SYNCS_PENDING = 4  # such jobs that may run behind the writer at once
RATE_HEADROOM = 0.98  # pace at 98% of --rpm and --tpm: spaced at exactly the limit, jitter puts R+1 in some windows
FAILED_FILE = "failed.jsonl"
LOCK_FILE = ".lock"  # in OUTPUT_DIR: held by the run using the folder (see output_dir_locked)
JOB_FILE = "job.json"  # in OUTPUT_DIR: the model and settings its answers were asked with (see record_job)
FAILED_JOURNAL = re.compile(r"failed(\.\d+)?\.jsonl")  # failed.jsonl, and failed.K.jsonl of writer K while running
SHARD_NAME = re.compile(r"shard_(\d+)\.jsonl")
ARRIVALS = re.compile(r"arrivals\.[0-9a-f]+\.\d+\.\d+\.jsonl")  # see ArrivalJournal
POSTPROCESS_BATCH = 256  # answers gathered for one trip to the pool, at most...
POSTPROCESS_WAIT_S = 0.05  # ...or what arrives in this long, while postprocess() is cheap (see PostProcessor)
POOL_NICENESS = 10  # the pool's processes run at a lower priority than the event loop
BATCH_JOURNAL = "batch_jobs.jsonl"  # in OUTPUT_DIR: every batch job submitted, and its prompts
BATCH_GATHER_S = 0.5  # a job is submitted before it is full once no prompt came for this long
BATCH_POLL_MAX_S = 600.0  # longest wait between two looks at a job still pending
# google.rpc codes of a batch result worth asking again: UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL,
# UNAVAILABLE
BATCH_AGAIN_CODES = {2, 4, 8, 13, 14}
ARRIVALS_PER_FILE = 1024  # answers per arrivals journal file (see ArrivalJournal)...
ARRIVALS_FILE_BYTES = 1 << 20  # ...and the space reserved for it at first (it doubles as needed)
ROUND_TRIP_S = 0.001  # work worth one more trip to the pool: a trip costs a few hundred µs of CPU here
# a batch's postprocess() may take this much CPU on the event loop; more, the pool starts (see PostProcessor)
INLINE_MAX_S = 0.005
LONGEST_SERVER_DELAY_S = 3600.0  # a RetryInfo asking for a longer wait is a spent quota: stop, do not sleep for days
KEY_PIECE = 16  # redact() masks any run of this many characters of the API key, not only all of it
MESSAGE_CHARS = 500  # an error message from the server is cut to this length (an HTML page would fill the screen)
BATCH_PRICE = 0.5  # the Batch API bills half of PRICES
# What each service tier bills, as a share of PRICES (the standard tier). Flex is half
# (ai.google.dev/gemini-api/docs/flex-inference, read 2026-11-29); priority is 75 to 100%
# more by model (docs/priority-inference): counted at the top, so --max-cost-usd errs safe.
TIER_PRICES = {"standard": 1.0, "flex": 0.5, "priority": 2.0}
TIMEOUT_S_BY_TIER = {"flex": 900.0}  # a request's timeout when --timeout-s is unset: a flex answer may queue 15 minutes
DEFAULT_TIMEOUT_S = 60.0  # ...and for the other tiers
CHARS_PER_TOKEN = 4  # a request's input tokens are estimated as its characters / 4, until answers say better
# an image's or a PDF page's tokens by --media-resolution (ai.google.dev media-resolution, read 2026-11-29)
MEDIA_TOKENS = {"low": 280, "medium": 560, "high": 1120}
# audio, and video with its sound at 1 frame a second (ai.google.dev audio, video-understanding)
TOKENS_PER_SECOND = {"audio": 32, "video": 263}
AUDIO_BYTES_PER_S = 16_000  # a recording's seconds, when its header does not say, from its size at 128 kbit/s...
VIDEO_BYTES_PER_S = 250_000  # ...and a video's at 2 Mbit/s: rough, until the answers' token counts correct them
PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")  # a PDF's page objects (not /Pages, their tree)
# the files Gemini takes, by MIME type (or its start)
MEDIA_TYPES = ("image/", "audio/", "video/", "text/", "application/pdf")
# files in INPUT_DIR that are not read as prompts, only named by rows
MEDIA_ONLY = ("image/", "audio/", "video/", "application/pdf")
# the names mimetypes gives that the API spells otherwise
MIME_TYPES = {"audio/x-wav": "audio/wav", "audio/x-flac": "audio/flac"}
FILES_API_MAX_BYTES = 2 << 30  # the Files API takes a file up to 2 GB
# the Gemini API version asked: the one with every method and field the pipeline uses (see connect)
API_VERSION_GEMINI = "v1beta"
API_VERSION_VERTEX = "v1beta1"  # ...and Vertex AI's (google-genai's own default there)
RACY_S = 2.0  # a file changed this close to its hashing is hashed again at each send: a coarse clock may hide an edit
UPLOADS_AT_ONCE = 8  # uploads to the Files API in flight at once, at most
UPLOAD_MARGIN_S = 3600.0  # an upload is used again until this long before it expires (48 h after it was made)
UPLOADS_FILE = "uploads.jsonl"  # in OUTPUT_DIR: each upload made (hash, size, name, uri, expiry), and each deleted
DIGESTS_FILE = "file_digests.jsonl"  # in OUTPUT_DIR: each local file's SHA-256 (and units) by path, size and mtime
UPLOAD_NAME_PREFIX = "pipeline.py upload "  # an upload's display name: this, the job's tag, and the file's SHA-256
UPLOAD_CLEANUP_S = 60.0  # at the end, deleting the job's uploads may take this long; what is left expires by itself
UPLOAD_PROCESSING_POLLS = 600  # an upload still PROCESSING after this many looks, a second apart, fails its prompts
NON_TEXT_PART_TOKENS = 258  # an image or file part, estimated as one image tile (Gemini's documented cost per tile)
MAX_NESTING = 64  # a JSONL row nested deeper is refused: every JSON reader can take it back
FAIL_FAST_OUTCOMES = 20  # when this many first outcomes are all one permanent error, the run stops
CUT_SHORT_WARN = 20  # when this many of the first CUT_SHORT_OF answers are cut short at their budget, a warning says so
CUT_SHORT_OF = 50
POSTPROCESS_FAILED = "postprocess failed: "  # how a failure of postprocess() begins
# a host that never answered and stays unreachable this long: a wrong address, or no network (a stop within 30 s)
OUTAGE_AT_START_S = 25.0
PROBE_FIRST_S = 0.5  # during an outage the probe asks at once, then after this long, doubling...
PROBE_MAX_S = 5.0  # ...to at most this: the run notices within seconds that the way is open again
PROBE_TIMEOUT_S = 10.0  # a probe unanswered this long counts as the host unreachable
CAPACITY_BACKOFF = 0.9  # a "server full" answer lowers the requests allowed in flight to this share of those out


def postprocess(prompt: str, response: str) -> dict[str, Any]:
    """Extra fields for the record of each answer. Edit it, like the constants, to compute
    anything else: parse JSON out of the response, score it... It runs on the event loop
    while it is quick, and in worker processes (POSTPROCESS_WORKERS) once it is not, so
    CPU-heavy work never stalls the requests in flight.
    What it returns is merged into the record; if it raises, that prompt goes to
    failed.jsonl with the reason (and the answer, which was paid for)."""
    return {"word_count": len(response.split())}


log = logging.getLogger("pipeline")


# What a setting's value must be: its annotation above. Each kind is the type a reader and
# a type checker see, with the Check its flag applies to a value (the constant's too).
@dataclass(frozen=True)
class Check:
    """How a setting's flag reads a value: `read` turns the text into the value or raises
    argparse.ArgumentTypeError saying why not; `metavar` names the value in --help."""

    read: Callable[[str], Any]
    metavar: str | None = None
    many: bool = False  # the setting is a list: its flag takes one value or more, each read by `read`


def at_least(minimum: float, kind: type = int, at_most: float = math.inf) -> Callable[[str], Any]:
    def read(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):  # nan compares false with everything, inf waits forever
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        if value > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most:,g}, got {text}")
        return value

    return read


def above_zero(text: str) -> float:
    value = at_least(0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def not_blank(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave it unset instead)")
    return text


Folder = Annotated[str, Check(Path, "DIR")]  # a folder, read as a Path
File = Annotated[str, Check(Path, "FILE")]  # a file, read as a Path
Files = Annotated[list[str], Check(Path, "FILE", many=True)]  # files, in order, each read as a Path
Text = Annotated[str, Check(not_blank, "TEXT")]
AtLeastOne = Annotated[int, Check(at_least(1), "N")]
# each holds a connection and a task: more only exhausts memory
Workers = Annotated[int, Check(at_least(1, at_most=10_000), "N")]
# readers and writers: more than the disks can serve helps nothing
Tasks = Annotated[int, Check(at_least(1, at_most=64), "N")]
Processes = Annotated[int, Check(at_least(0, at_most=256), "N")]  # started together, when postprocess() proves slow
NonNegative = Annotated[float, Check(at_least(0, float), "N")]
Positive = Annotated[float, Check(above_zero, "N")]
Switch = Annotated[bool, Check(bool)]  # a flag that takes no value: given, it turns the setting on


def one_of(*choices: str) -> Callable[[str], str]:
    def read(text: str) -> str:
        if text.strip().lower() not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text.strip().lower()

    return read


Tier = Annotated[str, Check(one_of(*TIER_PRICES), "TIER")]
ThinkingBudget = Annotated[int, Check(at_least(-1), "N")]  # -1: the model decides
ThinkingLevel = Annotated[str, Check(one_of("minimal", "low", "medium", "high"), "LEVEL")]
Resolution = Annotated[str, Check(one_of(*MEDIA_TOKENS), "LEVEL")]


@dataclass(frozen=True)
class Setting:
    """One constant of the settings block, as the command line and Settings see it."""

    constant: str  # its name, e.g. "WORKERS"
    check: Check  # from its kind
    help: str  # what --help says of it: the text in its declaration

    @property
    def flag(self) -> str:
        return "--" + self.constant.lower().replace("_", "-")

    @property
    def attribute(self) -> str:
        return self.constant.lower()

    def value(self) -> Any:
        """The constant's value now, read as its flag reads a value: checked, and a folder's
        name made a Path. Raises argparse.ArgumentTypeError where the flag would refuse it."""
        value = globals()[self.constant]
        if value is None or isinstance(value, bool):
            return value
        if self.check.many:
            return tuple(self.check.read(str(item)) for item in ([value] if isinstance(value, str) else value))
        return self.check.read(str(value))

    def default(self) -> Any:
        """Settings' default: the value, or where it is refused the constant as it is (parse_args says why)."""
        try:
            return self.value()
        except argparse.ArgumentTypeError:
            return globals()[self.constant]


def declared_settings() -> list[Setting]:
    """The settings block's constants, in order: the module's names whose annotation is a kind."""
    hints = typing.get_type_hints(sys.modules[__name__], include_extras=True)
    return [Setting(name, check, help_of(hint)) for name, hint in hints.items() if (check := check_of(hint))]


def check_of(hint: Any) -> Check | None:
    """The Check in a kind, or in `kind | None`, under the declaration's Annotated help."""
    if typing.get_origin(hint) is Annotated:
        found = next((m for m in hint.__metadata__ if isinstance(m, Check)), None)
        return found or check_of(hint.__origin__)
    return next(filter(None, map(check_of, typing.get_args(hint))), None)


def help_of(hint: Any) -> str:
    """The help text in a setting's declaration: the Annotated string around its kind."""
    return next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, str)), "")


SETTINGS = declared_settings()
Settings = make_dataclass(
    "Settings",
    [
        *((setting.attribute, Any, field(default=setting.default())) for setting in SETTINGS),
        ("offline", bool, field(default=False)),  # --offline: the built-in simulated model (OfflineClient)
        ("verbose", bool, field(default=False)),  # -v: log every event
        ("postprocess", Callable[[str, str], dict[str, Any]], field(default=postprocess)),  # sent to the pool by name
    ],
    frozen=True,
)
Settings.__doc__ = """One run's configuration: each constant of the settings block by its name in lower case
(WORKERS is settings.workers), as overridden on the command line."""


class PipelineError(Exception):
    """A problem the user must fix; the run ends with this one-line message and exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopForNow(PipelineError):  # noqa: N818 (a state of the run, not a fault)
    """The run cannot go on now but can later (the daily quota is spent, the server asks
    for a wait of hours, the API's host stays unreachable): stop, keep every answer."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}: run the same command again later to continue", 1)


@contextlib.contextmanager
def stop_on_os_error(what: str) -> Iterator[None]:
    """Turn a file error into a PipelineError: one line saying `what` failed and why.
    The first error is the one reported: closing a file after a failed write fails too."""
    try:
        yield
    except OSError as exc:
        while isinstance(exc.__context__, OSError):
            exc = exc.__context__
        raise PipelineError(f"{what}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------- records --
class Prompt(typing.NamedTuple):
    """One request to make: a line's text, or a JSONL or CSV row with what else it holds.
    `error` says why it cannot be sent (it is then failed, not asked). Made whole (its
    files read: see Media.resolve) before it is queued, and never changed after: a tuple,
    immutable, and made four times faster than a frozen dataclass (a rerun makes millions)."""

    id: str
    text: str  # what its record shows as "prompt": for a multi-turn request, the last user turn's text
    error: str | None = None
    contents: list[Any] | None = None  # the turns and parts to send, when not just `text` (Batch API rows)
    config: Any = None  # its GenerateContentConfig: the run's settings with the row's own over them; None: none
    answer_format: AnswerFormat | None = None  # set when the answer must be JSON
    fields: dict[str, Any] | None = None  # the row's other fields, carried into its record
    origin: str = ""  # "file:line" of a row that names its own id: ids must be unique in a job
    own_settings: bool = False  # asked with settings of its own row, not only the run's
    # of what its row sends besides `text` (settings, turns, parts, files), when it sends more: see row_digest
    digest: str = ""
    media: tuple[MediaFile, ...] = ()  # the files its row names, sent after its text, in order


@dataclass(frozen=True, slots=True)
class MediaFile:
    """A file a row names: a local one (its SHA-256 and size known once Media.resolve read
    it), or a URL the API reads itself (https://, or gs:// on Vertex AI), sent as it is."""

    name: str  # as the row gives it
    mime_type: str
    path: Path | None = None  # where a local file is (relative names: to INPUT_DIR); None: a URL
    size: int = 0  # bytes, once read
    sha256: str = ""  # of its bytes, once read: the file's identity (one upload per content)
    # once read, its length as its tokens are counted: pages (an image is one), seconds (audio, video), or tokens
    # (text)
    units: float = 0.0


@dataclass(slots=True)
class Response:
    """A prompt the model answered; `extra` is filled in by post-processing."""

    prompt: Prompt
    text: str
    model: str
    finish_reason: str | None
    attempts: int
    prompt_tokens: int
    response_tokens: int
    thinking_tokens: int = 0  # billed as output
    cached_tokens: int = 0  # of prompt_tokens, those read from a context cache (billed less)
    service_tier: str | None = None  # the tier that served it (flex, standard, priority), when the reply says
    budget: dict[str, Any] | None = None  # what bounded its length (see budget_of): the record's "budget"
    extra: str = ""  # what postprocess() returned, as a JSON object (encoded in the pool, see extra_fields)
    parsed: Any = None  # the answer decoded, when it must be JSON (see parse)
    line: str | None = None  # its record without postprocess()'s fields, encoded once (see Records.journal_line)

    def parse(self) -> str | None:
        """Decode an answer that must be JSON into `parsed`; the reason if it is not what was asked."""
        if self.prompt.answer_format is None:
            return None
        self.parsed, problem = self.prompt.answer_format.check(self.text)
        return problem


@dataclass(frozen=True, slots=True)
class Failure:
    """A prompt that failed for good: a permanent error, or every attempt spent."""

    prompt: Prompt
    error: str
    attempts: int
    # an answer not as asked (cut short, not the JSON asked, postprocess() failed on it): paid for, so kept
    response: str | None = None
    permanent: bool = False  # refused for good (a 400, a safety block): a rerun leaves it, unless --retry-failed
    usage: dict[str, Any] | None = None  # the tokens of the reply it keeps, as an answer's record says them (usage_of)
    cut_short: bool = False  # cut at its budget: a rerun with the same budget leaves it, one with another asks it
    # a batch result that may pass if asked again (see BATCH_AGAIN_CODES): resubmitted while attempts remain
    again: bool = False


OMITTED = object()  # a field's value when the record leaves the field out


@dataclass(frozen=True, slots=True)
class Field:
    """A field of the output records: a shard's (an answer's) and failed.jsonl's (a failure's)."""

    name: str  # its key
    meaning: str  # what it holds, for --help
    answer: Callable[[Response], Any] | None  # its value in an answer's record (OMITTED: left out); None: not there
    failure: Callable[[Failure], Any] | None  # the same in a failure's record
    load: Callable[[Any], dict[str, Any]] | None = None  # an answer's journaled value back to Response's fields


def prompt_field(name: str, meaning: str, value: Callable[[Prompt], Any]) -> Field:
    """A field of the prompt's, the same in both records (resuming matches records to rows by them)."""
    return Field(name, meaning, lambda outcome: value(outcome.prompt), lambda outcome: value(outcome.prompt))


def usage_of(response: Response) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": response.prompt_tokens,
        "response_tokens": response.response_tokens,
        "thinking_tokens": response.thinking_tokens,
        "cached_tokens": response.cached_tokens,
    }
    return usage if response.service_tier is None else {**usage, "service_tier": response.service_tier}


def usage_from(usage: dict[str, Any]) -> dict[str, Any]:
    counts = {
        name: int(usage.get(name, 0))
        for name in ("prompt_tokens", "response_tokens", "thinking_tokens", "cached_tokens")
    }
    return {**counts, "service_tier": str(usage["service_tier"]) if usage.get("service_tier") else None}


# The output records, declared once: their fields in order, what each holds and where it
# comes from. A row's own fields follow them (see carried); postprocess()'s come last.
RECORD = (
    prompt_field("id", "the row's id, or <file name>:<line number>", lambda prompt: prompt.id),
    prompt_field("prompt", "the prompt's text (a multi-turn row: its last user turn)", lambda prompt: prompt.text),
    prompt_field(
        "row_sha256", "a row with settings or parts of its own: their digest", lambda prompt: prompt.digest or OMITTED
    ),
    Field(
        "response",
        "the answer's text (in failed.jsonl: an answer cut short, not as asked, or that postprocess() failed on)",
        lambda r: r.text,
        lambda f: OMITTED if f.response is None else f.response,
        lambda text: {"text": str(text)},
    ),
    Field("model", "the model that answered", lambda r: r.model, None, lambda model: {"model": str(model)}),
    Field(
        "finish_reason",
        "why the answer ended: STOP, MAX_TOKENS, ...",
        lambda r: r.finish_reason,
        None,
        lambda reason: {"finish_reason": reason},
    ),
    Field("error", "why the prompt failed for good", None, lambda f: redact(f.error)),
    Field(
        "attempts", "requests made for it", lambda r: r.attempts, lambda f: f.attempts, lambda n: {"attempts": int(n)}
    ),
    Field(
        "permanent",
        "true: refused for good (a rerun asks it again only with --retry-failed)",
        None,
        lambda f: f.permanent,
    ),
    Field(
        "cut_short",
        "true: cut short at its budget (a rerun with a larger one asks it again)",
        None,
        lambda f: f.cut_short or OMITTED,
    ),
    Field(
        "usage",
        "prompt_tokens, response_tokens, thinking_tokens, cached_tokens; service_tier, the tier that served it",
        usage_of,
        lambda f: f.usage or OMITTED,
        usage_from,
    ),
    Field(
        "budget",
        "what bounded its length, when set: max_output_tokens, thinking_budget, thinking_level",
        lambda r: r.budget or OMITTED,
        lambda f: budget_of(f.prompt.config) or OMITTED,
        lambda budget: {"budget": dict(budget)},
    ),
    Field(
        "parsed",
        "the answer decoded, when a JSON schema was asked for",
        lambda r: r.parsed if r.prompt.answer_format else OMITTED,
        None,
        lambda parsed: {"parsed": parsed},
    ),
)
ANSWER_FIELDS = tuple(field for field in RECORD if field.answer is not None)
FAILURE_FIELDS = tuple(field for field in RECORD if field.failure is not None)
RECORD_FIELDS = frozenset(field.name for field in RECORD)


def record_help(fields: tuple[Field, ...]) -> str:
    """The list of a record's fields, for --help."""
    return ", ".join(field.name for field in fields)


def carried(fields: dict[str, Any] | None) -> dict[str, Any]:
    """A row's own fields for its record; one named like a record field gets an "input_" prefix."""
    if not fields:
        return {}
    return {f"input_{name}" if name in RECORD_FIELDS else name: value for name, value in fields.items()}


ID_KEY, PROMPT_KEY, DIGEST_KEY = (
    '{"id": "',
    ', "prompt": "',
    ', "row_sha256": "',
)  # the leading keys as json_line() writes them


class Records:
    """The one codec of what this pipeline writes and reads back: a shard's record, a
    failed.jsonl line, an arrivals journal's line, a batch journal's prompt. Resume reads a
    record no further than its LEADING keys (see front), so they must come first, in this
    order: asserted below against RECORD and json_line, not assumed."""

    LEADING = ("id", "prompt", "row_sha256")  # the keys every record starts with (row_sha256 only when it has one)
    OPENING = b'{"id": '  # how every record and failure line starts: what a torn line is repaired back to

    @staticmethod
    def journal_line(response: Response) -> str:
        """An answer's record without what postprocess() adds: what the arrivals journal keeps
        (encoded once, for the journal and the shard alike)."""
        if response.line is None:
            record = {
                field.name: value
                for field in ANSWER_FIELDS
                if (value := field.answer(response)) is not OMITTED  # type: ignore[misc]
            }
            response.line = json_line({**record, **carried(response.prompt.fields)})
        return response.line

    @staticmethod
    def answer(response: Response) -> str:
        """An answer's shard record: journal_line() with postprocess()'s fields spliced on
        (no key of theirs is the record's; a row's carried field of the same name yields to them)."""
        line = Records.journal_line(response)
        if len(response.extra) <= 2:  # "{}" or none
            return line
        # theirs win
        if response.prompt.fields and json.loads(response.extra).keys() & carried(response.prompt.fields).keys():
            return json_line({**json.loads(line), **json.loads(response.extra)})
        return f"{line[:-2]}, {response.extra[1:]}\n"

    @staticmethod
    def failure(failure: Failure) -> str:
        """A failure's line in failed.jsonl."""
        record = {
            field.name: value
            for field in FAILURE_FIELDS
            if (value := field.failure(failure)) is not OMITTED  # type: ignore[misc]
        }
        return json_line({**record, **carried(failure.prompt.fields)})

    @staticmethod
    def front(line: str) -> tuple[str, str, str]:
        """A record's id, prompt and row digest ("" if none), read from the front of its line;
        the whole line decoded only if it was not written the way json_line() writes."""
        if line.startswith(ID_KEY):  # module constants, not the class's: a rerun reads a million records
            prompt_id, end = scanstring(line, len(ID_KEY))
            if line.startswith(PROMPT_KEY, end):
                text, end = scanstring(line, end + len(PROMPT_KEY))
                digest = scanstring(line, end + len(DIGEST_KEY))[0] if line.startswith(DIGEST_KEY, end) else ""
                return prompt_id, text, digest
        record = json.loads(line)
        return str(record["id"]), str(record["prompt"]), str(record.get("row_sha256", ""))

    @staticmethod
    def journaled_answer(record: dict[str, Any]) -> Response:
        """An answer an earlier run journaled (an arrivals journal's line, decoded) as a Response."""
        fields = {name: value for name, value in record.items() if name not in RECORD_FIELDS}
        answer_format = AnswerFormat.of({}) if "parsed" in record else None  # parsed already: any JSON passes
        digest = str(record.get("row_sha256", ""))
        prompt = Prompt(
            str(record["id"]), str(record["prompt"]), answer_format=answer_format, fields=fields or None, digest=digest
        )
        loaded = [field.load(record[field.name]) for field in ANSWER_FIELDS if field.load and field.name in record]
        return Response(prompt, **{name: value for values in loaded for name, value in values.items()})

    @staticmethod
    def batch_prompt(prompt: Prompt) -> list[Any]:
        """A prompt as the batch journal keeps it: id, text, and what else its record needs."""
        extra: dict[str, Any] = {"fields": prompt.fields} if prompt.fields else {}
        if prompt.digest:
            extra["digest"] = prompt.digest
        if prompt.answer_format is not None:
            extra["schema"] = prompt.answer_format.schema
        return [prompt.id, prompt.text, extra] if extra else [prompt.id, prompt.text]

    @staticmethod
    def journaled_prompt(entry: list[Any]) -> Prompt:
        """batch_prompt() read back."""
        prompt_id, text, extra = (*entry, {})[:3]
        answer_format = AnswerFormat.of(extra["schema"]) if "schema" in extra else None
        return Prompt(
            str(prompt_id),
            str(text),
            answer_format=answer_format,
            fields=extra.get("fields"),
            digest=str(extra.get("digest", "")),
        )


@dataclass(frozen=True, slots=True)
class AnswerFormat:
    """What an answer must be when JSON is asked for: JSON at all, and valid against
    `schema` (a JSON Schema; {} takes any JSON). Checked with jsonschema, the reference
    validator: JSON Schema has too many keywords to check by hand."""

    schema: dict[str, Any]
    validator: Any  # a jsonschema validator of `schema`'s draft

    @classmethod
    def of(cls, schema: Any) -> AnswerFormat:
        """Raises ValueError, with the reason, for a schema that is not one or that names a
        $ref it cannot resolve (answers could not be checked). Refs are looked up in the
        schema and the drafts' own meta-schemas only: never fetched from the network."""
        import jsonschema
        import jsonschema_specifications
        import referencing.exceptions

        if not isinstance(schema, dict):
            raise ValueError("responseJsonSchema: not a JSON object")
        validator = jsonschema.validators.validator_for(schema)
        try:
            validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"responseJsonSchema is not a JSON Schema: {exc.message}") from None
        checker = validator(schema, registry=jsonschema_specifications.REGISTRY)
        for ref in schema_refs(schema):
            try:
                checker._resolver.lookup(ref)
            except referencing.exceptions.Unresolvable:
                raise ValueError(f"responseJsonSchema: $ref {ref[:100]!r} points at nothing in the schema") from None
        return cls(schema, checker)

    def check(self, text: str) -> tuple[Any, str | None]:
        """The answer decoded, or None and why it is not what was asked."""
        import jsonschema

        try:
            value = strict_json(text)
        except ValueError as exc:
            return None, f"answer is not JSON ({exc})"
        if problem := unwritable(value, text, "answer"):
            return None, problem
        try:
            error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        except Exception as exc:  # noqa: BLE001 (a schema that fails while checking: this answer fails, never the run)
            return None, f"answer could not be checked against the schema: {type(exc).__name__}: {exc}"[:MESSAGE_CHARS]
        if error:
            return None, f"answer does not match the schema: {error.message} (at {error.json_path})"[:MESSAGE_CHARS]
        return value, None


def schema_refs(schema: Any) -> Iterator[str]:
    """Every $ref a JSON Schema names, at any depth."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("$ref"), str):
                yield item["$ref"]
            stack += item.values()
        elif isinstance(item, list):
            stack += item


# json.dumps would build one per call; NaN is no JSON
JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def json_line(record: dict[str, Any]) -> str:
    """One JSON Lines record. Non-ASCII text stays readable, except the three characters
    that str.splitlines() and some JSON Lines readers take for line breaks."""
    text = JSON_ENCODER.encode(record)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085") + "\n"


assert tuple(field.name for field in RECORD[: len(Records.LEADING)]) == Records.LEADING, (
    "resume reads these first: keep them first in RECORD"
)
assert json_line({"id": "i", "prompt": "p", "row_sha256": "d"}) == f'{ID_KEY}i"{PROMPT_KEY}p"{DIGEST_KEY}d"}}\n', (
    "json_line() writes the leading keys as Records.front reads them"
)
assert ID_KEY.encode().startswith(Records.OPENING)


Outcome = Response | Failure


def dollars(usd: float) -> str:
    """$1,234.57 or $0.42; under a dollar, three significant digits, never in exponent form ($0.0000525)."""
    if usd >= 0.995:
        return f"${usd:,.2f}"
    if usd <= 0:
        return "$0"
    decimals = 2 - math.floor(math.log10(usd))  # three significant digits
    return f"${usd:.{decimals}f}".rstrip("0").rstrip(".")


def duration(seconds: float) -> str:
    """45s, 1m32s, 2h05m."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class Tally:
    """What the run has done so far, counted: the progress display and the summary read it."""

    answered: int = 0
    failed: int = 0
    skipped: int = 0  # answered by an earlier run
    left_alone: int = 0  # failed for good in an earlier run, not asked again (see --retry-failed)
    cut_left: int = 0  # cut short in an earlier run at this run's budget, not asked again
    cut_short: int = 0  # answers cut short at their budget: failed, or written with --accept-cut-short
    resubmitted: int = 0  # --batch: results that may pass again, put to a later job
    retries: int = 0
    rate_limited: int = 0  # 429 answers
    prompt_tokens: int = 0  # the tokens of every reply billed this run (see bill), failures' and retried ones' too
    response_tokens: int = 0
    thinking_tokens: int = 0  # billed as output
    cached_tokens: int = 0
    tiers: Counter[str] = field(default_factory=Counter)  # answers by the service tier that served them, when known
    jobs: Counter[str] = field(default_factory=Counter)  # batch jobs: submitted, resumed, running, done
    total: int | None = None  # prompts in the inputs, once counted
    started: float = field(default_factory=time.monotonic)

    def count(self, written: list[Response] | list[Failure]) -> None:
        """Outcomes now on disk."""
        for outcome in written:
            if isinstance(outcome, Response):
                self.answered += 1
                self.cut_short += outcome.finish_reason == "MAX_TOKENS"
                if outcome.service_tier:
                    self.tiers[outcome.service_tier] += 1
            else:
                self.failed += 1
                self.cut_short += outcome.cut_short

    def bill(self, usage: Any) -> None:
        """A reply's tokens (its usage_metadata), counted as it lands: what the spend counts too."""
        self.prompt_tokens += token_count(usage, "prompt_token_count")
        self.response_tokens += token_count(usage, "candidates_token_count")
        self.thinking_tokens += token_count(usage, "thoughts_token_count")
        self.cached_tokens += token_count(usage, "cached_content_token_count")

    def count_job(self, event: str, ends: str | None = None) -> None:
        """A batch job was submitted or resumed, is seen running, or is done (`ends` its running)."""
        self.jobs[event] += 1
        if ends:
            self.jobs[ends] -= 1

    @property
    def jobs_unfinished(self) -> int:
        return self.jobs["submitted"] + self.jobs["resumed"] - self.jobs["done"]


@dataclass
class Run:
    """What the stages of one run share, made once by open_run(): the queues between them,
    what every request needs, and each stage's own part (reading, asking, writing)."""

    settings: Settings
    client: Any  # google-genai's Client, or the OfflineClient
    limits: Limits  # what every request passes (the host's watch, the places in flight, the Gate)
    progress: Progress  # what a person sees: the counts (its Tally), the bar or lines, the summary
    past: PastRuns  # what earlier runs left in the output dir
    prompts: asyncio.Queue[Prompt]  # reader -> generators
    outcomes: asyncio.Queue[Outcome]  # generators -> writers
    reading: Reading  # what only the readers use
    asking: Asking  # what the generators (or the batch stage) use besides the limits
    writing: Writing  # what only the writers use

    async def retried(self, call: Callable[[int], Awaitable[Any]], policy: RetryPolicy) -> Any:
        """`call(attempt)`, retried as `policy` says, under this run's limits (see retried())."""
        return await retried(call, policy, self.settings, self.limits, self.progress.tally)


@dataclass
class Limits:
    """What a request passes on its way, in this order (see ask): the host reachable, a place
    among those in flight, then the Gate's turn (the rates, a 429's back-off, the budget)."""

    gate: Gate  # when requests may start (--rpm, --tpm, 429s, --max-cost-usd); closed once the run stops asking
    outage: Outage  # holds every request while the API's host cannot be reached
    concurrency: Concurrency  # how many requests may be in flight (--workers, or fewer if the server is full)


@dataclass(frozen=True)
class Api:
    """The API's client, and the one way its calls are tried again (retried(), under the run's
    limits): for what calls it outside the stages, the Files API's uploads and deletes."""

    client: Any  # google-genai's Client, or the OfflineClient
    # retried() with the run's settings, limits and tally
    retried: Callable[[Callable[[int], Awaitable[Any]], RetryPolicy], Awaitable[Any]]

    @classmethod
    def of(cls, settings: Settings, client: Any, limits: Limits, tally: Tally) -> Api:
        return cls(client, functools.partial(retried, settings=settings, limits=limits, tally=tally))


@dataclass
class Reading:
    """The readers' own: which files are left, every id named so far, --limit."""

    files: Iterator[Path]  # input files no reader has taken yet (READERS share it)
    ids: Ids = field(default_factory=lambda: Ids())  # every id the inputs name
    # --limit: how many of the job's prompts the readers may take
    limit: Limit = field(default_factory=lambda: Limit(None))

    @classmethod
    def of(cls, settings: Settings, files: list[Path]) -> Reading:
        return cls(iter(files), Ids({path.name: path for path in files}), Limit(settings.limit))


@dataclass
class Asking:
    """The generators' own (and the batch stage's): how prompts become requests, and what
    watches their outcomes."""

    # how rows become prompts and requests (the run's settings, a row's own over them; the cache named)
    maker: PromptMaker
    # the files rows name: read, inline or uploaded
    media: Media = field(default_factory=lambda: Media(FilesFolder(Path()), INLINE_LIMIT_MB))
    fail_fast: FailFast = field(default_factory=lambda: FailFast())  # stops a run whose every prompt fails alike
    # --batch: the prompts to be asked again in a later job
    resubmit: Resubmissions = field(default_factory=lambda: Resubmissions())

    @classmethod
    def of(cls, settings: Settings, job: Job, api: Api) -> Asking:
        """The job's maker, and its rows' files read from FILES_DIR (uploaded through `api`)."""
        folder = FilesFolder(files_dir(settings))
        return cls(job.maker, Media(folder, settings.inline_limit_mb, api, settings.output_dir, job.tag))


@dataclass
class Writing:
    """The writers' own: the post-processing pool, the shard numbers, the journals' name."""

    postprocessor: PostProcessor  # runs postprocess() for the writers, in its pool
    shard_numbers: Iterator[int]  # the next free shard numbers (WRITERS share it)
    name: str = field(default_factory=lambda: os.urandom(3).hex())  # names this run's journal files

    @classmethod
    def of(cls, settings: Settings, past: PastRuns) -> Writing:
        """The post-processing pool, and shard numbers after those earlier runs wrote."""
        return cls(PostProcessor(settings.postprocess, settings.postprocess_workers), itertools.count(past.next_shard))


@dataclass
class Limit:
    """--limit N: the readers take only the job's first N prompts (those answered before
    count: the same command without it continues the job where this one stopped)."""

    most: int | None  # N; None: no limit
    taken: int = 0  # prompts taken so far
    reached: bool = False  # a reader found an N+1st: the job goes on past this run

    def take(self) -> bool:
        """Whether a reader may take one more prompt of the job."""
        if self.most is not None and self.taken >= self.most:
            self.reached = True
            return False
        self.taken += 1
        return True


# -------------------------------------------------------------------- main --
async def main(settings: Settings, progress: Progress) -> None:
    """Start READERS readers, WORKERS generators (or the batch stage) and WRITERS writers,
    linked by two bounded queues; wait until every prompt is answered, then shut them down."""
    async with open_run(settings, progress) as run:
        leftovers = await start_leftovers(run)  # known before any stage starts: all_answered() awaits them
        generate, copies = generator_stage(settings)
        readers = [asyncio.create_task(read_inputs(run)) for _ in range(settings.readers)]
        generators = [asyncio.create_task(generate(run)) for _ in range(copies)]
        writers = [asyncio.create_task(write_outputs(run, number)) for number in range(settings.writers)]
        try:
            await supervised(all_answered(run, readers, leftovers), [*generators, *writers])
        except asyncio.CancelledError:
            log.warning("stopping: writing the answers received (Ctrl-C again quits at once)")
            raise
        finally:  # on success, error and Ctrl-C alike
            await shut_down(run, readers, [*generators, *leftovers], writers)


def generator_stage(settings: Settings) -> tuple[Callable[[Run], Awaitable[None]], int]:
    """The stage that turns prompts into outcomes, and how many of it run: WORKERS
    generate_content, or with --batch one generate_in_batches (which runs jobs in parallel)."""
    return (generate_in_batches, 1) if settings.batch else (generate_content, settings.workers)


async def start_leftovers(run: Run) -> list[asyncio.Task[None]]:
    """Start what an earlier run left for this one to finish, besides the answers it
    journaled (the reader writes those): with --batch, the jobs it submitted."""
    if not run.settings.batch:
        return []
    await find_unknown_jobs(run, BatchJournal(run.settings.output_dir / BATCH_JOURNAL))  # before any prompt is taken
    return [asyncio.create_task(collect_earlier_jobs(run))]


@contextlib.asynccontextmanager
async def open_run(settings: Settings, progress: Progress) -> AsyncIterator[Run]:
    """Everything the stages share, in phases: the job and its inputs checked, the host
    reached and the output folder locked, what earlier runs left, the run's parts, then what
    it holds on Google's side. What each phase opens is closed in reverse order however the
    run ends; failures are settled on every exit, the arrival journals dropped once complete."""
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.enter_context(stopped_by_signals(asyncio.current_task()))  # a long start-up scan too
        job = Job.of(settings)
        files = await inputs_checked(await list_input_files(settings.input_dir))
        client, limits = await reach_host_and_lock(settings, progress, cleanup)
        past = await past_of(settings, job)
        writing = Writing.of(settings, past)
        cleanup.push_async_callback(writing.postprocessor.aclose)
        reading = Reading.of(settings, files)
        asking = Asking.of(settings, job, Api.of(settings, client, limits, progress.tally))
        progress.tally.skipped = len(past.answered)
        cleanup.push_async_callback(stop, *progress.start(settings, Shown(limits, asking.media, reading.limit)))
        run = Run(settings, client, limits, progress, past, *queues(settings), reading, asking, writing)
        try:
            yield await hold_on_google(run, job, cleanup)
        finally:
            await finish_failures(settings.output_dir, past.failures)
            progress.tally.left_alone, progress.tally.cut_left = past.left_alone, past.cut_left
        for path in past.arrival_files:  # the run is complete: what they held is in synced shards now
            path.unlink()


async def past_of(settings: Settings, job: Job) -> PastRuns:
    """What earlier runs left in the output folder; their refusals and cut-short answers
    forgotten when the job's settings changed (or --retry-failed), to be asked again."""
    with stop_on_os_error(f"cannot read {settings.output_dir}"):
        past = await load_past_runs(settings.output_dir)
    if record_job(settings, job.settings, answered=bool(past.answered or past.journaled)) or settings.retry_failed:
        past.refused.clear()
        past.cut_at.clear()
    if past.journaled:
        log.info(
            "%s that an earlier run received but never wrote: written as their prompts are read, with no request",
            plural(len(past.journaled), "answer"),
        )
    return past


async def reach_host_and_lock(
    settings: Settings, progress: Progress, cleanup: contextlib.AsyncExitStack
) -> tuple[Any, Limits]:
    """reach_host, and the output folder locked, in the order that makes nothing on a refused
    start: a folder that exists is locked first (a second run on it stops at once, before
    asking the host), a new one is made only once the host has answered."""
    existing = settings.output_dir.is_dir()
    if existing:
        cleanup.enter_context(output_dir_locked(settings.output_dir))
    reached = await reach_host(settings, progress, cleanup)
    if not existing:
        cleanup.enter_context(output_dir_locked(made_output_dir(settings.output_dir)))
    return reached


async def reach_host(settings: Settings, progress: Progress, cleanup: contextlib.AsyncExitStack) -> tuple[Any, Limits]:
    """The client and the limits its requests pass, once the host has answered: a start
    refused for no network or a wrong address leaves nothing behind (no output folder)."""
    client = connect(settings)
    cleanup.push_async_callback(client.aio.aclose)
    gate = open_gate(settings)
    outage = watch_host(settings, client, gate.closed_event, progress)
    if not settings.offline:
        await outage.first_answer()
    return client, Limits(gate, outage, Concurrency(settings.workers))


async def hold_on_google(run: Run, job: Job, cleanup: contextlib.AsyncExitStack) -> Run:
    """What the run keeps on Google's side besides its requests, each given back at the end:
    the uploads of the files rows name (those earlier runs recorded, first), and with --cache
    the context cache. The run its stages get: with a cache, its prompts name it from the start."""
    await run.asking.media.load()
    cleanup.push_async_callback(run.asking.media.close)
    if not run.settings.cache or not (cache := await open_cache(run, job)):
        return run
    cleanup.push_async_callback(cache.close, run)
    cleanup.push_async_callback(stop, asyncio.create_task(cache.keep(run)))
    return dataclasses.replace(run, asking=dataclasses.replace(run.asking, maker=run.asking.maker.naming(cache.name)))


def open_gate(settings: Settings) -> Gate:
    """The Gate for --rpm, --tpm and --max-cost-usd; the spend is shown when the model has a price."""
    spend = Spend.of(settings)
    if spend.price is None and not settings.offline:
        log.warning("no price for %s in PRICES (near the top of pipeline.py): the spend is not shown", settings.model)
    return Gate(settings.rpm, settings.tpm, spend)


def watch_host(settings: Settings, client: Any, closed: asyncio.Event, progress: Progress | None = None) -> Outage:
    """The Outage watch of the host the client talks to; its probe asks for the model's card."""
    options = getattr(getattr(client, "_api_client", None), "_http_options", None)  # the SDK's resolved base URL
    url = urllib.parse.urlsplit(str(getattr(options, "base_url", None) or ""))
    host = f"{url.hostname}{f':{url.port}' if url.port else ''}" if url.hostname else "the API"
    changed = progress.refresh if progress is not None else lambda: None
    return Outage(lambda: client.aio.models.get(model=settings.model), host, settings.outage_limit_s, closed, changed)


@contextlib.contextmanager
def stopped_by_signals(main_task: asyncio.Task[None]) -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the run (on_stop_signal), however busy the loop is.

    Not loop.add_signal_handler: asyncio passes the signal's number through its own
    wake-up pipe, which thousands of requests finishing in threads (DNS, file I/O) can
    fill, and a signal written to a full pipe is dropped. A Python-level handler runs
    from a flag that the C handler sets, whatever happens to the pipe, and hands the
    stop to the loop with call_soon_threadsafe (which wakes it: if that pipe is full,
    the loop is awake already). The socket here wakes the main thread when the signal
    lands on another thread, so that the handler runs at all."""
    loop = asyncio.get_running_loop()
    wake_reader, wake_writer = socket.socketpair()
    wake_reader.setblocking(False)
    wake_writer.setblocking(False)
    loop.add_reader(wake_reader.fileno(), drain, wake_reader)
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous_wakeup = signal.set_wakeup_fd(wake_writer.fileno(), warn_on_full_buffer=False)

    def handler(number: int, frame: Any) -> None:
        loop.call_soon_threadsafe(on_stop_signal, main_task, number)

    previous = {number: signal.signal(number, handler) for number in stop_signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        signal.set_wakeup_fd(previous_wakeup)
        loop.remove_reader(wake_reader.fileno())
        wake_reader.close()
        wake_writer.close()


def drain(wake_reader: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already drained: a readiness seen before a second Ctrl-C stopped the loop
        wake_reader.recv(4096)


def on_stop_signal(main_task: asyncio.Task[None], number: int) -> None:
    """Ctrl-C or SIGTERM: the first stops the run gently (see shut_down), a second at once.
    The signal's name travels with the cancellation, for the exit status (130 or 143)."""
    if main_task.cancelling():
        raise KeyboardInterrupt
    main_task.cancel(signal.Signals(number).name)


def queues(settings: Settings) -> tuple[asyncio.Queue[Prompt], asyncio.Queue[Outcome]]:
    """The two bounded queues: reader -> generators, generators -> writers (see queue_depth)."""
    return asyncio.Queue(maxsize=queue_depth(settings)), asyncio.Queue(maxsize=queue_depth(settings))


def queue_depth(settings: Settings) -> int:
    """QUEUE_SIZE, but at least one place per worker: on a busy event loop a queue hands
    over about its size per turn of the loop, so a shorter one leaves workers idle."""
    return max(settings.queue_size, settings.workers)


async def all_answered(run: Run, readers: list[asyncio.Task[None]], leftovers: list[asyncio.Task[None]]) -> None:
    """Return once every prompt is answered, and what an earlier run left is done. A reader's
    error is raised at once: shut_down then stops the run as Ctrl-C would (the requests in
    flight may still land)."""
    await asyncio.wait(readers, return_when=asyncio.FIRST_EXCEPTION)  # every prompt is queued, or a reader failed
    for reader in readers:
        if reader.done():
            reader.result()
    await run.prompts.join()  # every queued prompt has its outcome queued
    run.asking.media.inputs_read = True  # an upload no queued prompt needs now is needed by none
    run.past.drop_journaled()  # every input is read: what is left answers none of them
    await asyncio.gather(*leftovers)  # and what an earlier run left (started before any stage)


async def shut_down(
    run: Run, readers: list[asyncio.Task[None]], generators: list[asyncio.Task[None]], writers: list[asyncio.Task[None]]
) -> None:
    """Stop asking, let requests in flight land for a moment, write every answer received,
    then stop every task (`generators`: what an earlier run left too). A writer's error is
    raised: the run is not complete."""
    run.limits.gate.close()  # no request starts from now on
    for reader in readers:
        reader.cancel()
    while not run.prompts.empty():  # never tried: the next run asks them
        run.prompts.get_nowait()
        run.prompts.task_done()
    await until(run.prompts.join(), writers, timeout=STOP_GRACE_S)  # answers in flight are queued,
    await stop(*readers, *generators, *run.limits.outage.probing)
    await until(run.outcomes.join(), writers)  # and written.
    await stop(*writers)
    for writer in writers:
        if not writer.cancelled() and writer.exception():
            raise writer.exception()  # type: ignore[misc]


async def until(work: Awaitable[None], writers: list[asyncio.Task[None]], timeout: float | None = None) -> None:
    """Wait for `work`, but not past `timeout`, and not once a writer is dead."""
    waiting = asyncio.ensure_future(work)
    await asyncio.wait([waiting, *writers], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()


async def supervised(work: Awaitable[None], stages: list[asyncio.Task[None]]) -> None:
    """Await `work`, but raise at once if any stage dies first: a dead writer or
    generator must end the run, never leave a queue's join() waiting forever."""
    done_when = asyncio.ensure_future(work)
    watching: set[asyncio.Future[None]] = {done_when, *stages}
    try:
        while not done_when.done():
            finished, watching = await asyncio.wait(watching, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                if task is not done_when and not task.cancelled() and task.exception():
                    raise task.exception()  # type: ignore[misc]
        done_when.result()
    finally:
        done_when.cancel()


async def stop(*tasks: asyncio.Task[None]) -> None:
    """Cancel `tasks` and wait until they end. One that caught the cancel and went on (a
    library can swallow one) is cancelled again, rather than waited for forever."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=STOP_GRACE_S)
    await asyncio.gather(*tasks, return_exceptions=True)


def connect(settings: Settings) -> Any:
    """The model client: google-genai's, or the offline stand-in."""
    if settings.offline:
        return OfflineClient(settings.offline_latency_ms / 1000, settings.model, request_timeout_s(settings))
    from google import genai  # imported here so that --offline never pays for it
    from google.genai import types

    # attempts=1: answer() owns retries, so the SDK must not retry behind its back. No
    # redirects: httpx and aiohttp would carry the x-goog-api-key header to another host.
    # The request timeout is the transport's (aiohttp's total timeout, which the SDK also
    # sends as X-Server-Timeout, so the server knows when an answer is no longer awaited),
    # not a second timer around each call; batch mode's uploads and downloads have none.
    # The API version is pinned: google-genai 3 asks the Gemini API's v1 unless told, whose
    # messages have no systemInstruction, cachedContent, responseJsonSchema or thinkingConfig,
    # and no Files, Batch or caching API (a 400 "Unknown name" for every prompt that sends one).
    options = types.HttpOptions(
        api_version=API_VERSION_VERTEX if on_vertex() else API_VERSION_GEMINI,
        timeout=None if settings.batch else max(1, round(request_timeout_s(settings) * 1000)),  # in ms
        retry_options=types.HttpRetryOptions(attempts=1),
        async_client_args={"follow_redirects": False, "allow_redirects": False},  # httpx's name, aiohttp's name
    )
    if not on_vertex():
        return genai.Client(api_key=api_key_from_env(), http_options=options)
    if key := api_key_from_env():  # Vertex AI express mode
        return genai.Client(vertexai=True, api_key=key, http_options=options)
    project, location = os.environ["GOOGLE_CLOUD_PROJECT"], os.environ["GOOGLE_CLOUD_LOCATION"]  # see check_credentials
    return genai.Client(vertexai=True, project=project, location=location, http_options=options)


def files_dir(settings: Settings) -> Path:
    """FILES_DIR, the folder rows' files are named from; unset, the input folder."""
    return settings.files_dir or settings.input_dir


def request_timeout_s(settings: Settings) -> float:
    """--timeout-s; unset, long enough for the service tier asked for (TIMEOUT_S_BY_TIER)."""
    return settings.timeout_s or TIMEOUT_S_BY_TIER.get(settings.service_tier, DEFAULT_TIMEOUT_S)


def api_key_from_env() -> str | None:
    """The key as it is sent: stripped (a key pasted with a trailing space or newline is common)."""
    key = (os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY") or "").strip()
    return key or None


def on_vertex() -> bool:
    """Whether google-genai is told to use Vertex AI rather than the Gemini API."""
    return os.environ.get("GOOGLE_GENAI_USE_VERTEXAI", "").strip().lower() in ("true", "1")


def check_credentials(settings: Settings) -> None:
    """What the chosen backend needs: the Gemini API a key; Vertex AI a project, a
    location and Application Default Credentials (or, in express mode, a key)."""
    if not on_vertex():
        if not api_key_from_env():
            raise PipelineError(
                "no API key: set GEMINI_API_KEY (or GOOGLE_GENAI_USE_VERTEXAI=true for Vertex AI), or try the "
                "pipeline with --offline"
            )
        return
    if settings.batch:
        raise PipelineError(
            "--batch on Vertex AI reads and writes Cloud Storage or BigQuery, which this tool does not handle: run "
            "without --batch"
        )
    # Vertex AI refuses serviceTier in the body (googleapis/python-genai#2433): it takes a header
    if settings.service_tier:
        raise PipelineError(
            "--service-tier on Vertex AI: its Flex and Priority PayGo are chosen by a header on the global endpoint, "
            "not this setting: run without it"
        )
    if api_key_from_env():
        return
    if missing := [name for name in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION") if not os.environ.get(name)]:
        raise PipelineError(f"Vertex AI needs {' and '.join(missing)} set (or an API key, for express mode)")
    import google.auth
    import google.auth.exceptions

    try:  # loaded here once, so that a missing ADC is one line now, not a failure per prompt later
        google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except google.auth.exceptions.DefaultCredentialsError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"no Application Default Credentials for Vertex AI ({reason}): run 'gcloud auth application-default login'"
        ) from None


def redact(text: str) -> str:
    """`text` with the API key replaced by ***: a server or proxy may quote the key back in
    an error, and nothing the pipeline prints or writes may carry it. Any piece of it of
    KEY_PIECE characters or more goes too (a message cut short, a key quoted in part)."""
    key = api_key_from_env()
    if not key or len(key) < 4:
        return text
    text = text.replace(key, "***")
    piece = min(KEY_PIECE, len(key))
    found = [start for start in range(len(key) - piece + 1) if key[start : start + piece] in text]
    if not found:
        return text
    pattern = "|".join(re.escape(key[a:b]) for a in found for b in range(len(key), a + piece - 1, -1))
    return re.sub(pattern, "***", text)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# ------------------------------------------------------------------ stages --
async def read_inputs(run: Run) -> None:
    """Queue every prompt of each input file the reader takes, in order, except those the
    output dir already has (see PastRuns.skips; an answer journaled for exactly that
    request goes to the writers instead); waits while the queue is full. With
    READERS > 1 the readers share run.reading.files, each taking the next file when it finishes one."""
    for path in run.reading.files:
        with cannot_read(path):
            if not await queue_prompts_of(run, path):
                return  # --limit: the job's first prompts are all taken


async def queue_prompts_of(run: Run, path: Path) -> bool:
    """Queue the prompts of one input file, unless an earlier run answered them; False once
    the readers have taken the job's first --limit prompts."""
    async with contextlib.aclosing(read_prompts(path, run.asking.maker, run.past.answered)) as file_prompts:
        async for prompts in file_prompts:
            for prompt in prompts:
                if not run.reading.limit.take():
                    return False
                if prompt.origin:  # a named id (a default one is its own place: see Ids)
                    await run.reading.ids.claim(prompt, run.asking.maker)
                if prompt.media and not prompt.error:
                    prompt = await run.asking.media.resolve(prompt)  # its files' hashes are part of what it asks
                match run.past.route(prompt):
                    case Route.ASK:
                        if prompt.media:
                            run.asking.media.needs(prompt)
                        await run.prompts.put(prompt)
                        log.debug("enqueued %s", prompt.id)
                    case Response() as journaled:  # answered before, never written: to the writers, no request
                        await run.outcomes.put(journaled)
                    case Route.DONE:
                        pass
    return True


async def generate_content(run: Run) -> None:
    """Turn queued prompts into outcomes until cancelled. Retries happen in place,
    never through the input queue, so a full queue can never deadlock a retry."""
    while True:
        prompt = await run.prompts.get()
        try:
            if outcome := await answer(run, prompt):
                run.asking.media.settled(outcome)
                await run.outcomes.put(outcome)
                run.asking.fail_fast.check()  # every prompt fails alike: stop, this outcome kept
        except PipelineError:  # this ends the run: no other request starts from now on
            run.limits.gate.close()
            raise
        finally:  # however it ended, so that prompts.join() counts this prompt as handled
            run.prompts.task_done()


async def write_outputs(run: Run, number: int) -> None:
    """Writer number `number`: the only task writing its shards, its arrivals journal and
    its failure journal. Takes the outcomes that are waiting (each answer journaled as it
    is taken), and writes them: post-processed, then handed to the operating system at
    once (see ShardWriter for why that matters)."""
    writer = open_writer(run, number)
    with stop_on_os_error(f"cannot write to {run.settings.output_dir}"):
        async with contextlib.aclosing(writer):
            while True:
                done = await writer.write(await next_batch(run.outcomes, writer))
                run.asking.fail_fast.watch_postprocessed(done)
                run.asking.fail_fast.check()


# ---------------------------------------------------------------- requests --
# not generationConfig's
REQUEST_LEVEL = ("systemInstruction", "safetySettings", "tools", "toolConfig", "cachedContent", "labels")
SDK_OPTIONS = ("httpOptions", "shouldReturnHttpResponse", "automaticFunctionCalling")  # the SDK's, not the API's
# what goes into a cache: a request naming one may not send them
CACHED_FIELDS = ("systemInstruction", "tools", "toolConfig")
CAMEL = re.compile(r"_([a-z0-9])")


@dataclass(frozen=True)
class PromptMaker:
    """How rows become requests: the run's generation settings (SYSTEM_INSTRUCTION ...
    GENERATION_CONFIG), validated through google-genai's own types before any request,
    with a row's own settings over them. Keeps the ids rows name, which must be unique."""

    generation: dict[str, Any]  # the run's settings: GenerateContentConfig fields, camelCase
    # `generation` validated (or `cached`, with a cache): shared by every prompt without settings of its own
    config: Any = None
    answer_format: AnswerFormat | None = None  # JSON asked for by the run's settings
    # CONTEXT, one user turn sent before each prompt's own; []: none
    context: list[dict[str, Any]] = field(default_factory=list)
    # with a cache (see naming): `generation` less what went into the cache, plus its name
    cached: dict[str, Any] | None = None
    # estimated input tokens each request sends or names besides its own: the context (and a cached instruction)
    prefix_tokens: int = 0
    media_root: Path = Path()  # FILES_DIR: the folder the names of the files rows name are relative to

    @classmethod
    def of(
        cls, generation: dict[str, Any], context: list[dict[str, Any]] | None = None, media_root: Path = Path()
    ) -> PromptMaker:
        context = context or []
        try:
            config = generation_config(generation) if generation else (None, None)
            return cls(generation, *config, context, None, text_tokens(turn_texts(context)), media_root)
        except ValueError as exc:
            raise PipelineError(f"generation settings: {exc}") from None

    def naming(self, cache: str) -> PromptMaker:
        """This maker, its prompts naming the cache `cache`, which holds the run's system
        instruction, tools and context (the API refuses a request naming a cache that also
        sends those); a row with an instruction or tools of its own sends all without it."""
        cached = {k: v for k, v in self.generation.items() if k not in CACHED_FIELDS} | {"cachedContent": cache}
        instruction = turn_texts([self.generation.get("systemInstruction") or {}])
        return dataclasses.replace(
            self,
            config=generation_config(cached)[0],
            cached=cached,
            prefix_tokens=self.prefix_tokens + text_tokens(instruction),
        )

    def contents(self, prompt: Prompt) -> str | list[Any]:
        """What `prompt` sends as its contents: the context's turn first (the shared prefix
        first, where implicit caching finds it), unless its settings name a cache, which holds it."""
        own = prompt.contents or prompt.text
        if not self.context or (prompt.config is not None and prompt.config.cached_content):
            return own
        return [*self.context, *(own if isinstance(own, list) else [user_turn(own)])]

    def prompt(self, prompt_id: str, text: str, own: dict[str, Any] | None = None, **row: Any) -> Prompt:
        """A prompt asked with the run's settings and `own` (camelCase) over them."""
        if not (own or row):  # a line of text: the common case, made without keywords (a rerun makes millions)
            return Prompt(prompt_id, text, None, None, self.config, self.answer_format)
        if own or row.get("contents"):
            row["digest"] = row_digest(own, row.get("contents"))
        if not own:
            return Prompt(prompt_id, text, config=self.config, answer_format=self.answer_format, **row)
        base = self.cached if self.cached is not None and not own.keys() & CACHED_FIELDS else self.generation
        try:
            config, answer_format = generation_config(over(base, own))
        except ValueError as exc:
            return Prompt(
                prompt_id,
                text,
                error=f"its settings: {exc}",
                fields=row.get("fields"),
                origin=row.get("origin", ""),
                digest=row["digest"],
            )
        return Prompt(prompt_id, text, config=config, answer_format=answer_format, own_settings=True, **row)

    def from_json(self, text: str, where: str) -> Prompt:
        """A JSONL line: {"prompt": ...} or the Batch API's {"key": ..., "request": ...}. A
        line whose values JSON Lines cannot carry back out fails here, before it is paid for."""
        try:
            row = strict_json(text)
        except ValueError as exc:
            return Prompt(where, text.strip(), error=f"line is not JSON ({exc})")
        if not isinstance(row, dict):
            return Prompt(where, text.strip(), error="line is not a JSON object")
        if not isinstance(given := row.get("key" if "request" in row else "id", ""), str | int) or isinstance(
            given, bool
        ):
            return Prompt(
                where,
                text.strip(),
                error=f"its {'key' if 'request' in row else 'id'} is not a string or a whole number",
            )
        if problem := unwritable(row, text):
            prompt_id, origin = own_id(row.get("key" if "request" in row else "id"), where)
            if not is_utf8(prompt_id):
                prompt_id, origin = where, ""
            return Prompt(prompt_id, text.strip(), error=f"{problem} ({where})", origin=origin)
        if isinstance(row.get("request"), dict):
            return self.from_batch_row(row, where)
        return self.from_row(row, where)

    def from_row(self, row: dict[str, Any], where: str) -> Prompt:
        """A JSONL or CSV row: prompt, and optionally id, system_instruction, config; the
        other fields are carried into its record."""
        fields = {k: v for k, v in row.items() if k not in ("prompt", "id", "system_instruction", "config")}
        prompt_id, origin = own_id(row.get("id"), where)
        prompt, instruction, own = row.get("prompt"), row.get("system_instruction"), row.get("config") or {}
        media, unfit = media_files(row.get("files"), self.media_root)
        if problem := row_problem(prompt, instruction, own) or unfit:
            shown = prompt if isinstance(prompt, str) else json.dumps(prompt)
            return Prompt(prompt_id, shown, error=f"{problem} ({where})", fields=fields or None, origin=origin)
        own = camel_keys(own)
        if instruction is not None:
            own["systemInstruction"] = instruction_content(instruction)
        return self.prompt(
            prompt_id, prompt, own, fields=fields or None, origin=origin, **({"media": media} if media else {})
        )

    def from_batch_row(self, row: dict[str, Any], where: str) -> Prompt:
        """A line of a Gemini Batch API file: its request's contents go as they are."""
        fields = {k: v for k, v in row.items() if k not in ("key", "request")}
        prompt_id, origin = own_id(row.get("key"), where)
        request = camel_keys(row["request"])
        contents = request.get("contents")
        unknown = sorted(request.keys() - {"contents", "generationConfig", "model", *REQUEST_LEVEL})
        if not isinstance(contents, list) or not contents or unknown:
            problem = f"request field {unknown[0]} is not supported" if unknown else "request has no contents"
            return Prompt(prompt_id, "", error=f"{problem} ({where})", fields=fields or None, origin=origin)
        own = {
            **camel_keys(request.get("generationConfig") or {}),
            **{k: request[k] for k in REQUEST_LEVEL if k in request},
        }
        return self.prompt(
            prompt_id, last_user_text(contents), own, contents=contents, fields=fields or None, origin=origin
        )


def media_files(value: Any, root: Path) -> tuple[tuple[MediaFile, ...], str | None]:
    """The files a row's `files` names (a list of names, or one string with `|` between
    several), and why they cannot be sent, if they cannot: a type Gemini does not take, a
    URL it cannot read. Whether a local one can be read is Media.resolve's to say."""
    if value is None or value == "" or value == []:
        return (), None
    names = value.split("|") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
        return (), "files is not a list of file names"
    media = []
    for name in (name.strip() for name in names):
        scheme = urllib.parse.urlsplit(name).scheme.lower() if "://" in name else ""
        guessed = mimetypes.guess_type(name, strict=False)[0]
        mime = MIME_TYPES.get(guessed, guessed) if guessed else None
        if mime is None or not mime.startswith(MEDIA_TYPES):
            return (), f"file {name}: " + (
                f"Gemini does not take {mime}" if mime else "its type is unknown (by its extension)"
            )
        if scheme not in ("", "https", "gs") or (scheme == "gs" and not on_vertex()):
            return (), f"file {name}: " + (
                "gs:// URIs need Vertex AI" if scheme == "gs" else "a URL must be https:// (or gs:// on Vertex AI)"
            )
        # a row must not send files from elsewhere
        if not scheme and (Path(name).is_absolute() or ".." in Path(name).parts):
            return (), f"file {name}: not inside the files folder (name it relative to {root}, without ..)"
        media.append(MediaFile(name, mime, None if scheme else root / name))
    return tuple(media), None


def row_digest(own: dict[str, Any] | None, contents: list[Any] | None) -> str:
    """What a row sends besides its text, hashed: with its text and id, what a rerun compares
    to know the row was not edited since it was answered (PastRuns.skips)."""
    canonical = json.dumps([own or {}, contents], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass
class Ids:
    """Every id the inputs give, in one namespace: the ids rows name, and the default ids
    ("file:line") of the rows and lines that name none. Two prompts with one id would be
    answered and written twice under it. Named ids are kept with their place. Default ids
    cost nothing per prompt: a named id can only meet one if it reads "<input file>:<n>",
    and only then are that file's default ids listed (read once, a bit per line)."""

    files: dict[str, Path] = field(default_factory=dict)  # the input files, by name
    named: dict[str, str] = field(default_factory=dict)  # id -> "file:line" of the row that named it
    places: dict[str, bytearray] = field(default_factory=dict)  # file name -> bit n set: line n is known by its place

    async def claim(self, prompt: Prompt, maker: PromptMaker) -> None:
        """Refuse a row naming an id that another row names, or that is another's default id
        (`maker` reads the rows of the file that id names, if it names one: see places_of)."""
        if not prompt.origin:
            return  # known by its place: a row naming that place meets it when it is claimed
        first = self.named.setdefault(prompt.id, prompt.origin)
        if first == prompt.origin:  # named once so far; and naming its own place is no clash
            if prompt.id == prompt.origin or not await self.is_a_place(prompt.id, maker):
                return
            first = f"{prompt.id} (a row with no id of its own)"
        raise PipelineError(
            f"id {prompt.id!r} is named twice in the inputs: {first} and {prompt.origin}; ids must be unique"
        )

    async def is_a_place(self, prompt_id: str, maker: PromptMaker) -> bool:
        """Whether `prompt_id` is the default id of a row or line of the inputs."""
        name, _, number = prompt_id.rpartition(":")
        if name not in self.files or not number.isdigit():
            return False
        if name not in self.places:
            self.places[name] = await self.places_of(self.files[name], maker)
        bits, line = self.places[name], int(number)
        return len(bits) > line >> 3 and bool(bits[line >> 3] & 1 << (line & 7))

    async def places_of(self, path: Path, maker: PromptMaker) -> bytearray:
        """The lines of an input file whose prompts are known by their place, as bits."""
        bits = bytearray()
        with cannot_read(path):
            async for prompts in read_prompts(path, maker):
                for prompt in prompts:
                    if not prompt.origin:
                        line = int(prompt.id.rpartition(":")[2])
                        bits.extend(bytes(max(0, (line >> 3) + 1 - len(bits))))
                        bits[line >> 3] |= 1 << (line & 7)
        return bits


def strict_json(text: str) -> Any:
    """json.loads, refusing what strict JSON readers refuse (NaN, Infinity, 1e999) and
    raising ValueError with the reason for every way a line can be wrong."""
    try:
        return json.loads(text, parse_constant=not_a_number, parse_float=finite_float)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg}, column {exc.colno}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None  # (a number too long to read raises a ValueError of its own)


def not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a number strict JSON allows")


def finite_float(text: str) -> float:
    if math.isfinite(value := float(text)):
        return value
    raise ValueError(f"{text} is out of range for a number")


def unwritable(value: Any, text: str, name: str = "") -> str | None:
    """Why a decoded row (read from `text`) cannot be written back as UTF-8 JSON Lines, if
    it cannot: text with a lone surrogate (JSON's "\\udc80" decodes to one), or nesting
    deeper than MAX_NESTING. Only a line that could hold either is walked."""
    if "\\u" not in text and text.count("[") + text.count("{") <= MAX_NESTING:
        return None
    stack = [(value, name, 0)]
    while stack:
        item, where, depth = stack.pop()
        where = writable(where)  # a field's name may hold the very surrogate
        if depth > MAX_NESTING:
            return f"{where or 'line'} is nested more than {MAX_NESTING} deep"
        if isinstance(item, str) and not is_utf8(item):
            lone = next(c for c in item if not is_utf8(c))
            return f"{where or 'text'} holds a lone surrogate ({lone!a}), which UTF-8 cannot carry"
        if isinstance(item, dict):
            stack += [
                (key, f"{where}.{key}" if where else "a field name", depth + 1) for key in item if not is_utf8(key)
            ]
            stack += [(v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in item.items()]
        elif isinstance(item, list):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item)]
    return None


def writable(text: str) -> str:
    """A server's text, with any lone surrogate (JSON can carry one escaped) made "?": an
    answer already paid for must never be one the writer cannot write."""
    return text if is_utf8(text) else text.encode("utf-8", "replace").decode()


def is_utf8(text: str) -> bool:
    if text.isascii():  # a flag of the string: no scan
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def over(generation: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The run's settings with a row's own over them. A schema of the row's replaces the
    run's of either kind: the API takes responseSchema or responseJsonSchema, never both."""
    if own.keys() & SCHEMA_FIELDS:
        generation = {key: value for key, value in generation.items() if key not in SCHEMA_FIELDS}
    return {**generation, **own}


SCHEMA_FIELDS = {"responseSchema", "responseJsonSchema"}


def row_problem(prompt: Any, instruction: Any, own: Any) -> str | None:
    """Why a row cannot be sent as it is, if it cannot."""
    if prompt is None:
        return "no prompt"
    if not isinstance(prompt, str):
        return "prompt is not a string"
    if not prompt.strip():
        return "prompt is empty"
    if instruction is not None and not isinstance(instruction, str):
        return "system_instruction is not a string"
    return None if isinstance(own, dict) else "config is not a JSON object"


def generation_config(generation: dict[str, Any]) -> tuple[Any, AnswerFormat | None]:
    """GenerateContentConfig of camelCase `generation`, and the JSON its answers must be;
    ValueError naming the first field that is wrong (a misspelt one included)."""
    import pydantic
    from google.genai import types

    if misplaced := sorted(generation.keys() & set(SDK_OPTIONS)):
        raise ValueError(f"{misplaced[0]} is an option of the SDK, not a generation setting")
    asks_schema = generation.get("responseJsonSchema") is not None or generation.get("responseSchema") is not None
    if asks_schema and not generation.get("responseMimeType"):
        generation = {**generation, "responseMimeType": "application/json"}  # the API takes a schema only with it
    try:
        config = types.GenerateContentConfig.model_validate(generation)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        raise ValueError(f"{'.'.join(map(str, error['loc'])) or 'config'}: {error['msg']}") from None
    if config.response_json_schema is not None:
        return config, AnswerFormat.of(config.response_json_schema)
    return config, AnswerFormat.of({}) if asks_schema or config.response_mime_type == "application/json" else None


def job_generation(settings: Settings) -> dict[str, Any]:
    """The run's generation settings, camelCase: GENERATION_CONFIG's fields, GENERATION_FIELDS over them."""
    generation = (
        camel_keys(load_json_object(settings.generation_config, "--generation-config"))
        if settings.generation_config
        else {}
    )
    for attribute, api_field in GENERATION_FIELDS.items():
        if (value := getattr(settings, attribute)) is not None:
            generation[api_field] = AS_SENT.get(api_field, lambda value: value)(value)
    return generation


def request_generation(settings: Settings, generation: dict[str, Any]) -> dict[str, Any]:
    """What every request carries: the job's generation settings, REQUEST_FIELDS' and BUDGET_FIELDS'."""
    asked = {
        api_field: value
        for attribute, api_field in REQUEST_FIELDS.items()
        if (value := getattr(settings, attribute)) is not None
    }
    generation = {**generation, **asked}
    for attribute, place in BUDGET_FIELDS.items():
        if (value := getattr(settings, attribute)) is None:
            continue
        outer, _, name = place.rpartition(".")
        value = value.upper() if name == "thinkingLevel" else value
        if outer:  # GENERATION_CONFIG's thinkingConfig keeps its other fields (includeThoughts)
            generation[outer] = {**generation.get(outer, {}), name: value}
        else:
            generation[name] = value
    return generation


# the generation fields that are no part of a job's identity
BUDGET_KEYS = {place.split(".")[0] for place in BUDGET_FIELDS.values()}


def budget_of(config: Any) -> dict[str, Any]:
    """The budget a request was asked with (a GenerateContentConfig, or None), by setting: the record's `budget`."""
    thinking = getattr(config, "thinking_config", None)
    values = {
        "max_output_tokens": getattr(config, "max_output_tokens", None),
        "thinking_budget": getattr(thinking, "thinking_budget", None),
        "thinking_level": (enum_text(thinking.thinking_level) or "").lower() or None if thinking else None,
    }
    return {name: value for name, value in values.items() if value is not None}


AS_SENT: dict[str, Callable[[Any], Any]] = {  # the GENERATION_FIELDS whose setting is not sent as it is
    "systemInstruction": lambda text: instruction_content(text),
    "responseJsonSchema": lambda path: load_json_object(path, "--response-schema"),
    "mediaResolution": lambda level: f"MEDIA_RESOLUTION_{level.upper()}",
}


def context_turns(paths: list[Path] | None) -> list[dict[str, Any]]:
    """CONTEXT's files as the one user turn sent before every prompt (a part each, in order)."""
    texts = []
    for path in paths or []:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PipelineError(f"--context {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise PipelineError(f"--context {path}: not UTF-8 text") from None
    return [{"role": "user", "parts": [{"text": text} for text in texts]}] if texts else []


def job_settings(generation: dict[str, Any], context: list[dict[str, Any]]) -> dict[str, Any]:
    """What the job's answers depend on besides the model: its generation settings but
    their budget (BUDGET_FIELDS, GENERATION_CONFIG's included), and its context (hashed)."""
    digests = [hashlib.sha256(text.encode()).hexdigest() for text in turn_texts(context)]
    generation = {name: value for name, value in generation.items() if name not in BUDGET_KEYS}
    return {**generation, "context": digests} if digests else generation


def job_identity(settings: Settings, generation: dict[str, Any], context: list[dict[str, Any]]) -> str:
    """The job, as one string: model, settings, context, and the folder its answers go to."""
    return json_line(
        {
            "model": settings.model,
            "settings": job_settings(generation, context),
            "output": str(settings.output_dir.resolve()),
        }
    )


@dataclass(frozen=True)
class Job:
    """What a job's answers depend on, made once from the settings: what resume, the cache
    and the uploads know it by (a rerun with other settings is another job's answers)."""

    generation: dict[str, Any]  # its generation settings, camelCase (job_generation)
    context: list[dict[str, Any]]  # CONTEXT, as the user turn sent before each prompt
    maker: PromptMaker  # how its rows become requests
    identity: str  # model, settings, context and output folder as one string (job_identity)

    @classmethod
    def of(cls, settings: Settings) -> Job:
        generation, context = job_generation(settings), context_turns(settings.context)
        maker = PromptMaker.of(request_generation(settings, generation), context, files_dir(settings))
        return cls(generation, context, maker, job_identity(settings, generation, context))

    @property
    def settings(self) -> dict[str, Any]:
        """What its answers depend on besides the model (job_settings): what JOB_FILE records."""
        return job_settings(self.generation, self.context)

    @property
    def tag(self) -> str:
        """Its identity hashed: what names its cache and its uploads."""
        return job_tag(self.identity)


def job_tag(identity: str) -> str:
    """The job's identity (see job_identity) hashed: what names its cache and its uploads."""
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def load_json_object(path: Path, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PipelineError(f"{flag} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PipelineError(f"{flag} {path}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{flag} {path}: not a JSON object")
    return value


def camel_keys(config: dict[str, Any]) -> dict[str, Any]:
    """GenerateContentConfig's fields by the API's names: max_output_tokens -> maxOutputTokens."""
    return {CAMEL.sub(lambda m: m[1].upper(), key): value for key, value in config.items()}


def instruction_content(text: str) -> dict[str, Any]:
    return {"parts": [{"text": text}]}


def user_turn(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


def turn_texts(contents: list[Any]) -> list[str]:
    """The texts of the parts of `contents` (turns, as the API's JSON has them)."""
    return [
        str(part["text"])
        for turn in contents
        for part in turn.get("parts") or []
        if isinstance(part, dict) and "text" in part
    ]


def text_tokens(texts: list[str]) -> int:
    """Input tokens estimated from characters, before the API has counted any (CHARS_PER_TOKEN)."""
    return sum(map(len, texts)) // CHARS_PER_TOKEN


def own_id(value: Any, where: str) -> tuple[str, str]:
    """A row's id and origin: its own id if it names one, else where it stands."""
    return (str(value), where) if value not in (None, "") else (where, "")


def last_user_text(contents: list[Any]) -> str:
    """The text of the last user turn: what a multi-turn request's record shows as its prompt."""
    for content in reversed(contents):
        if (
            isinstance(content, dict)
            and content.get("role", "user") == "user"
            and isinstance(content.get("parts"), list)
        ):
            return "".join(str(part.get("text", "")) for part in content["parts"] if isinstance(part, dict))
    return ""


# ------------------------------------------------------------------ reader --
async def list_input_files(input_dir: Path) -> list[Path]:
    """The regular, non-hidden files of the input dir, in natural order (2 before 10)."""
    with stop_on_os_error(f"cannot read input dir {input_dir}"):
        entries = await aiofiles.os.scandir(input_dir)
    names = [entry.name for entry in entries if not entry.name.startswith(".") and is_input_file(entry)]
    for name in names:  # ids are made of it: one that JSON cannot carry is refused now, not after paying
        if not name.isprintable():  # control characters, or bytes that are not UTF-8 (decoded as lone surrogates)
            shown = repr(name.encode("utf-8", "surrogateescape"))[2:-1]
            raise PipelineError(f"input file name '{shown}' in {input_dir} is not printable UTF-8: rename it")
    return [input_dir / name for name in sorted(names, key=natural_key)]


def is_input_file(entry: os.DirEntry[str]) -> bool:
    """Whether a folder entry is a file to read: a regular file, or a link to one, that is
    not an image, a recording or a PDF (rows name those: lines of bytes are no prompts).
    Folders are passed over; a FIFO, socket or device (reading one could hang the run or
    never end), or a link that cannot be followed (a loop, say), stops the run with one line."""
    if (mimetypes.guess_type(entry.name, strict=False)[0] or "").startswith(MEDIA_ONLY):
        return False  # a row's file, checked when a row names it (FilesFolder)
    try:
        mode = entry.stat().st_mode
    except FileNotFoundError:
        return False  # a link to nothing, or a file gone since the listing
    except OSError as exc:
        raise PipelineError(f"input file {entry.path}: {exc.strerror or exc}") from None
    if S_ISDIR(mode):
        return False
    if not S_ISREG(mode):
        raise PipelineError(
            f"input file {entry.path} is not a regular file (a FIFO, socket or device): move it out of the input folder"
        )
    return True


def natural_key(name: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def read_prompts(path: Path, maker: PromptMaker, answered: Answered | None = None) -> AsyncIterator[list[Prompt]]:
    """The prompts of one file, in runs (an await per run, not per prompt), read as its
    InputFormat says (an OSError: see cannot_read). A format may leave out, unmade, the
    prompts `answered` holds as they are now (a rerun's readers skip those anyway)."""
    return input_format(path).prompts(path, maker, answered)


def cannot_read(path: Path) -> contextlib.AbstractContextManager[None]:
    """What an error reading an input file becomes: a one-line stop naming it."""
    return stop_on_os_error(f"cannot read input file {path}")


@dataclass(frozen=True)
class InputFormat:
    """How one kind of input file becomes prompts. A new format of rows is its rows, a counter
    and a start-up check (see rows_format: each row becomes a Prompt as a JSONL row does),
    and its line in INPUT_FORMATS; reading, the progress total and the checks follow."""

    # the file's prompts, in order, in runs
    prompts: Callable[[Path, PromptMaker, Answered | None], AsyncIterator[list[Prompt]]]
    count: Callable[[Path], Awaitable[int]]  # how many it holds, without making them (the progress total)
    check: Callable[[Path], None]  # at start-up, in a thread: PipelineError if no prompt can come from the file
    delimiter: str = ""  # a table's cell separator; "": not a table


def input_format(path: Path) -> InputFormat:
    return INPUT_FORMATS.get(path.suffix.lower(), INPUT_FORMATS[""])


async def text_prompts(path: Path, maker: PromptMaker, answered: Answered | None = None) -> AsyncIterator[list[Prompt]]:
    """A prompt per non-blank line; blank lines are skipped but still counted in the ids.
    A line `answered` holds with this very text is left out before its Prompt is made: a
    rerun of a finished job of a million lines reads them in a third less time."""
    done = answered.lines_of(path.name) if answered else None
    async for first, lines in read_lines(path):
        for run in in_runs(line_prompts(path.name, first, lines, maker.prompt, done)):
            yield run


async def jsonl_prompts(
    path: Path, maker: PromptMaker, _answered: Answered | None = None
) -> AsyncIterator[list[Prompt]]:
    """A request per non-blank line (see PromptMaker.from_json)."""
    async for first, lines in read_lines(path):
        for run in in_runs(line_prompts(path.name, first, lines, lambda where, text: maker.from_json(text, where))):
            yield run


def line_prompts(
    name: str, first: int, lines: list[bytes], make: Callable[[str, str], Prompt], done: array.array[int] | None = None
) -> Iterator[Prompt]:
    """The prompt `make` makes of each non-blank line of file `name`, from line number `first`
    on (from its place, <name>:<number>, and its text stripped); or the failure of a line
    that cannot be read (see decode); but none for a line whose text `done` holds at its
    number (see Answered.lines_of). Not an async generator: one more await per line costs
    the reader about a tenth of its speed."""
    texts = clean_texts(lines, first)
    read = (
        zip(texts, itertools.repeat(None))
        if texts is not None
        else (decode(line, n == 1) for n, line in enumerate(lines, first))
    )
    for number, (text, error) in enumerate(read, first):
        if error:
            yield Prompt(f"{name}:{number}", text, error=error)
        elif (text := text.strip()) and not (done and number < len(done) and done[number] == hash(text)):
            yield make(f"{name}:{number}", text)


def clean_texts(lines: list[bytes], first: int) -> list[str] | None:
    """The lines decoded in one call (a leading BOM dropped), when all are UTF-8 without a
    NUL, as nearly all are; else None, and decode() says which are not."""
    try:
        text = b"\n".join(lines).decode("utf-8-sig" if first == 1 else "utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text.split("\n")


def in_runs(prompts: Iterator[Prompt]) -> Iterator[list[Prompt]]:
    """`prompts` in lists of up to PROMPTS_PER_RUN: an await per list, not per prompt."""
    while run := list(itertools.islice(prompts, PROMPTS_PER_RUN)):
        yield run


async def count_lines(path: Path) -> int:
    """The non-blank lines of a file."""
    return sum([sum(1 for line in lines if line.strip()) async for _, lines in read_lines(path)])


async def count_table_rows(path: Path) -> int:
    """A table's rows after its header, as the reader reads them."""
    return max(sum([len(rows) async for rows in table_rows(path)]) - 1, 0)


async def csv_rows(path: Path) -> AsyncIterator[list[Row]]:
    """A row per table row after a header naming a prompt column (and optionally id and
    system_instruction; other columns are carried into the records). Read by the csv
    module, as Excel writes (see table_rows); a row's place is the line where it starts."""
    header: list[str] | None = None
    async for rows in table_rows(path):
        if header is None and (opening := next((row for row in rows if not row[2]), None)):
            header = table_header(path, opening[0], opening[1])
            rows = [row for row in rows if row is not opening]
        yield [table_row(path, row, header) for row in rows]


def table_row(path: Path, row: tuple[int, list[str], str | None], header: list[str] | None) -> Row:
    """A table's row by its column names (a row before the header is one that cannot be read);
    empty id and system_instruction cells are no values."""
    number, cells, error = row
    where = f"{path.name}:{number}"
    if error or header is None:  # no row can hold it: that row fails
        return Row(where, {}, error or "row before the header", " ".join(cells).strip())
    if len(cells) != len(header):
        shown = input_format(path).delimiter.join(cells).strip()
        return Row(where, {}, f"row has {len(cells)} cells, the header {len(header)}", shown)
    columns = zip(header, cells, strict=True)
    return Row(where, {name: cell for name, cell in columns if cell or name not in ("id", "system_instruction")})


def table_header(path: Path, number: int, cells: list[str]) -> list[str]:
    """A table's column names; PipelineError if none is prompt, saying how the line was split."""
    header = [cell.strip() for cell in cells]
    if "prompt" in header:
        return header
    delimiter = input_format(path).delimiter
    seen = "tab" if delimiter == "\t" else "comma"
    other = next(
        (
            name
            for mark, name in ((";", "semicolon"), ("\t", "tab"), (",", "comma"))
            if mark != delimiter and mark in "".join(cells)
        ),
        None,
    )
    hint = f"; it looks {other}-separated: save it comma-separated as .csv, or tab-separated as .tsv" if other else ""
    raise PipelineError(
        f"{path}, line {number}: the header names no 'prompt' column (read as {seen}-separated: "
        f"{', '.join(header)[:200]}){hint}"
    )


async def table_rows(path: Path) -> AsyncIterator[list[tuple[int, list[str], str | None]]]:
    """The non-blank rows of a CSV or TSV file, each with the line it starts on and why it
    cannot be a row, if it cannot. Parsed by the csv module in a worker thread, TABLE_ROWS
    at a time (each run of rows comes as a list): linear in the file's size, a cell of any
    size, streaming."""
    rows = read_table(path, input_format(path).delimiter)
    try:
        while batch := await asyncio.to_thread(list, itertools.islice(rows, TABLE_ROWS)):
            yield batch
    finally:
        rows.close()


def read_table(path: Path, delimiter: str) -> Iterator[tuple[int, list[str], str | None]]:
    """table_rows' reading, in a thread. Excel's rules (RFC 4180, and a quote inside an
    unquoted cell is just a character); CRLF, LF and bare CR line ends. Bytes that are not
    UTF-8 fail their row. A last quoted cell never closed swallows an END_OF_FILE line
    we add after the file's own, so that it fails its row instead of passing silently."""
    csv.field_size_limit(sys.maxsize)  # the csv module's own limit (128 KiB) would refuse long prompts
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as file:
        reader = csv.reader(itertools.chain(file, [f"{END_OF_FILE}\n"]), delimiter=delimiter)
        start = 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, [], f"row is not CSV ({exc})"
            else:
                if cells and END_OF_FILE in cells[-1]:
                    if cells != [END_OF_FILE]:
                        yield (
                            start,
                            [*cells[:-1], cells[-1].split(END_OF_FILE)[0][:200]],
                            "a quoted cell is never closed",
                        )
                    return
                if any(cell.strip() for cell in cells):
                    yield start, *cell_problem(cells)
            start = reader.line_num + 1


def cell_problem(cells: list[str]) -> tuple[list[str], str | None]:
    """A row's cells, and why it cannot be a prompt if it cannot (NUL, bytes not UTF-8)."""
    if any("\x00" in cell for cell in cells):
        return [cell.replace("\x00", "\ufffd") for cell in cells], "row holds a NUL byte: not text"
    if not all(map(is_utf8, cells)):
        return [
            writable(cell.encode("utf-8", "surrogateescape").decode("utf-8", "replace")) for cell in cells
        ], "row is not valid UTF-8"
    return cells, None


END_OF_FILE = "\ud800 end of file"  # a line no file can hold: surrogateescape makes only \udc80-\udcff
TABLE_ROWS = 512  # CSV rows parsed per trip to the worker thread
PROMPTS_PER_RUN = 1024  # prompts a reader takes from a file at a time (see in_runs)


async def read_lines(path: Path) -> AsyncIterator[tuple[int, list[bytes]]]:
    """The lines of a file, a chunk of READ_CHUNK_BYTES at a time: one thread hop and one
    await per chunk, not per line, the file's opening and closing included (a rerun reads
    a thousand shards: a hop each for open, read, and close took 2 ms a file). Each run of
    lines comes with the number of its first."""
    number, file = 1, None
    try:
        unfinished = bytearray()  # the line across chunks, grown in place: linear time, memory about one line
        while True:
            file, chunk = await next_chunk(path, file)
            first, *rest = chunk.split(b"\n")
            unfinished += first
            if rest:
                lines = [unfinished, *rest[:-1]]
                yield number, lines
                number += len(lines)
                unfinished = bytearray(rest[-1])
            if file is None:
                break
        if unfinished:
            yield number, [unfinished]
    finally:
        if file is not None:  # the reader stopped early
            file.close()


@aiofiles.os.wrap
def next_chunk(path: Path, file: BinaryIO | None) -> tuple[BinaryIO | None, bytes]:
    """In a thread: the next READ_CHUNK_BYTES of `file`, opening `path` first if it is None;
    with None for the file once the chunk is its last (it is closed then)."""
    file = file or open(path, "rb")  # noqa: SIM115 (closed at its end, or by read_lines)
    try:
        chunk = file.read(READ_CHUNK_BYTES)
        # short: at the end?
        while len(chunk) < READ_CHUNK_BYTES and (more := file.read(READ_CHUNK_BYTES - len(chunk))):
            chunk += more
    except BaseException:
        file.close()
        raise
    if len(chunk) < READ_CHUNK_BYTES:
        file.close()
        return None, chunk
    return file, chunk


def decode(line: bytes, first: bool) -> tuple[str, str | None]:
    """A line's text (a leading BOM dropped); and why it cannot be a prompt, if it cannot."""
    try:
        text = line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return line.decode("utf-8", errors="replace").strip(), f"line is not valid UTF-8 (byte {exc.start + 1})"
    if "\x00" in text:  # a binary file among the inputs: no prompt holds NUL, and sending it would be paid for
        return text.replace("\x00", "\ufffd").strip(), f"line holds a NUL byte (byte {line.index(0) + 1}): not text"
    return text, None


def rows_format(
    rows: Callable[[Path], AsyncIterator[list[Row]]],
    count: Callable[[Path], Awaitable[int]],
    check: Callable[[Path], None],
    delimiter: str = "",
) -> InputFormat:
    """The InputFormat of a kind of file that holds rows (a dict of columns each, with its
    place): every row becomes its Prompt through PromptMaker.from_row, as a JSONL row does;
    one that cannot be read fails, its place its id (as a JSONL line that is not JSON)."""

    async def prompts(path: Path, maker: PromptMaker, _answered: Answered | None = None) -> AsyncIterator[list[Prompt]]:
        async for batch in rows(path):
            yield [
                maker.from_row(row.columns, row.where)
                if row.error is None
                else Prompt(row.where, row.shown, error=row.error)  # known by its place, as its error says where
                for row in batch
            ]

    return InputFormat(prompts, count, check, delimiter)


class Row(typing.NamedTuple):
    """One row of a file of rows, its values JSON-native (what a record can carry). A tuple:
    made for each row of a file, it must cost next to nothing."""

    where: str  # its place, "<file name>:<row number>": its id unless it names one
    columns: dict[str, Any]  # by column name
    error: str | None = None  # why it cannot be a prompt, if it cannot (then columns is empty)
    shown: str = ""  # with an error: its prompt as far as it could be read, for failed.jsonl


PARQUET_ROWS = 1024  # rows of a Parquet file read per trip to the worker thread (a record batch)


def parquet_file(path: Path) -> Any:
    """`path` opened as Parquet (its metadata read, not its data); a one-line stop if pyarrow
    is missing, or the file is not Parquet or is torn."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise PipelineError(f"{path.name} needs pyarrow: pip install pyarrow") from None
    try:
        return pyarrow.parquet.ParquetFile(path, page_checksum_verification=True)  # where the writer wrote checksums
    except OSError as exc:
        raise PipelineError(f"input file {path} cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 (pyarrow's ArrowInvalid: not Parquet, or torn)
        raise PipelineError(
            f"input file {path} is not a Parquet file, or is torn ({str(exc).splitlines()[0][:200]})"
        ) from None


def parquet_checked(path: Path) -> None:
    """At start-up: the file opens as Parquet, and has a prompt column."""
    names = parquet_file(path).schema_arrow.names
    if "prompt" not in names:
        raise PipelineError(f"{path}: the Parquet file has no 'prompt' column (its columns: {', '.join(names)[:200]})")


async def count_parquet_rows(path: Path) -> int:
    """The rows of a Parquet file, from its metadata: no pass over the data."""
    return int((await asyncio.to_thread(parquet_file, path)).metadata.num_rows)


async def parquet_rows(path: Path) -> AsyncIterator[list[Row]]:
    """A Parquet file's rows, a record batch at a time (iter_batches: row group by row group,
    so memory does not grow with the file), each batch read and made JSON-native in a thread."""
    batches = (await asyncio.to_thread(parquet_file, path)).iter_batches(batch_size=PARQUET_ROWS)
    first = 1
    while batch := await asyncio.to_thread(next_rows, path, batches, first):
        yield batch
        first += len(batch)


def next_rows(path: Path, batches: Iterator[Any], first: int) -> list[Row]:
    """In a thread: the next record batch's rows, numbered from `first`; [] at the end. Data
    that cannot be decoded (a torn or damaged file) stops the run, naming the file and row."""
    try:
        batch = next(batches, None)
    # pyarrow's OSError or ArrowInvalid: the bytes are not what the metadata says
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(
            f"input file {path} is damaged after row {first - 1}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if batch is None:
        return []
    return [parquet_row(f"{path.name}:{number}", columns) for number, columns in enumerate(batch.to_pylist(), first)]


def parquet_row(where: str, columns: dict[str, Any]) -> Row:
    """A Parquet row as a JSONL row would be: a JSON string of `config` parsed, nulls left out
    of a struct `config` (a struct column holds every row's keys), and each value JSON-native:
    timestamps and dates as ISO text, decimals as strings; bytes, NaN and an id that is not
    a string or whole number fail the row (JSON cannot carry them; a JSONL row fails alike)."""
    try:
        row = {name: json_native(value, name) for name, value in columns.items()}
        if isinstance(config := row.get("config"), str):
            row["config"] = json.loads(config) if config.strip() else None
        if isinstance(row.get("config"), dict):
            row["config"] = without_nulls(row["config"])
        if row.get("id") is not None and (not isinstance(row["id"], str | int) or isinstance(row["id"], bool)):
            raise ValueError("its id is not a string or a whole number")
        if any(isinstance(text := row.get(name), str) and "\x00" in text for name in ("prompt", "system_instruction")):
            raise ValueError("its prompt or system_instruction holds a NUL byte: not text (a damaged file?)")
    except ValueError as exc:
        return Row(where, {}, str(exc), str(columns.get("prompt") or "")[:1000])
    return Row(where, row)


def json_native(value: Any, where: str) -> Any:
    """`value` as JSON carries it; ValueError for what JSON cannot (bytes, NaN, infinity)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"column {where} holds {value}, which JSON cannot carry")
        return value
    if isinstance(value, dict):
        return {str(key): json_native(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_native(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"column {where} holds bytes, which JSON cannot carry (name the file in files instead)")
    return str(value)  # a Decimal, a timedelta: their exact text


def without_nulls(config: dict[str, Any]) -> dict[str, Any]:
    """A struct's fields that are set: a null is a field another row set, not a setting."""
    return {
        key: without_nulls(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if value is not None
    }


BINARY_SIGNATURES = {  # the first bytes of files that are data, not prompts, by what they are
    b"PAR1": "a Parquet file (name it .parquet)",
    b"ARROW1": "an Arrow or Feather file",
    b"\x93NUMPY": "a NumPy .npy file",
    b"PK\x03\x04": "a zip archive",
    b"\x1f\x8b": "a gzip archive",
    b"SQLite format 3\x00": "an SQLite database",
    b"\x7fELF": "a program",
}


def text_checked(path: Path) -> None:
    """At start-up: a file read as text or rows of text is not data by mistake (an Arrow file,
    a .npy, a zip, a file whose first line holds NUL bytes), which would be thousands of failed
    lines: it stops the run, naming it. A text file with a NUL on some later line fails that line."""
    try:
        with open(path, "rb") as file:
            head = file.read(8192)
    except OSError:
        return  # the reader says so, in one line, when it reaches the file: what comes before is answered
    what = next((name for signature, name in BINARY_SIGNATURES.items() if head.startswith(signature)), None)
    if what is None and b"\x00" in head.split(b"\n", 1)[0]:
        what = "binary data (NUL bytes on its first line)"
    if what is not None:
        raise PipelineError(f"input file {path} is {what}, not prompts: move it out of the input folder")


def table_checked(path: Path) -> None:
    """At start-up: text_checked, and a header naming a prompt column (see table_header)."""
    text_checked(path)
    rows = read_table(path, input_format(path).delimiter)
    with cannot_read(path), contextlib.closing(rows):
        if opening := next((row for row in rows if not row[2]), None):
            table_header(path, opening[0], opening[1])


async def inputs_checked(files: list[Path]) -> list[Path]:
    """`files`, once each has passed its format's start-up check (in one trip to a thread):
    a file that no prompt can come from stops the run before any request, not once the
    reader reaches it."""

    def check_all() -> None:
        for path in files:
            input_format(path).check(path)

    await asyncio.to_thread(check_all)
    return files


INPUT_FORMATS = {  # by file extension; "" for any other file
    ".jsonl": InputFormat(jsonl_prompts, count_lines, text_checked),
    ".csv": rows_format(csv_rows, count_table_rows, table_checked, delimiter=","),
    ".tsv": rows_format(csv_rows, count_table_rows, table_checked, delimiter="\t"),
    ".parquet": rows_format(parquet_rows, count_parquet_rows, parquet_checked),
    "": InputFormat(text_prompts, count_lines, text_checked),
}


# ------------------------------------------------------------------ asking --
async def answer(run: Run, prompt: Prompt) -> Outcome | None:
    """Ask the model until it answers, fails for good, or attempts run out (retried, with
    the GENERATION policy). None if the run stops first: the prompt stays unanswered, for
    the next run."""
    if prompt.error:
        return Failure(prompt, prompt.error, attempts=0, permanent=True)
    gate = run.limits.gate
    tokens = estimated_tokens(prompt) + run.asking.maker.prefix_tokens if gate.counts_tokens else 0
    if tokens and (too_large := gate.never_admits(tokens)):
        return Failure(prompt, too_large, attempts=0)
    tried = 0

    def attempt(number: int) -> Awaitable[Outcome]:  # not a coroutine of its own: one await less per request
        nonlocal tried
        tried = number
        return attempted(run, prompt, tokens, number)

    try:
        outcome = await run.retried(attempt, GENERATION)
    except GateClosed:
        return None
    except PipelineError:  # the run's to stop (a refused key, an upload's journal on a full disk), not this prompt's
        raise
    except Exception as exc:  # noqa: BLE001 (the SDK's and the network's errors, sorted by classify())
        outcome = Failure(prompt, describe(exc, run.settings), tried, permanent=classify(exc) == "permanent")
        run.asking.fail_fast.watch(outcome)
    log.debug("%s %s (attempt %d)", "generated" if isinstance(outcome, Response) else "failed", prompt.id, tried)
    return outcome


async def attempted(run: Run, prompt: Prompt, tokens: int, attempt: int) -> Outcome:
    """One attempt at `prompt`: the request, and its reply judged. A reply not as asked that
    another attempt may fix raises AskAgain; an error no prompt would escape stops the run."""
    try:
        reply = await ask(run, prompt, tokens)
    except Exception as exc:
        refused_for_every_prompt(exc, prompt, run.settings)
        raise
    outcome = to_outcome(prompt, reply, attempt, run.settings)
    unfit = not_as_asked(outcome)
    run.asking.fail_fast.watch(unfit or outcome)  # each reply, one about to be asked again too
    run.asking.fail_fast.cut_short.watch(outcome)
    if unfit and attempt < run.settings.max_attempts and worth_asking_again(outcome) and not run.asking.fail_fast.stop:
        raise AskAgain(unfit.error)
    return unfit or outcome


class AskAgain(Exception):  # noqa: N818 (not a fault: a reply that another attempt may better)
    """A reply not the JSON asked for, from a model that samples: asked again at once."""


@dataclass
class FailFast:
    """Stops a run that would fail every prompt alike: when its first FAIL_FAST_OUTCOMES
    replies (a reply about to be asked again included) or refusals all fail one way that
    no retry fixes (a setting the API refuses, answers that are not the JSON asked for,
    answers cut short at their budget), or postprocess() fails on the first answers it is
    given, the rest would fail the same way, each paid for. The stop comes once the
    outcome that completed the opening is on its way to the writers: nothing paid is lost."""

    # the first verdicts: "" or a failure's kind
    openings: dict[str, list[str]] = field(default_factory=lambda: {"asked": [], "postprocessed": []})
    examples: dict[str, str] = field(default_factory=dict)  # by opening: its first failure's own words, for the message
    stop: PipelineError | None = None  # once an opening is all one failure: the error that ends the run
    # stops nothing, but says it: most answers cut short
    cut_short: CutShortWarning = field(default_factory=lambda: CutShortWarning())

    def watch(self, outcome: Outcome) -> None:
        """A reply, or a prompt's refusal, judged (see failure_kind), while the opening lasts."""
        if len(self.openings["asked"]) < FAIL_FAST_OUTCOMES:
            self.judge("asked", failure_kind(outcome), outcome)

    def watch_postprocessed(self, done: list[Outcome]) -> None:
        """The writers' outcomes after postprocess(): answers it took, and those it failed on."""
        for outcome in done:
            if isinstance(outcome, Response) or outcome.error.startswith(POSTPROCESS_FAILED):
                self.judge("postprocessed", "" if isinstance(outcome, Response) else "postprocess", outcome)

    def judge(self, stage: str, kind: str, outcome: Outcome) -> None:
        opening = self.openings[stage]
        if len(opening) >= FAIL_FAST_OUTCOMES:
            return
        opening.append(kind)
        if kind and isinstance(outcome, Failure):
            self.examples.setdefault(stage, outcome.error)
        if len(opening) == FAIL_FAST_OUTCOMES and opening[0] and len(set(opening)) == 1 and self.stop is None:
            self.stop = PipelineError(stop_message(kind, self.examples[stage]))

    def check(self) -> None:
        """Raise the error that ends the run, once there is one."""
        if self.stop is not None:
            raise self.stop


def failure_kind(outcome: Outcome) -> str:
    """What a reply or refusal failed of, the same for all alike: "" if it did not (or a retry may help)."""
    if isinstance(outcome, Response):
        return ""
    if outcome.cut_short:
        return "cut short"
    if outcome.permanent:
        return "not as asked" if outcome.response is not None else outcome.error
    return ""


def stop_message(kind: str, example: str) -> str:
    first = f"the first {FAIL_FAST_OUTCOMES}"
    if kind == "not as asked":
        return (
            f"{first} answers were all not the JSON asked for (the first: {example}): "
            f"check --response-schema and the prompts; the answers are in {FAILED_FILE}"
        )
    if kind == "cut short":
        return f"{first} answers were all cut short (the first: {example}); the answers are in {FAILED_FILE}"
    if kind == "postprocess":
        return (
            f"postprocess() failed on {first} answers (the first: {example}): fix it; the answers are in {FAILED_FILE}"
        )
    blocked = kind.startswith("response has no text")  # the model declined: the prompts' doing
    return f"{first} prompts all failed the same way, which no retry fixes: {kind}; " + (
        "check the prompts, or safety_settings in --generation-config" if blocked else "check --model and the settings"
    )


@dataclass
class CutShortWarning:
    """Says once, early, when most answers are cut short at their budget: with thinking
    models, thoughts come first out of max_output_tokens, and a budget that fits the answer
    alone leaves none of it. Better said after 20 answers than found in the morning."""

    seen: int = 0  # replies among the first CUT_SHORT_OF
    thinking: list[int] = field(default_factory=list)  # the thinking tokens of each cut short among them

    def watch(self, outcome: Outcome) -> None:
        if self.seen >= CUT_SHORT_OF or len(self.thinking) >= CUT_SHORT_WARN:
            return
        self.seen += 1
        if (isinstance(outcome, Failure) and outcome.cut_short) or (
            isinstance(outcome, Response) and outcome.finish_reason == "MAX_TOKENS"
        ):
            self.thinking.append(
                int((outcome.usage or {}).get("thinking_tokens", 0))
                if isinstance(outcome, Failure)
                else outcome.thinking_tokens
            )
            if len(self.thinking) == CUT_SHORT_WARN:
                log.warning("%s", self.said(budget_of(outcome.prompt.config).get("max_output_tokens")))

    def said(self, limit: int | None) -> str:
        mean = sum(self.thinking) / len(self.thinking)
        return (
            f"{len(self.thinking)} of the first {self.seen} answers were cut short at {cut_at(limit)}: thinking "
            f"averaged {mean:,.0f}"
            f"{f' of {limit:,}' if limit else ''} tokens; {LESS_THINKING}: a rerun with a larger budget asks them again"
        )


async def ask(run: Run, prompt: Prompt, tokens: int) -> Any:
    """One request, through each limit in turn: the host reachable, then its files ready (an
    upload may take long: before it takes a place), a place among those in flight, the Gate's
    turn. The reply; GateClosed once the run stops asking."""
    limits = run.limits
    async with limits.outage:
        contents = run.asking.maker.contents(prompt)
        if prompt.media:
            contents = await run.asking.media.contents(prompt, contents)
        async with limits.concurrency, limits.gate.admit(tokens) as admitted:
            admitted.reply = (
                await run.client.aio.models.generate_content(  # --timeout-s is the client's own (see connect)
                    model=run.settings.model, contents=contents, config=prompt.config
                )
            )
    run.progress.tally.bill(admitted.reply.usage_metadata)
    return admitted.reply


def refused_for_every_prompt(exc: Exception, prompt: Prompt, settings: Settings) -> None:
    """Raise what stops the run when the API refuses what every request sends: the model, or
    a setting of the run's (a row's own settings fail that row alone)."""
    if classify(exc) != "permanent":
        return
    if api_error_code(exc) == 404:  # generateContent's only 404: no such model
        raise PipelineError(
            f"the API does not know the model: {describe(exc, settings)} (check --model {settings.model})"
        )
    if not prompt.own_settings and (setting := refused_setting(exc)):
        raise PipelineError(f"the API refuses the setting {setting}: {describe(exc, settings)}")


@dataclass(frozen=True)
class RetryPolicy:
    """How one kind of call is tried again when it fails. Every call to the API goes through
    retried() with one of these, so a 429's shared back-off, a refused key, a spent daily
    quota and the run's stop hold alike for prompts, uploads, caches, counts and batch jobs."""

    what: str  # what is tried, for the log
    attempts: int = 0  # tries in all, the first included; 0: MAX_ATTEMPTS; -1: until the run stops (a poll)
    timed: bool = True  # each try bounded by the request timeout (not what the transport bounds, nor transfers)
    host_waits: bool = False  # a connection error waits out the Outage and costs no attempt
    final: frozenset[str] = frozenset({"permanent"})  # kinds of error (see classify) never tried again
    waits_out: tuple[type[Exception], ...] = ()  # errors tried again whatever classify says (a state still to change)
    every_s: float | None = None  # a fixed wait between tries (a poll); None: backoff_s
    # once the run stops asking, raise the last error rather than wait; False: the call itself finds out
    stops_with_run: bool = True

    def gives_up(self, kind: str, attempt: int, settings: Settings) -> bool:
        most = settings.max_attempts if self.attempts == 0 else self.attempts
        return kind in self.final or 0 < most <= attempt


GENERATION = RetryPolicy(
    "a prompt", timed=False, host_waits=True, final=frozenset({"permanent", "edited"}), stops_with_run=False
)
API_CALL = RetryPolicy("a Files, caching or Batch API call")
TRANSFER = RetryPolicy("an upload or download", timed=False)
POLL = RetryPolicy("a look at a batch job", attempts=-1)
COUNT = RetryPolicy("countTokens", attempts=ESTIMATE_ATTEMPTS)
DELETE = RetryPolicy("a delete", attempts=3)


async def retried(
    call: Callable[[int], Awaitable[Any]], policy: RetryPolicy, settings: Settings, limits: Limits, tally: Tally
) -> Any:
    """`call(attempt)` until it returns, as `policy` says: the one loop that waits between
    attempts. A transient error waits backoff_s (or what the server asked); a 429 naming a
    per-minute quota holds every request (Gate.pause); a refused key or a spent daily quota
    stops the run (stop_if_fatal); the last error is raised once no attempt is left."""
    attempt = 1
    while True:
        if limits.gate.paused_until > time.monotonic():  # a 429's shared back-off, for calls that pass no Gate.admit
            await limits.gate.unpaused()
        try:
            if not policy.timed:  # no timeout object per request where the transport bounds it
                return await call(attempt)
            async with asyncio.timeout(request_timeout_s(settings)):
                return await call(attempt)
        except AskAgain as again:
            log.debug("retry %s after attempt %d: %s", policy.what, attempt, again)
        except (PipelineError, GateClosed):
            raise
        except Exception as exc:
            if policy.host_waits and (cause := unreachable(exc)) and await limits.outage.wait_out(cause):
                continue  # the host was down: not this call's attempt
            kind = "transient" if isinstance(exc, policy.waits_out) else classify(exc)
            stop_if_fatal(kind, exc, settings)
            tally.rate_limited += api_error_code(exc) == 429
            if policy.gives_up(kind, attempt, settings) or (policy.stops_with_run and limits.gate.closed):
                raise
            await wait_to_retry(exc, min(attempt, settings.max_attempts), policy, limits.gate, settings)
            if policy.stops_with_run and limits.gate.closed:  # the run stopped asking during the wait
                raise
        tally.retries += 1
        attempt += 1


async def wait_to_retry(exc: BaseException, attempt: int, policy: RetryPolicy, gate: Gate, settings: Settings) -> None:
    """The wait before another attempt: as long as the server asked (RetryInfo), else
    exponential from --retry-base-s with jitter (backoff_s), or the policy's fixed wait. A 429
    naming a per-minute quota holds every request (Gate.pause: each waits it out in Gate.turn
    or Gate.unpaused); other errors hold only this one. Ends early once the run stops asking."""
    delay = policy.every_s if policy.every_s is not None else backoff_s(attempt, exc, settings)
    log.debug("retry %s in %.2f s after attempt %d: %s", policy.what, delay, attempt, describe(exc, settings))
    if classify(exc) == "rate limit":
        gate.pause(delay)
    else:
        await gate.sleep(delay)


def stop_if_fatal(kind: str, exc: BaseException, settings: Settings) -> None:
    """A refused key or a spent daily quota ends the run: no other request would fare better."""
    if kind == "auth" and on_vertex() and not api_key_from_env():
        raise PipelineError(
            f"the credentials were refused ({describe(exc, settings)}); check your Application Default Credentials"
        ) from None
    if kind == "auth":
        raise PipelineError(f"the API key was refused ({describe(exc, settings)}); check GEMINI_API_KEY") from None
    if kind == "cache gone":
        raise StopForNow("the run's context cache is gone (deleted, or expired; a rerun makes another)")
    if kind == "daily quota":
        raise StopForNow(f"the daily quota is exhausted ({', '.join(quota_ids(exc))})")
    if (asked := server_retry_delay_s(exc)) is not None and asked > LONGEST_SERVER_DELAY_S:
        raise StopForNow(f"the server asks to wait {asked / 3600:.1f} h before the next request")


def to_outcome(prompt: Prompt, reply: Any, attempts: int, settings: Settings) -> Outcome:
    """A Response; or a Failure keeping what was paid for, when the reply has no text (e.g.
    blocked for safety) or was cut short at its budget (unless --accept-cut-short)."""
    candidate = reply.candidates[0] if reply.candidates else None
    usage = reply.usage_metadata  # None, or with the counts of 0 left out: token_count reads either as 0
    response = Response(
        prompt=prompt,
        text=writable(reply.text or ""),
        model=writable(reply.model_version or settings.model),
        finish_reason=enum_text(candidate.finish_reason) if candidate else None,
        attempts=attempts,
        prompt_tokens=token_count(usage, "prompt_token_count"),
        response_tokens=token_count(usage, "candidates_token_count"),
        thinking_tokens=token_count(usage, "thoughts_token_count"),
        cached_tokens=token_count(usage, "cached_content_token_count"),
        service_tier=served_tier(reply),
        budget=budget_of(prompt.config) or None,
    )
    if response.finish_reason == "MAX_TOKENS" and not settings.accept_cut_short:
        return Failure(
            prompt,
            cut_short_reason(response),
            attempts,
            response=response.text or None,
            usage=usage_of(response),
            cut_short=True,
        )
    if not response.text:
        block = reply.prompt_feedback.block_reason if reply.prompt_feedback else None
        reason = f"blocked: {enum_text(block)}" if block else f"finish_reason {response.finish_reason}"
        return Failure(prompt, f"response has no text ({reason})", attempts, permanent=True, usage=usage_of(response))
    return response


def cut_short_reason(response: Response) -> str:
    """Why an answer stopped at MAX_TOKENS, in words and the reply's own figures."""
    limit = (response.budget or {}).get("max_output_tokens")
    fix = LESS_THINKING if response.thinking_tokens else "raise --max-output-tokens"
    spent = f"thinking took {response.thinking_tokens:,}, the answer {response.response_tokens:,}"
    return f"cut short at {cut_at(limit)}: {spent}; {fix}"


# what to do when thinking took the budget
LESS_THINKING = "raise --max-output-tokens or lower --thinking-budget (or --thinking-level)"


def cut_at(limit: int | None) -> str:
    """Where an answer is cut: its max_output_tokens, or the model's own limit when unset."""
    return f"max_output_tokens {limit:,}" if limit else "the model's longest answer"


def served_tier(reply: Any) -> str | None:
    """The service tier a reply was served at, from its x-gemini-service-tier header (the SDK
    drops usageMetadata.serviceTier when it parses a reply); None if it does not say."""
    headers = getattr(getattr(reply, "sdk_http_response", None), "headers", None) or {}
    tier = next((value for name, value in headers.items() if name.lower() == "x-gemini-service-tier"), None)
    return tier.strip().lower()[:40] or None if isinstance(tier, str) else None


def not_as_asked(outcome: Outcome) -> Failure | None:
    """An answer that is not the JSON asked for, as a Failure that keeps it (it was paid for)."""
    if isinstance(outcome, Response) and (problem := outcome.parse()):
        return Failure(
            outcome.prompt, problem, outcome.attempts, response=outcome.text, permanent=True, usage=usage_of(outcome)
        )
    return None


def worth_asking_again(outcome: Response) -> bool:
    """Whether asking again may give the JSON an answer was not: when the model samples (a
    temperature above 0, or unset: the models' default is 1), or the answer was cut short."""
    temperature = getattr(outcome.prompt.config, "temperature", None)
    return temperature is None or temperature > 0 or outcome.finish_reason == "MAX_TOKENS"


def enum_text(value: Any) -> str | None:
    """The text of an enum the SDK returns ("STOP"), or of a string it left as one."""
    return None if value is None else writable(str(getattr(value, "value", value)))


def classify(exc: BaseException) -> str:
    """What a failed request means: 'auth', 'daily quota' and 'cache gone' (the run's cache
    was deleted) stop the run; 'edited' (a file changed after its row was read) fails its
    prompt, not for good; 'rate limit' (a 429 naming a per-minute quota) pauses every
    generator; 'capacity' (a 429 naming none, a 503 "overloaded": the server is full) lowers
    the requests in flight (see Concurrency); 'transient' is retried; 'permanent' fails the prompt.

    google-genai raises APIError carrying the HTTP status as `.code`; it is read
    here without importing the SDK, so that --offline starts fast."""
    if isinstance(exc, EditedFile):  # a file changed under the run: not sent, and no retry sends it
        return "edited"
    if type(exc).__module__.startswith("google.auth"):  # Vertex AI: credentials that cannot be refreshed...
        return "transient" if type(exc).__name__ == "TransportError" else "auth"  # ...or not now: the network
    if (code := api_error_code(exc)) is not None:
        if code == 403 and "cachedcontent not found" in str(getattr(exc, "message", "")).lower():
            return "cache gone"
        if code in (401, 403) or any(d.get("reason") == "API_KEY_INVALID" for d in error_details(exc)):
            return "auth"
        if code == 429:
            quotas = quota_ids(exc)  # per-day only: it will not clear for hours; any per-minute: wait
            return "capacity" if not quotas else "daily quota" if all("PerDay" in q for q in quotas) else "rate limit"
        if code == 503 and "overloaded" in str(getattr(exc, "message", "") or getattr(exc, "details", "")).lower():
            return "capacity"
        return "transient" if code == 408 or code >= 500 else "permanent"
    if isinstance(exc, json.JSONDecodeError):  # a garbled reply (a proxy's error page sent as JSON): try again
        return "transient"
    return "transient" if isinstance(exc, network_errors()) else "permanent"


def unreachable(exc: BaseException) -> str | None:
    """Why the host could not be reached, in words, if `exc` says so (not that it answered
    badly or slowly): 'connection refused', 'name not resolved', 'TLS handshake failed'..."""
    connection_errors = tuple(
        getattr(loaded, name)
        for module, names in (
            ("aiohttp", ("ClientConnectionError",)),
            ("httpx", HTTPX_CONNECTION_ERRORS),
            ("httpx2", HTTPX_CONNECTION_ERRORS),
        )
        if (loaded := sys.modules.get(module)) is not None
        for name in names
    )
    if api_error_code(exc) is not None:
        return None  # the host answered
    tls_errors = getattr(sys.modules.get("ssl"), "SSLError", ())  # not imported for --offline
    first_connection_error, seen = None, exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, tls_errors) or "SSL" in name or "Certificate" in name:
            return "TLS handshake failed"
        if isinstance(seen, socket.gaierror) or "DNS" in name:
            return "name not resolved"
        if name in ("ConnectionTimeoutError", "ConnectTimeout"):
            return "connection timed out"
        if name in ("ServerDisconnectedError", "RemoteProtocolError"):
            return "the connection was closed before an answer"
        if isinstance(seen, TimeoutError):
            return None  # an answer too slow: the prompt's own attempt
        if isinstance(seen, OSError) and seen.errno in CONNECTION_ERRNOS:
            return CONNECTION_ERRNOS[seen.errno]
        if type(seen) in CONNECTION_ERROR_WORDS:  # raised without an errno (a peer hanging up mid-handshake)
            return CONNECTION_ERROR_WORDS[type(seen)]
        if first_connection_error is None and isinstance(seen, (ConnectionError, *connection_errors)):
            first_connection_error = seen
        seen = seen.__cause__ or seen.__context__
    if first_connection_error is None:
        return None
    return " ".join(str(getattr(first_connection_error, "strerror", None) or "connection failed").lower().split())


CONNECTION_ERROR_WORDS: dict[type[BaseException], str] = {
    ConnectionRefusedError: "connection refused",
    ConnectionResetError: "connection reset",
    ConnectionAbortedError: "connection aborted",
    BrokenPipeError: "the connection was closed before an answer",
}
HTTPX_CONNECTION_ERRORS = ("ConnectError", "ConnectTimeout", "ReadError", "WriteError", "RemoteProtocolError")
CONNECTION_ERRNOS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ENETDOWN: "network down",
    errno.ETIMEDOUT: "connection timed out",
    errno.EPIPE: "the connection was closed before an answer",
}


def quota_ids(exc: BaseException) -> list[str]:
    """The quotas a google.rpc.QuotaFailure says were exceeded, e.g. 'GenerateRequestsPerDayPerProjectPerModel'."""
    return [
        str(violation.get("quotaId", ""))
        for detail in error_details(exc)
        if detail.get("@type", "").endswith("google.rpc.QuotaFailure")
        for violation in detail.get("violations", [])
        if isinstance(violation, dict)
    ]


def network_errors() -> tuple[type[BaseException], ...]:
    """Timeouts and connection errors of whichever HTTP library the SDK has loaded."""
    found: list[type[BaseException]] = [TimeoutError, OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("aiohttp", "ClientError")):
        if (loaded := sys.modules.get(module)) is not None:
            found.append(getattr(loaded, name))
    return tuple(found)


def error_details(exc: BaseException) -> list[dict[str, Any]]:
    """The `error.details` list of a Google API error body (google.rpc.* messages)."""
    body = getattr(exc, "details", None)  # any JSON, or what the SDK made of a body that was not (HTML, text)
    error = body.get("error") if isinstance(body, dict) else None  # proxies send {"error": "some text"} too
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def refused_setting(exc: BaseException) -> str | None:
    """The run-wide request field a 400's google.rpc.BadRequest names as invalid, if any."""
    for detail in error_details(exc):
        for violation in detail.get("fieldViolations") or []:
            field_name = str(violation.get("field", "")) if isinstance(violation, dict) else ""
            if field_name.split(".")[0] in RUN_WIDE_FIELDS:
                return field_name
    return None


RUN_WIDE_FIELDS = {
    "generation_config",
    "generationConfig",
    "system_instruction",
    "systemInstruction",
    "model",
    "safety_settings",
    "safetySettings",
}


def server_retry_delay_s(exc: BaseException) -> float | None:
    """The delay a google.rpc.RetryInfo asks for (a Duration such as "38s"), if any."""
    for detail in error_details(exc):
        if detail.get("@type", "").endswith("google.rpc.RetryInfo"):
            with contextlib.suppress(KeyError, ValueError, AttributeError):
                return max(0.0, float(detail["retryDelay"].removesuffix("s")))
    return None


def backoff_s(attempt: int, exc: BaseException, settings: Settings) -> float:
    """How long to wait before the next attempt: what the server asked, else
    exponential from RETRY_BASE_S with jitter (so workers do not retry in step), capped."""
    asked = server_retry_delay_s(exc)
    if asked is not None:
        return asked
    return min(settings.retry_max_s, settings.retry_base_s * 2 ** (attempt - 1) * random.uniform(1, 2))


def api_error_code(exc: BaseException) -> int | None:
    """The HTTP status of an error the API answered with (google-genai's APIError), else None."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) and hasattr(exc, "details") else None


def describe(exc: BaseException, settings: Settings) -> str:
    """A one-line reason for failed.jsonl and messages."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {request_timeout_s(settings):g} s"
    if (code := api_error_code(exc)) is not None:
        body = getattr(exc, "details", None)
        message = getattr(exc, "message", None) or (body.get("error") if isinstance(body, dict) else body) or ""
        text = f"{' '.join(str(part) for part in (code, getattr(exc, 'status', None)) if part)}: {message}"
    else:
        text = str(exc) if isinstance(exc, UnsendableFile) else f"{type(exc).__name__}: {exc}"
    # an HTML error page would otherwise fill the screen; before the cut,
    text = redact(" ".join(writable(text).split()))
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"  # which could leave part of a key


# ------------------------------------------------------------------ limits --
class Gate:
    """Every request passes here first, so one place decides when requests may start:
    no faster than --rpm and --tpm, evenly spaced; none while a 429's back-off runs, for
    every generator at once (instead of each discovering the same limit on its own); none
    that would take the estimated spend past --max-cost-usd (see Spend); and none once closed
    (Ctrl-C, a refused key, the daily quota, the budget), when back-off waits end early.

    --tpm spaces requests by their input tokens: each moves the next start by its tokens'
    share of a minute. A request's tokens are estimated before it is sent (estimated_tokens)
    and scaled by what the API has counted so far per estimated token; each answer's own
    count then moves the schedule by the estimate's error, so the two limits hold at once.

    Hand-written rather than aiolimiter's AsyncLimiter: the rate limits and the shared
    back-off are one schedule here (the next moment a request may start)."""

    def __init__(
        self, requests_per_minute: float | None, tokens_per_minute: float | None = None, spend: Spend | None = None
    ) -> None:
        self.interval_s = 60 / (requests_per_minute * RATE_HEADROOM) if requests_per_minute else 0.0
        self.tokens_per_minute = tokens_per_minute  # --tpm
        # of the schedule per input token
        self.token_s = 60 / (tokens_per_minute * RATE_HEADROOM) if tokens_per_minute else 0.0
        self.next_slot = 0.0  # time.monotonic() of the next free start under --rpm...
        self.next_tokens = 0.0  # ...and under --tpm: when the input tokens started so far fit in it
        self.estimated = 0  # input tokens of the requests answered so far, as estimated...
        self.counted = 0  # ...and as the API counted them
        self.spend = spend or Spend(None)
        self.paused_until = 0.0  # no request starts before this: a 429's back-off
        self.held_s = 0.0  # time during which requests waited here (the rate limits, a 429's back-off)
        self._closed = asyncio.Event()
        self._waiting = 0  # requests held here now; held_s counts time when any is
        self._held_since = 0.0

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def closed_event(self) -> asyncio.Event:
        """Set once the gate closes: what a wait elsewhere (see Outage) also ends on."""
        return self._closed

    def close(self) -> None:
        self._closed.set()

    def admit(self, tokens: int = 0) -> Admission:
        """A request's passage, as an async context manager: `async with gate.admit(tokens) as
        admitted:` waits for its turn (raises GateClosed once the gate is closed), and on leaving
        counts what `admitted.reply` says it used (or that it got no reply)."""
        return Admission(self, tokens)

    async def turn(self, tokens: int = 0) -> bool:
        """Wait for the turn of a request of about `tokens` input tokens; False once the gate
        is closed. Each request admitted must be followed by landed()."""
        while not self.closed:
            now = time.monotonic()
            if now < self.paused_until:
                await self.hold(self.paused_until - now)
                continue
            slot = max(now, self.next_slot, self.next_tokens)
            self.next_slot = slot + self.interval_s
            if tokens:
                self.next_tokens = slot + tokens * self.token_ratio * self.token_s
            if slot > now:
                await self.hold(slot - now)
            if time.monotonic() >= self.paused_until:  # no 429 paused everyone meanwhile
                if (
                    self.spend.limit_usd is not None
                    and not self.closed
                    and not self.spend.start(tokens, self.token_ratio)
                ):
                    self.close()  # the budget is spent: no request starts any more
                return not self.closed
        return False

    def never_admits(self, tokens: int) -> str | None:
        """Why a request of about `tokens` input tokens could never start, if it could not:
        more than --tpm allows in a minute, or alone more than --max-cost-usd."""
        expected = round(tokens * self.token_ratio)
        if self.tokens_per_minute and expected > self.tokens_per_minute * RATE_HEADROOM:
            tpm = self.tokens_per_minute
            return f"needs about {expected:,} input tokens, more than --tpm {tpm:g} lets start in a minute"
        limit = self.spend.limit_usd
        if limit is not None and (cost := self.spend.expected_usd(expected)) > limit:
            return f"would cost about {dollars(cost)} alone, more than --max-cost-usd {limit:g}"
        return None

    @property
    def counts_tokens(self) -> bool:
        """Whether requests must say their tokens: for --tpm and --max-cost-usd only."""
        return bool(self.token_s) or self.spend.limit_usd is not None

    def landed(self, tokens: int, usage: Any = None, tier: str | None = None) -> None:
        """A request admitted with `tokens` got its reply (`usage`: its usage_metadata; `tier`:
        the service tier that served it, if it says), or none."""
        if tokens and (counted := token_count(usage, "prompt_token_count")):
            self.next_tokens += (counted - tokens * self.token_ratio) * self.token_s  # the estimate's error
            self.estimated, self.counted = self.estimated + tokens, self.counted + counted
        if self.spend.price is not None:
            self.spend.land(tokens, usage, tier)

    @property
    def token_ratio(self) -> float:
        """Input tokens the API counts per token estimated, so far (1 until answers say)."""
        return min(max(self.counted / self.estimated, 0.1), 10.0) if self.estimated else 1.0

    def pause(self, seconds: float) -> None:
        """Hold every new request for `seconds`: the back-off after a 429, shared by all."""
        now = time.monotonic()
        if now + seconds > self.paused_until:
            if now >= self.paused_until:  # a new back-off, not one more worker hitting the same one
                log.debug("rate limited: holding all requests for %.2f s", seconds)
            self.paused_until = now + seconds

    async def unpaused(self) -> None:
        """Wait out the shared back-off of a 429, if one runs (less once the gate closes):
        for calls that start without admit(), such as the Batch API's."""
        while not self.closed and (left := self.paused_until - time.monotonic()) > 0:
            await self.hold(left)

    async def hold(self, seconds: float) -> None:
        if self._waiting == 0:
            self._held_since = time.monotonic()
        self._waiting += 1
        try:
            await self.sleep(seconds)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self.held_s += time.monotonic() - self._held_since

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less if the gate closes meanwhile. Not asyncio.wait_for: on
        3.11 it swallows a cancel that comes in the turn the gate closes (shut_down does
        both at once), and the generator would go back to waiting on an empty queue."""
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait([closing], timeout=seconds)
        finally:
            closing.cancel()


class GateClosed(Exception):  # noqa: N818 (a state, not a fault)
    """The run stopped asking (Ctrl-C, a stop, the budget spent): a request waiting at the Gate is not sent."""


@dataclass
class Admission:
    """One request's passage through the Gate (see Gate.admit)."""

    gate: Gate
    tokens: int  # its estimated input tokens (0 when nothing counts them)
    reply: Any = None  # set by the request once it has its reply: its usage corrects the schedule and the spend

    async def __aenter__(self) -> Admission:
        if not await self.gate.turn(self.tokens):
            raise GateClosed
        return self

    async def __aexit__(self, *_: object) -> None:
        reply = self.reply
        self.gate.landed(
            self.tokens, getattr(reply, "usage_metadata", None), served_tier(reply) if reply is not None else None
        )


class Spend:
    """What the run has cost so far, in US dollars, estimated from each reply's token counts
    and PRICES (thinking billed as output, cached input at its own price, the Batch API at
    half, each service tier at its TIER_PRICES share); and --max-cost-usd: a request may
    start only while what was spent, plus what the requests in flight are expected to cost,
    plus its own, stays within it. A request's expected cost is its estimated input and the
    mean output of the replies so far."""

    def __init__(
        self, price: tuple[float, float, float, float] | None, limit_usd: float | None = None, discount: float = 1.0
    ) -> None:
        # USD per million input, output and cached input tokens, and per million cached an hour; None: unknown
        self.price = price
        self.limit_usd = limit_usd  # --max-cost-usd
        self.discount = discount  # of PRICES, as asked: BATCH_PRICE for --batch, else the tier's (TIER_PRICES)
        self.spent_usd = 0.0  # every reply billed so far
        self.in_flight = 0  # requests started and not yet landed...
        self.in_flight_tokens = 0  # ...and their estimated input tokens
        self.replies = 0  # replies billed, and...
        self.output_tokens = 0  # ...the output tokens (thinking included) they billed...
        self.input_tokens = 0  # ...their input tokens...
        self.cached_tokens = 0  # ...and those of them read from a cache (explicit or implicit)
        self.exhausted = False  # --max-cost-usd stopped the run

    @classmethod
    def of(cls, settings: Settings) -> Spend:
        if settings.offline:
            return cls(None)  # nothing is billed
        discount = BATCH_PRICE if settings.batch else TIER_PRICES[settings.service_tier or "standard"]
        return cls(price_of(settings.model), settings.max_cost_usd, discount)

    def usd(self, input_tokens: float, cached: float, output: float, tier: str | None = None) -> float:
        """At the price asked for, or at `tier`'s (the tier that served a reply, if it says)."""
        if self.price is None:
            return 0.0
        per_input, per_output, per_cached, _ = self.price
        discount = TIER_PRICES.get(tier, self.discount) if tier else self.discount
        return ((input_tokens - cached) * per_input + cached * per_cached + output * per_output) / 1e6 * discount

    def start(self, tokens: int, ratio: float) -> bool:
        """Count a request in flight (for --max-cost-usd only); False, counting nothing, if it would pass it."""
        if self.limit_usd is None:
            return True
        expected_input = (self.in_flight_tokens + tokens) * ratio
        expected = self.usd(expected_input, expected_input * self.cached_share, (self.in_flight + 1) * self.mean_output)
        if self.spent_usd + expected > self.limit_usd:
            self.exhausted = True
            return False
        self.in_flight, self.in_flight_tokens = self.in_flight + 1, self.in_flight_tokens + tokens
        return True

    @property
    def mean_output(self) -> float:
        """Output tokens (thinking included) per reply billed so far."""
        return self.output_tokens / self.replies if self.replies else 0.0

    @property
    def cached_share(self) -> float:
        """The share of input tokens billed so far that a cache served (at its lower price)."""
        return self.cached_tokens / self.input_tokens if self.input_tokens else 0.0

    def expected_usd(self, input_tokens: float) -> float:
        """What one request of `input_tokens` is expected to cost: its input (the share cached
        so far at the cached price) and the mean output."""
        return self.usd(input_tokens, input_tokens * self.cached_share, self.mean_output)

    def land(self, tokens: int, usage: Any, tier: str | None = None) -> None:
        if self.limit_usd is not None:
            self.in_flight, self.in_flight_tokens = self.in_flight - 1, self.in_flight_tokens - tokens
        self.bill(usage, tier)

    def store(self, tokens: int, seconds: float) -> None:
        """Add an explicit cache's storage: `tokens` held for `seconds` (no tier or batch discount)."""
        if self.price is not None:
            self.spent_usd += tokens * self.price[3] * seconds / 3600 / 1e6

    def bill(self, usage: Any, tier: str | None = None) -> None:
        """Add what a reply with this usage_metadata costs (none: nothing billed), served at `tier`."""
        if usage is None or self.price is None:
            return
        output = token_count(usage, "candidates_token_count") + token_count(usage, "thoughts_token_count")
        input_tokens, cached = (
            token_count(usage, "prompt_token_count"),
            token_count(usage, "cached_content_token_count"),
        )
        self.replies, self.output_tokens = self.replies + 1, self.output_tokens + output
        self.input_tokens, self.cached_tokens = self.input_tokens + input_tokens, self.cached_tokens + cached
        self.spent_usd += self.usd(input_tokens, cached, output, tier)


class Concurrency:
    """How many requests may be in flight at once: --workers, or fewer while the server
    answers that it is full (a 429 naming no quota, a 503 "overloaded"). Such a capacity
    is shared with others and moves, and nobody can state it as a setting, so it is found
    as TCP finds a path's: each refusal lowers the limit (multiplicative decrease), each
    answer raises it by 1/limit, about one request per round trip (additive increase), up
    to --workers. Until the first refusal it is --workers and costs nothing.

    A refusal lowers the limit to CAPACITY_BACKOFF times the requests still out, not times
    the limit: a whole round trip of requests refused together then brings the limit just
    under what the server held, at once, instead of compounding the factor per refusal.
    Kept apart from the Gate, which decides how fast requests start: this decides how
    many may be out at the same time."""

    def __init__(self, most: int) -> None:
        self.most = most  # --workers: the limit never grows past it
        self.limit = float(most)  # requests that may be in flight now; fractions grow by additive increase
        self.in_flight = 0  # requests holding a place
        self.refusals = 0  # "server full" answers so far: the summary shows the limit only after one
        self._waiting: deque[asyncio.Future[None]] = deque()  # generators waiting for a place, first come first served

    async def __aenter__(self) -> None:
        """A place in flight: at once if one is free and nobody waits for it."""
        if not self.take():
            await self.wait_for_place()

    async def __aexit__(self, _: object, exc: BaseException | None, __: object) -> None:
        """The place given back: a "server full" refusal lowers the limit first (while the
        refused request still holds its place, so none takes it meanwhile); an answer raises it."""
        if isinstance(exc, Exception) and classify(exc) == "capacity":
            self.refused()
        self.leave()
        if exc is None:
            self.answered()

    def take(self) -> bool:
        """Take a place in flight if one is free and nobody waits for it; else False: then
        wait_for_place(). Each place taken is given back with leave()."""
        if self._waiting or self.in_flight + 1 > self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        self._hand_over()

    async def wait_for_place(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter  # _hand_over() counts the place as taken before waking us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a place in the same turn: pass it on
                self.in_flight -= 1
                self._hand_over()
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            raise

    def _hand_over(self) -> None:
        while self._waiting and self.in_flight + 1 <= self.limit:
            waiter = self._waiting.popleft()
            if not waiter.done():  # not cancelled meanwhile
                self.in_flight += 1
                waiter.set_result(None)

    def answered(self) -> None:
        if self.limit < self.most:
            self.limit = min(self.most, self.limit + 1 / self.limit)
            self._hand_over()

    def refused(self) -> None:
        """The server was full: called while the refused request still holds its place."""
        self.refusals += 1
        self.limit = max(1.0, min(self.limit, CAPACITY_BACKOFF * (self.in_flight - 1)))

    def shown(self) -> str:
        """The limit in force, e.g. 'in flight: 96 of 400 allowed by the server', once the server was full."""
        return f"in flight: {int(self.limit)} of {self.most} allowed by the server" if self.refusals else ""


@dataclass
class Episode:
    """One stretch of time during which the API's host could not be reached."""

    since: float  # time.monotonic() when it began
    cause: str  # why, in words: "connection refused"
    confirmed: bool = False  # a probe failed too: the host was down, not one request's connection
    over: asyncio.Event = field(default_factory=asyncio.Event)  # the host answered again, or the run gave up


class Outage:
    """Whether the API's host can be reached. A connection error (refused, reset, a name
    that does not resolve, a failed TLS handshake) says that the way is down, not that the
    prompt is wrong: every request then waits here while one probe (models.get: no tokens,
    no cost) asks at once, then after PROBE_FIRST_S doubling to PROBE_MAX_S, and its first
    answer of any kind releases them all. No prompt loses an attempt to an outage; none is
    marked failed for one. A request whose connection failed while the probe got through
    at once was unlucky alone: that counts as its attempt, so nothing can loop forever.

    An outage longer than --outage-limit-s stops the run as Ctrl-C does (what was answered
    is kept; a rerun continues); one of OUTAGE_AT_START_S before the host ever answered is
    a wrong address or no network, and a one-line error."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[Any]],
        host: str,
        limit_s: float,
        closed: asyncio.Event,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.probe = probe  # one small request to the host: any answer, an error included, means it is reachable
        self.host = host  # what cannot be reached, for messages
        self.limit_s = limit_s  # --outage-limit-s
        self.reached = False  # the host has answered at least once
        self.episode: Episode | None = None  # the outage going on, if one is
        self.given_up: PipelineError | None = None  # why the run stops: it lasted too long
        self.probing: list[asyncio.Task[None]] = []  # the probe, while it runs (shut_down stops it)
        self.unreachable_s = 0.0  # time during which the host could not be reached (outages that ended)
        self.changed = changed  # what shows the outage (Progress.refresh)
        self._closed = closed  # the Gate's: the run stops asking

    async def __aenter__(self) -> None:
        """A request may go: the host is reachable (no coroutine per request then), or answers again."""
        if self.episode is not None or self.given_up is not None:
            await self.passed()

    async def __aexit__(self, _: object, exc: BaseException | None, __: object) -> None:
        """The request got an answer of the host's, an error the API gave included: it is reachable."""
        if exc is None or api_error_code(exc) is not None:
            self.reached = True

    async def passed(self) -> None:
        """Return at once when the host is reachable; else once it answers again or the run
        stops asking. Raises the error that ends the run if the outage lasted too long."""
        if (episode := self.episode) is not None:
            await first_of(episode.over.wait(), self._closed.wait())
        if self.given_up is not None:
            raise self.given_up

    async def wait_out(self, cause: str) -> bool:
        """After a request's connection failed (`cause`, in words): wait until the host answers
        again. True if it was down (a probe failed too), False if the probe got through at once."""
        if self.episode is None:
            self.episode = Episode(time.monotonic(), cause)
            self.probing[:] = [asyncio.create_task(self._probe(self.episode))]
        episode = self.episode
        await self.passed()
        return episode.confirmed

    async def first_answer(self) -> None:
        """Before the run writes anything: return once the host has answered the probe;
        raise the one-line error if it does not within OUTAGE_AT_START_S (or --outage-limit-s)."""
        await self.wait_out("no answer")  # passed() raises the error, if it comes to that

    def never_reached(self) -> bool:
        """Whether the host has been unreachable since the run began: a wrong address, or no network."""
        return not self.reached and self.episode is not None

    def waiting(self) -> str:
        """For the progress display, e.g. 'waiting for host: connection refused, unreachable for 1m20s'."""
        if (episode := self.episode) is None or not episode.confirmed:
            return ""
        return f"waiting for {self.host}: {episode.cause}, unreachable for {duration(time.monotonic() - episode.since)}"

    async def _probe(self, episode: Episode) -> None:
        delay = 0.0
        while (left := self._time_left(episode)) > 0:
            await asyncio.sleep(min(delay, left))
            try:
                async with asyncio.timeout(min(PROBE_TIMEOUT_S, max(self._time_left(episode), 0.1))):
                    await self.probe()
            except Exception as exc:  # noqa: BLE001 (an answer of any kind, an API error included, ends the outage)
                if (cause := unreachable(exc) or ("no answer" if isinstance(exc, TimeoutError) else None)) is not None:
                    self._still_down(episode, cause)
                    delay = min(max(2 * delay, PROBE_FIRST_S), PROBE_MAX_S)
                    continue
            self._end(episode)
            return
        self._give_up(episode)

    def _time_left(self, episode: Episode) -> float:
        limit_s = self.limit_s if self.reached else min(OUTAGE_AT_START_S, self.limit_s)
        return limit_s - (time.monotonic() - episode.since)

    def _still_down(self, episode: Episode, cause: str) -> None:
        episode.cause = cause
        if not episode.confirmed:
            episode.confirmed = True
            log.log(
                logging.WARNING if self.reached else logging.DEBUG,  # before any answer: one line at the end
                "cannot reach %s: %s; every request waits until it answers again",
                self.host,
                cause,
            )
        self.changed()

    def _end(self, episode: Episode) -> None:
        self.reached, self.episode = True, None
        if episode.confirmed:
            log.warning("%s answers again after %s: going on", self.host, duration(time.monotonic() - episode.since))
            self.unreachable_s += time.monotonic() - episode.since
            self.changed()
        episode.over.set()

    def _give_up(self, episode: Episode) -> None:
        if self.reached:
            lasted = duration(time.monotonic() - episode.since)
            self.given_up = StopForNow(f"{self.host} has been unreachable for {lasted} ({episode.cause})")
        else:
            self.given_up = PipelineError(f"cannot reach {self.host}: {episode.cause}")
        episode.over.set()


async def first_of(*waits: Awaitable[Any]) -> None:
    """Wait until the first of `waits` is done; the others are cancelled."""
    pending = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in pending:
            waiting.cancel()


def price_of(model: str) -> tuple[float, float, float, float] | None:
    """The PRICES row of the longest name that `model` starts with."""
    return by_model(PRICES, model)


def by_model(table: dict[str, Any], model: str) -> Any:
    """The row of `table` (PRICES, CACHE_MIN_TOKENS) of the longest name `model` starts with; None if none."""
    name = model.removeprefix("models/")
    known = [key for key in table if name.startswith(key)]
    return table[max(known, key=len)] if known else None


def token_count(usage: Any, name: str) -> int:
    """A count of a reply's usage_metadata: 0 when absent (the API leaves out zeros)."""
    return getattr(usage, name, None) or 0


def estimated_tokens(prompt: Prompt) -> int:
    """A request's input tokens before it is sent: its text's characters (the system
    instruction's too) / CHARS_PER_TOKEN, and NON_TEXT_PART_TOKENS per image or file part."""
    parts = [
        part for content in prompt.contents or [] if isinstance(content, dict) for part in content.get("parts") or []
    ]
    texts = [str(part["text"]) for part in parts if isinstance(part, dict) and "text" in part]
    others = len(parts) - len(texts)  # inline data, files
    if not parts:
        texts = [prompt.text]
    instruction = getattr(prompt.config, "system_instruction", None)
    if isinstance(instruction, str):
        texts.append(instruction)
    elif instruction is not None:
        texts += [part.text or "" for part in instruction.parts or []]
    return sum(map(len, texts)) // CHARS_PER_TOKEN + 1 + NON_TEXT_PART_TOKENS * others + media_tokens(prompt)


def media_tokens(prompt: Prompt) -> int:
    """Its files' input tokens, before the API counts them, by the docs' figures: an image or
    a PDF page by --media-resolution (MEDIA_TOKENS, medium if unset), audio and video by the
    second (TOKENS_PER_SECOND), text by its characters; a URL, unread, NON_TEXT_PART_TOKENS.
    The answers' counts correct the estimate as they come (Gate's token ratio)."""
    if not prompt.media:
        return 0
    level = enum_text(getattr(prompt.config, "media_resolution", None)) or "medium"
    per_page = MEDIA_TOKENS.get(level.removeprefix("MEDIA_RESOLUTION_").lower(), MEDIA_TOKENS["medium"])
    per_unit = {"image": per_page, "application": per_page, **TOKENS_PER_SECOND, "text": 1}
    return sum(
        round(file.units * per_unit[file.mime_type.partition("/")[0]]) if file.units else NON_TEXT_PART_TOKENS
        for file in prompt.media
    )


# ------------------------------------------------------------------- cache --
class ContextCache:
    """The explicit cache a --cache run holds: the run's system instruction, tools and
    CONTEXT kept once, billed at the cached price each time a request names it instead of
    sending them, plus storage by the hour. One per job: its display name carries the job's
    identity (see cache_display_name), so a rerun after a kill finds the one it left and uses
    it rather than making a second. Its TTL is renewed while the run lasts, and it is deleted
    when the run ends, however it ends (a kill -9 leaves it to the rerun, or to its TTL)."""

    def __init__(self, client: Any, name: str, tokens: int, spend: Spend) -> None:
        self.client = client  # the run's genai client
        self.name = name  # "cachedContents/...": what each request names
        self.tokens = tokens  # what it holds, in tokens: its storage is billed per token and hour
        self.spend = spend  # the run's: the storage is added to it as time passes
        self.billed_to = time.monotonic()  # storage is billed up to this moment

    def bill_storage(self) -> None:
        now = time.monotonic()
        self.spend.store(self.tokens, now - self.billed_to)
        self.billed_to = now

    async def keep(self, run: Run) -> None:
        """Renew the TTL every CACHE_RENEW_S while the run lasts (a task, stopped at the end);
        a renewal that fails is logged, and the next one tried: the TTL outlasts three."""
        while True:
            await asyncio.sleep(CACHE_RENEW_S)
            self.bill_storage()
            try:
                await run.retried(lambda _: renewed(self.client, self.name, CACHE_TTL_S), API_CALL)
            except Exception as exc:  # noqa: BLE001 (logged: the next renewal is tried, the TTL outlasts three)
                log.warning("could not renew the context cache %s: %s", self.name, describe(exc, run.settings))

    async def close(self, run: Run) -> None:
        """At the run's end, however it ends: delete it; but while batch jobs that name it are
        still on Google's side, keep it as long as they may run, for the rerun that collects them."""
        self.bill_storage()
        if not (jobs := run.progress.tally.jobs_unfinished):
            await delete_cache(run, self.name)
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CACHE_DELETE_S):
                await renewed(self.client, self.name, BATCH_JOB_LIFE_S)
        log.warning(
            "kept the context cache %s for %s that name it, for up to %s: the rerun that collects them deletes it",
            self.name,
            plural(jobs, "batch job"),
            duration(BATCH_JOB_LIFE_S),
        )


def renewed(client: Any, name: str, ttl_s: float) -> Awaitable[Any]:
    """caches.update: the cache `name` now lives `ttl_s` seconds more."""
    return client.aio.caches.update(name=name, config={"ttl": f"{ttl_s:.0f}s"})


async def delete_cache(run: Run, name: str) -> None:
    """Delete a cache, within CACHE_DELETE_S (a host gone away must not hold the exit); if
    that fails it expires by its TTL, and a rerun of the job deletes or uses it first."""
    try:
        async with asyncio.timeout(CACHE_DELETE_S):
            await run.retried(lambda _: run.client.aio.caches.delete(name=name), DELETE)
        log.info("deleted the context cache %s", name)
    except Exception as exc:  # noqa: BLE001 (logged: it expires by its TTL, a rerun deletes it)
        log.warning(
            "could not delete the context cache %s (%s): it expires within %s",
            name,
            type(exc).__name__,
            duration(CACHE_TTL_S),
        )


async def open_cache(run: Run, job: Job) -> ContextCache | None:
    """The run's ContextCache: the one an earlier run of this job left, if alive, else a new
    one; None (the prefix is sent first in each request, for implicit caching) when the
    prefix is under the model's minimum for an explicit cache (CACHE_MIN_TOKENS)."""
    settings, client = run.settings, run.client
    held = prefix_contents(job.context, job.generation)
    counted = await run.retried(lambda _: client.aio.models.count_tokens(model=settings.model, contents=held), API_CALL)
    tokens, minimum = int(counted.total_tokens or 0), cache_minimum(settings.model)
    if tokens < minimum:
        log.warning(
            "--cache: the instruction and context hold %s tokens, under %s's minimum of %s for a cache: sent first "
            "in each request instead",
            f"{tokens:,}",
            settings.model,
            f"{minimum:,}",
        )
        return None
    display_name = cache_display_name(job.identity)
    found = [
        c
        async for c in await run.retried(lambda _: client.aio.caches.list(config={"page_size": 100}), API_CALL)
        if c.display_name == display_name
    ]
    alive = [c for c in found if c.model and c.model.endswith(f"/{settings.model}")]
    # never two at once: one kept, the others deleted
    for gone in [c for c in found if c is not (alive[0] if alive else None)]:
        await delete_cache(run, str(gone.name))
    if alive:
        log.info("using the context cache %s an earlier run of this job left", alive[0].name)
        await run.retried(lambda _: renewed(client, str(alive[0].name), CACHE_TTL_S), API_CALL)
        return ContextCache(client, str(alive[0].name), tokens, run.limits.gate.spend)
    if (created := await create_cache(run, job.generation, display_name)) is None:
        return None
    log.info("created the context cache %s: %s tokens", created.name, f"{tokens:,}")
    return ContextCache(client, str(created.name), tokens, run.limits.gate.spend)


async def create_cache(run: Run, generation: dict[str, Any], display_name: str) -> Any:
    """caches.create with the run's instruction, tools and context. A prefix the API finds too
    small (its minimum above CACHE_MIN_TOKENS's): None, and it is sent first instead; any other
    refusal stops the run."""
    held = {k: generation[k] for k in CACHED_FIELDS if k in generation}
    config = {
        **held,
        "contents": run.asking.maker.context or None,
        "ttl": f"{CACHE_TTL_S:.0f}s",
        "displayName": display_name,
    }
    try:
        return await run.retried(
            lambda _: run.client.aio.caches.create(model=run.settings.model, config=config), API_CALL
        )
    except Exception as exc:
        if api_error_code(exc) is None:
            raise
        if api_error_code(exc) == 400 and "too small" in str(getattr(exc, "message", "")).lower():
            log.warning(
                "--cache: the API finds the prefix too small to cache (%s): sent first in each request instead",
                describe(exc, run.settings),
            )
            return None
        raise PipelineError(f"--cache: the API would not create the cache ({describe(exc, run.settings)})") from None


def cache_minimum(model: str) -> int:
    """The fewest tokens the API caches explicitly for `model` (CACHE_MIN_TOKENS)."""
    return by_model(CACHE_MIN_TOKENS, model) or CACHE_MIN_TOKENS[""]


def cache_display_name(identity: str) -> str:
    """A job's cache's name: the job's identity (model, settings, context, output folder) hashed."""
    return CACHE_NAME_PREFIX + job_tag(identity)


# ------------------------------------------------------------------- files --
@dataclass(frozen=True)
class Upload:
    """A file uploaded through the Files API, as UPLOADS_FILE records it."""

    sha256: str  # of its bytes: one upload per content
    size: int
    name: str  # "files/...": what deletes it
    uri: str  # what a request's file_data names
    mime_type: str
    expires: float  # time.time() when the API deletes it by itself (48 h after it was made)


class UnsendableFile(ValueError):  # noqa: N818 (a row's file, named as the row's failure says it)
    """A file a row names that cannot be sent: its row fails, naming it and why."""


class EditedFile(UnsendableFile):
    """A file whose bytes changed after its row was read (and hashed): its row fails, not for
    good, and is never sent with the new bytes under the old hash; a rerun reads it anew."""


class FilesFolder:
    """FILES_DIR, the one folder the files rows name are read from. Rows are data, often
    written by someone else: a name must not make the run read and send what the user did
    not put there, through `..`, a link out of the folder, or a link into /proc (the process
    environment holds the API key). Each name is resolved once a run, links followed, and
    its real path must lie inside the folder's; the file is then opened there without
    following a link, and the open file itself is checked: it is the file at that real path
    (so nothing was swapped between the check and the read) and a regular file (no device,
    FIFO or socket). Its bytes are counted against its size as they are read (see
    file_digest, read_checked): a /proc or /sys file, or one that grows, does not match."""

    def __init__(self, root: Path) -> None:
        self.root = root  # as the settings give it: relative names are joined to it (media_files)
        self.real_root = os.path.realpath(root)  # where it really is: every file must be inside
        self.resolved: dict[Path, str] = {}  # a file's path as named -> its real path, once checked to be inside
        # real path -> the SHA-256 its bytes last hashed to, and its stat then (read_checked)
        self.verified: dict[str, tuple[str | int, ...]] = {}

    def real_path(self, file: MediaFile) -> str:
        """Where `file` really is, links followed; UnsendableFile if that is outside the folder."""
        assert file.path is not None
        if (real := self.resolved.get(file.path)) is None:
            real = os.path.realpath(file.path)
            if os.path.commonpath([real, self.real_root]) != self.real_root:
                raise UnsendableFile(
                    f"file {file.name}: resolves outside {self.root} (to {shown_path(real, self.real_root)})"
                )
            self.resolved[file.path] = real
        return real

    def open(self, file: MediaFile) -> tuple[BinaryIO, os.stat_result]:
        """`file`, opened read-only where it was checked to be, and its fstat: a regular file's.
        In a thread: it touches the disk."""
        real = self.real_path(file)
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: no link swapped in since
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            unusual = exc.errno in (errno.ENXIO, errno.ELOOP, errno.EOPNOTSUPP)  # a socket; a link swapped in
            raise UnsendableFile(
                f"file {file.name}: " + ("not a regular file" if unusual else exc.strerror or str(exc))
            ) from None
        try:
            stat = os.fstat(fd)
            if not S_ISREG(stat.st_mode):
                raise UnsendableFile(f"file {file.name}: not a regular file")
            if opened_path(fd) not in (real, None):
                raise UnsendableFile(f"file {file.name}: moved while it was opened")
            if stat.st_size > FILES_API_MAX_BYTES:
                raise UnsendableFile(f"file {file.name}: over the Files API's 2 GB")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        stream = os.fdopen(fd, "rb", buffering=0)
        return stream, stat

    def read_checked(self, file: MediaFile) -> bytes:
        """In a thread: `file`'s bytes, as they were when its row was read (EditedFile if not).
        Hashed again unless the open file's stat, taken after the read, is the one seen when
        these bytes last hashed to file.sha256 (a write changes its ctime, which no user can
        set back); a file whose ctime was within RACY_S of that hash is hashed every time, as
        git does, for file systems whose clocks tick too coarsely to show a quick edit."""
        stream, _ = self.open(file)
        started_ns = time.time_ns()
        with stream:
            data = stream.read(file.size + 1)
            stat = os.fstat(stream.fileno())
        seen, real = (
            (file.sha256, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns),
            self.real_path(file),
        )
        if self.verified.get(real) == seen:
            return data
        if len(data) != file.size or hashlib.sha256(data).hexdigest() != file.sha256:
            raise EditedFile(f"file {file.name} changed after its row was read: not sent (a rerun reads it again)")
        if started_ns - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_S * 1e9:
            self.verified[real] = seen
        return data


def opened_path(fd: int) -> str | None:
    """The path of the file open as `fd`, as the kernel knows it (None where it cannot say)."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    return None


def shown_path(real: str, root: str) -> str:
    """`real` for a message: relative to `root` when it is next to it, else as it is."""
    relative = os.path.relpath(real, root)
    return relative if relative.count("..") <= 1 else real


class CheckedUpload(io.RawIOBase):
    """A file as an upload reads it: front to back, hashed as it goes. The read that would
    hand over its last bytes raises EditedFile instead when they are not the bytes hashed
    when its row was read, so an edited file's upload never completes (nothing is made)."""

    def __init__(self, stream: BinaryIO, file: MediaFile) -> None:
        self.stream = stream  # opened by FilesFolder.open
        self.file = file  # its size and SHA-256 as hashed
        self.digest = hashlib.sha256()  # of what was read so far
        self.count = 0  # bytes read so far

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # the SDK seeks to the end and back for the size

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.digest.update(chunk)
        self.count += len(chunk)
        if (self.count >= self.file.size or not chunk) and (self.count, self.digest.hexdigest()) != (
            self.file.size,
            self.file.sha256,
        ):
            raise EditedFile(
                f"file {self.file.name} changed after its row was read: not uploaded (a rerun reads it again)"
            )
        return chunk


class Media:
    """The files rows name. Each local file is read once for its SHA-256, part of its row's
    fingerprint (an edited image is an edited input), and sent inline while its request
    stays under INLINE_LIMIT_MB; a file past that is uploaded through the Files API once per
    content, however many rows name it, recorded in OUTPUT_DIR/uploads.jsonl and used again
    by reruns until UPLOAD_MARGIN_S before it expires. An upload is named after the job and
    its file's hash: once no queued row needs it, the run deletes it, and the run that ends
    the job finds and deletes every upload of the job, those a killed run left included.
    Each hash is kept in OUTPUT_DIR/file_digests.jsonl by the file's path, size and mtime: a
    rerun reads again only a file that changed (hashing runs at about 1.2 GB/s here: a rerun
    of 200,000 photos of 1 MB would otherwise read them all before it could skip one)."""

    def __init__(
        self,
        folder: FilesFolder,
        limit_mb: float,
        api: Api | None = None,
        output_dir: Path | None = None,
        tag: str = "",
    ) -> None:
        self.api = api  # the run's Files API, and how its calls are retried; None: an estimate, which uploads nothing
        self.folder = folder  # FILES_DIR: the only place the files are read from
        self.journal = output_dir / UPLOADS_FILE if output_dir else None  # each upload started, made, and deleted
        # each file's hash once read (None: an estimate, keeping nothing)
        self.digests = output_dir / DIGESTS_FILE if output_dir else None
        self.tag = tag  # the job's, in each upload's display name
        self.limit_bytes = limit_mb * 1e6  # INLINE_LIMIT_MB
        # (path, size, mtime_ns) -> SHA-256 and units: read once however many rows name it
        self.hashes: dict[tuple[str, int, int], tuple[str, float]] = {}
        self.uploads: dict[str, Upload] = {}  # by SHA-256: made by this run, or recorded by earlier ones
        # by SHA-256: in flight, awaited by each prompt that needs it
        self.uploading: dict[str, asyncio.Task[Upload]] = {}
        self.needed: Counter[str] = Counter()  # SHA-256 -> prompts queued with that file that are not done with it
        self.slots = asyncio.Semaphore(UPLOADS_AT_ONCE)  # uploads in flight at once
        self.journaled = False  # the journal holds lines: this job has uploaded, so the end looks for what is left
        self.inputs_read = False  # every input is read: an upload no queued prompt needs is needed by none
        self.made = 0  # uploads this run made

    async def resolve(self, prompt: Prompt) -> Prompt:
        """`prompt` once the local files it names are read (in a thread): their sizes and hashes,
        folded into its digest; or, if one cannot be sent, with its error naming the file."""
        try:
            media = await asyncio.to_thread(self.read_all, prompt.media)
            if (
                self.api is not None
                and on_vertex()
                and not all(now for file, now in zip(media, self.inline(prompt.text, media), strict=True) if file.path)
            ):
                raise UnsendableFile(
                    "its files are over --inline-limit-mb, and Vertex AI has no Files API: name gs:// copies instead"
                )
        except UnsendableFile as exc:
            return prompt._replace(error=f"{exc} ({prompt.origin or prompt.id})")
        digest = hashlib.sha256(" ".join([prompt.digest, *(file.sha256 for file in media)]).encode()).hexdigest()[:32]
        return prompt._replace(media=media, digest=digest)

    def needs(self, prompt: Prompt) -> None:
        """`prompt` is queued to be asked: its files' uploads are needed until it is settled."""
        self.needed.update(file.sha256 for file in prompt.media if file.path)

    def read_all(self, media: tuple[MediaFile, ...]) -> tuple[MediaFile, ...]:
        """In a thread: each local file's size and SHA-256 (a file read before, unchanged, is not read again)."""
        read = []
        for file in media:
            if file.path is None:
                read.append(file)
                continue
            try:
                stream, stat = self.folder.open(file)
                with stream:
                    key = (self.folder.real_path(file), stat.st_size, stat.st_mtime_ns)
                    if (known := self.hashes.get(key)) is None:
                        known = self.hashes[key] = file_digest(stream, file, stat.st_size)
                        self.keep_digest(key, known)
            except OSError as exc:
                raise UnsendableFile(f"file {file.name}: {exc.strerror or exc}") from None
            except UnsendableFile:
                raise
            except ValueError:  # a NUL in its name, say
                raise UnsendableFile(f"file {file.name!r}: not a name a file can have") from None
            read.append(dataclasses.replace(file, size=stat.st_size, sha256=known[0], units=known[1]))
        return tuple(read)

    def keep_digest(self, key: tuple[str, int, int], known: tuple[str, float]) -> None:
        """In the reading thread: append a file's hash to DIGESTS_FILE (one write, O_APPEND: whole
        lines; not synced, a lost one is read again)."""
        if self.digests is not None:
            with stop_on_os_error(f"cannot write {self.digests}"):
                append_line(
                    self.digests,
                    {"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": known[0], "units": known[1]},
                    synced=False,
                )

    def inline(self, text: str, media: tuple[MediaFile, ...]) -> list[bool]:
        """Which files a request carries inline: local ones, in order, while the request (its
        text, and its inline files as base64: 4 bytes for 3) stays under INLINE_LIMIT_MB."""
        room, carried = self.limit_bytes - len(text.encode()), []
        for file in media:
            size = -(-file.size // 3) * 4
            carried.append(file.path is not None and size <= room)
            room -= size if carried[-1] else 0
        return carried

    def read_inline(self, files: list[MediaFile]) -> list[bytes]:
        """In a thread: the bytes of files going inline, each as it was hashed (see FilesFolder.read_checked)."""
        return [self.folder.read_checked(file) for file in files]

    async def contents(self, prompt: Prompt, asked: str | list[Any], inline: bool = True) -> list[Any]:
        """`asked` (its turns, or its text) with `prompt`'s files after its text: inline, or as
        the URI of their upload (made now if need be; with inline=False, all of them: --batch)."""
        turns = asked if isinstance(asked, list) else [user_turn(asked)]
        carried = self.inline(prompt.text, prompt.media) if inline else [False] * len(prompt.media)
        data = iter(
            await asyncio.to_thread(
                self.read_inline, [file for file, now in zip(prompt.media, carried, strict=True) if now]
            )
        )
        parts = []
        for file, now in zip(prompt.media, carried, strict=True):
            if now:
                parts.append({"inline_data": {"mime_type": file.mime_type, "data": next(data)}})
            else:
                uri = await self.uri_of(file) if file.path else file.name
                parts.append({"file_data": {"file_uri": uri, "mime_type": file.mime_type}})
        return [*turns[:-1], {**turns[-1], "parts": [*turns[-1]["parts"], *parts]}]

    async def uri_of(self, file: MediaFile) -> str:
        """The URI of `file`'s upload: one still fresh, one in flight, or one made now. A
        failed upload fails the requests waiting on it (answer() retries them)."""
        known = self.uploads.get(file.sha256)
        if known is not None and known.expires - time.time() > UPLOAD_MARGIN_S:
            return known.uri
        task = self.uploading.get(file.sha256)
        if task is None:
            task = self.uploading[file.sha256] = asyncio.ensure_future(self.upload(file))
            task.add_done_callback(lambda _: self.uploading.pop(file.sha256, None))
        return (await asyncio.shield(task)).uri  # one waiter stopping stops no other's upload

    async def upload(self, file: MediaFile) -> Upload:
        """Upload `file` (journaled before and after: a rerun knows to look for it)."""
        assert file.path is not None and self.api is not None
        async with self.slots:
            await self.write({"uploading": file.sha256, "file": file.name})
            config = {"mime_type": file.mime_type, "display_name": f"{UPLOAD_NAME_PREFIX}{self.tag} {file.sha256}"}
            stream, _ = await asyncio.to_thread(self.folder.open, file)  # the file checked, read by the upload itself
            with stream:
                # retried as its prompts' attempts
                made = await self.api.client.aio.files.upload(file=CheckedUpload(stream, file), config=config)
            made = await self.api.retried(lambda _: processed(self.api.client, made), PROCESSING)
        expires = made.expiration_time.timestamp() if made.expiration_time else time.time() + 47 * 3600
        upload = self.uploads[file.sha256] = Upload(
            file.sha256, file.size, str(made.name), str(made.uri), file.mime_type, expires
        )
        await self.write(dataclasses.asdict(upload))
        self.made += 1
        log.debug("uploaded %s as %s", file.name, made.name)
        return upload

    def settled(self, outcome: Outcome) -> None:
        """`outcome`'s prompt will not be asked again (answered, or refused for good): it needs its files no more."""
        if outcome.prompt.media and (isinstance(outcome, Response) or outcome.permanent):
            self.needed.subtract(file.sha256 for file in outcome.prompt.media if file.path)

    async def write(self, line: dict[str, Any]) -> None:
        assert self.journal is not None, "uploads are a run's, which has an output dir"
        self.journaled = True
        with stop_on_os_error(f"cannot write {self.journal}"):  # a full disk stops the run, as the writer's would
            await asyncio.to_thread(append_line, self.journal, line)

    async def load(self) -> None:
        """The uploads earlier runs recorded and did not delete, and the hashes they read."""
        try:
            for entry in await journal_lines(self.journal):
                self.journaled = True
                if "deleted" in entry:
                    self.uploads.pop(entry["deleted"], None)
                elif "uri" in entry:
                    self.uploads[entry["sha256"]] = Upload(**entry)
            for entry in await journal_lines(self.digests):
                self.hashes[(entry["path"], entry["size"], entry["mtime_ns"])] = (entry["sha256"], entry["units"])
        except (KeyError, TypeError):
            raise PipelineError(
                f"{self.journal} or {self.digests} holds a line this pipeline did not write; {MOVE_IT_AWAY}"
            ) from None

    async def close(self) -> None:
        """At the run's end: stop the uploads in flight, and delete those no row needs any
        more: with every input read, any upload of the job, a killed run's too, whose file
        no queued prompt still needs (a failed one's stays, for the rerun)."""
        await stop(*self.uploading.values())
        if not self.journaled or not self.inputs_read or self.api is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(UPLOAD_CLEANUP_S):
                ours = f"{UPLOAD_NAME_PREFIX}{self.tag} "
                files = self.api.client.aio.files
                # all, then delete: pages shift
                listed = [
                    made
                    async for made in await self.api.retried(lambda _: files.list(config={"page_size": 100}), API_CALL)
                ]
                for made in listed:
                    sha256 = str(made.display_name or "").removeprefix(ours)
                    if str(made.display_name or "").startswith(ours) and self.needed[sha256] <= 0:
                        await self.api.retried(lambda _, name=made.name: files.delete(name=name), DELETE)
                        self.uploads.pop(sha256, None)
                        await self.write({"deleted": sha256})


async def journal_lines(path: Path | None) -> list[dict[str, Any]]:
    """The JSON objects of a journal this pipeline appends to (none if it is not there), its
    torn last line removed (see complete_lines); a line not ours stops the run."""
    if path is None or not ours(path).exists():
        return []
    entries = []
    async for first, lines in complete_lines(path, b'{"'):
        for number, line in enumerate(lines, first):
            try:
                entries.append(entry := json.loads(line))
                if not isinstance(entry, dict):
                    raise TypeError
            except (ValueError, TypeError):
                raise PipelineError(
                    f"{path}, line {number}, is not a line this pipeline wrote; {MOVE_IT_AWAY}"
                ) from None
    return entries


async def processed(client: Any, made: Any) -> Any:
    """An upload once the Files API has processed it (a video takes a while): ACTIVE, or an
    error; StillProcessing while it is not (retried with the PROCESSING policy looks again)."""
    if str(getattr(made.state, "value", made.state) or "ACTIVE") == "PROCESSING":
        made = await client.aio.files.get(name=made.name)
    state = str(getattr(made.state, "value", made.state) or "ACTIVE")
    if state == "PROCESSING":
        raise StillProcessing(f"the Files API still processes {made.name}")
    if state == "FAILED":
        raise UnsendableFile(f"the Files API could not process {made.name}")
    return made


class StillProcessing(UnsendableFile):
    """An upload the Files API has not finished processing: looked at again, UPLOAD_PROCESSING_POLLS times at most."""


PROCESSING = RetryPolicy(
    "a look at an upload being processed", attempts=UPLOAD_PROCESSING_POLLS, every_s=1.0, waits_out=(StillProcessing,)
)


def file_digest(stream: BinaryIO, file: MediaFile, size: int) -> tuple[str, float]:
    """A file's SHA-256, and its length in the units its tokens are counted by (see media_units),
    in one read. UnsendableFile if it reads more or fewer bytes than its size (/proc, /sys, a
    file being written): those bytes are not what the folder holds."""
    digest, pages, first, tail, count = hashlib.sha256(), 0, b"", b"", 0
    while chunk := stream.read(READ_CHUNK_BYTES):
        digest.update(chunk)
        count += len(chunk)
        if file.mime_type == "application/pdf":
            # a page object across two chunks counts once
            pages += len(PDF_PAGE.findall(tail + chunk)) - len(PDF_PAGE.findall(tail))
            tail = chunk[-64:]
        first = first or chunk[:64]
    if count != size:
        raise UnsendableFile(
            f"file {file.name}: read {count:,} bytes where its size says {size:,} (not a plain file, or one being "
            f"written)"
        )
    return digest.hexdigest(), media_units(file.mime_type, size, first, pages)


def media_units(mime_type: str, size: int, first: bytes, pages: int) -> float:
    """A file's length as its tokens are counted: a PDF's pages (its /Type /Page objects), an
    image as one page, a WAV's seconds from its header and other audio's or video's from their
    size at a typical bitrate (AUDIO_BYTES_PER_S, VIDEO_BYTES_PER_S), text's tokens (CHARS_PER_TOKEN)."""
    kind = mime_type.partition("/")[0]
    if kind == "audio" and first[:4] == b"RIFF" and first[8:12] == b"WAVE" and len(first) >= 32:
        return size / max(1, int.from_bytes(first[28:32], "little"))  # the header's bytes per second
    return {
        "image": 1.0,
        "application": float(max(pages, 1)),
        "audio": size / AUDIO_BYTES_PER_S,
        "video": size / VIDEO_BYTES_PER_S,
        "text": size / CHARS_PER_TOKEN,
    }[kind]


def append_line(path: Path, record: dict[str, Any], synced: bool = True) -> None:
    """Append `record` to a journal as one line: O_APPEND, the whole line written; fsynced
    unless `synced` is False (a journal whose lost line costs only work done again)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, json_line(record).encode())
        if synced:
            os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------- batch --
@dataclass
class BatchJob:
    """A job on Gemini's Batch API (--batch): its name and its prompts, in the order sent."""

    name: str
    prompts: list[Prompt]


async def generate_in_batches(run: Run) -> None:
    """--batch: the generator stage, with the same contract as generate_content (prompts
    from run.prompts, outcomes to run.outcomes). Gathers queued prompts into jobs of up to
    BATCH_SIZE and runs each job (run_job) while gathering the next. The jobs earlier runs
    submitted are collected meanwhile, as a leftover of this run (see start_leftovers)."""
    journal = BatchJournal(run.settings.output_dir / BATCH_JOURNAL)
    try:
        async with asyncio.TaskGroup() as jobs:
            while job_prompts := await gather_job(run):
                jobs.create_task(run_job(run, job_prompts, journal))
    except BaseExceptionGroup as group:  # a job's error ends the run, as a generator's would
        raise group.exceptions[0] from None


async def gather_job(run: Run) -> list[Prompt]:
    """The prompts of the next job: those due again first (see Resubmissions), then new ones,
    up to BATCH_SIZE, or fewer once none came for BATCH_GATHER_S. A prompt that cannot be
    sent (not UTF-8) is failed here, not put in a job."""
    job: list[Prompt] = []
    while len(job) < run.settings.batch_size:
        prompt = await run.asking.resubmit.next_prompt(run.prompts, BATCH_GATHER_S if job else None)
        if prompt is None:
            break
        # queued before find_unknown_jobs found its job
        if prompt.id in run.past.in_batch_jobs and prompt.id not in run.asking.resubmit.held:
            run.asking.resubmit.done(prompt.id, run.prompts)
        elif prompt.error:
            await run.outcomes.put(Failure(prompt, prompt.error, attempts=0))
            run.asking.resubmit.done(prompt.id, run.prompts)
        else:
            job.append(prompt)
    return job


async def run_job(run: Run, job_prompts: list[Prompt], journal: BatchJournal) -> None:
    """Submit a job, wait for it to end, and queue an outcome for each of its prompts, or,
    for those that may pass if asked again, put them to a later job (Resubmissions). A
    prompt whose file cannot be uploaded (it changed since it was read) fails alone."""
    run.asking.resubmit.tries.update(prompt.id for prompt in job_prompts)
    with_files, results = await files_uploaded(run, job_prompts)
    sendable = [prompt for prompt in job_prompts if prompt.id not in {failure.prompt.id for failure in results}]
    try:
        job = await submit_job(run, sendable, journal, with_files) if sendable else None
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 (the API refused the job: its prompts fail, with the reason)
        results += all_failed(run, sendable, f"batch job not created: {describe(exc, run.settings)}")
    else:
        results += await collect_job(run, job) if job else []
    await settle_job_outcomes(run, results)


async def settle_job_outcomes(run: Run, outcomes: list[Outcome]) -> None:
    """A job's outcomes: to the writers; but the results that may pass if asked again, with
    attempts left, go to a later job once their back-off is over (Resubmissions)."""
    again = [
        o
        for o in outcomes
        if isinstance(o, Failure) and o.again and run.asking.resubmit.tries[o.prompt.id] < run.settings.max_attempts
    ]
    held = {id(outcome) for outcome in again}
    for outcome in outcomes:
        if id(outcome) not in held:
            run.asking.media.settled(outcome)
            await run.outcomes.put(outcome)
            run.asking.resubmit.done(outcome.prompt.id, run.prompts)
    if again:
        run.asking.resubmit.hold(again, run.progress.tally)
        await run.limits.gate.sleep(
            backoff_s(max(run.asking.resubmit.tries[o.prompt.id] for o in again), Exception(), run.settings)
        )
        for outcome in again:
            run.asking.resubmit.due.put_nowait(outcome.prompt)


class Resubmissions:
    """The prompts of ended batch jobs whose results may pass if asked again (a quota or a
    server error for that request, BATCH_AGAIN_CODES; an expired job): each waits its
    back-off, as an interactive retry does, then goes into the next job gathered, until it
    has been in MAX_ATTEMPTS jobs this run; only then is its failure written. A prompt taken
    from run.prompts owes it a task_done, given with its last outcome (all_answered waits
    for those); an earlier run's jobs (resume_job) wait until none is held (idle)."""

    def __init__(self) -> None:
        self.due: asyncio.Queue[Prompt] = asyncio.Queue()  # their back-off waited out: into the next job
        self.tries: Counter[str] = Counter()  # prompt id -> jobs it has been in, this run
        self.owed: set[str] = set()  # ids taken from run.prompts whose last outcome is not yet queued
        self.held: set[str] = set()  # ids to be asked again, or in a job again
        self.idle = asyncio.Event()  # set while none is held
        self.idle.set()

    async def next_prompt(self, prompts: asyncio.Queue[Prompt], timeout: float | None) -> Prompt | None:
        """A prompt due again, else the next new one; None if neither comes within `timeout`."""
        if not self.due.empty():
            return self.due.get_nowait()
        if not prompts.empty():
            return self.taken(prompts.get_nowait())
        getters = [asyncio.ensure_future(self.due.get()), asyncio.ensure_future(prompts.get())]
        try:
            done, _ = await asyncio.wait(getters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for getter in getters:
                getter.cancel()
        again, new = (getter.result() if getter in done else None for getter in getters)
        if new is not None:
            self.taken(new)
            if again is not None:  # both came at once: the new one waits its turn as if due
                self.due.put_nowait(new)
        return again or new

    def taken(self, prompt: Prompt) -> Prompt:
        self.owed.add(prompt.id)
        return prompt

    def attempt(self, prompt_id: str) -> int:
        """Which attempt a job's result for `prompt_id` is: the jobs it was in this run (an earlier run's: 1)."""
        return self.tries[prompt_id] or 1

    def hold(self, failures: list[Failure], tally: Tally) -> None:
        """These prompts will be asked again: none of them is done."""
        self.held.update(failure.prompt.id for failure in failures)
        self.idle.clear()
        tally.resubmitted += len(failures)
        log.debug("resubmitting %d prompts, e.g. %s: %s", len(failures), failures[0].prompt.id, failures[0].error)

    def done(self, prompt_id: str, prompts: asyncio.Queue[Prompt]) -> None:
        """`prompt_id`'s last outcome is queued."""
        self.held.discard(prompt_id)
        if not self.held:
            self.idle.set()
        if prompt_id in self.owed:
            self.owed.discard(prompt_id)
            prompts.task_done()


async def files_uploaded(run: Run, job_prompts: list[Prompt]) -> tuple[dict[str, list[Any]], list[Outcome]]:
    """The contents of a job's prompts that name files, their files uploaded (never inline in a
    job), by id; and a Failure for each prompt a file of which cannot be sent."""
    contents: dict[str, list[Any]] = {}
    failed: list[Outcome] = []
    for prompt in (p for p in job_prompts if p.media):
        try:
            contents[prompt.id] = await run.asking.media.contents(
                prompt, run.asking.maker.contents(prompt), inline=False
            )
        except UnsendableFile as exc:
            failed.append(Failure(prompt, str(exc), attempts=1, permanent=not isinstance(exc, EditedFile)))
    return contents, failed


async def collect_earlier_jobs(run: Run) -> None:
    """The jobs earlier runs submitted and did not finish collecting, all at once; with
    those a stopped run never heard back from (see find_unknown_jobs)."""
    await asyncio.gather(*(resume_job(run, job) for job in run.past.batch_jobs))


async def resume_job(run: Run, job: BatchJob) -> None:
    """A job an earlier run submitted: look at it at once (it may have ended long ago) and
    queue the outcomes of its prompts not yet written."""
    run.progress.job("resumed")
    outcomes = await collect_job(run, job, first_look_s=0.0)
    await settle_job_outcomes(run, [outcome for outcome in outcomes if outcome.prompt.id not in run.past.answered])
    await run.asking.resubmit.idle.wait()  # those asked again are asked by this run's jobs


async def submit_job(
    run: Run, job_prompts: list[Prompt], journal: BatchJournal, with_files: dict[str, list[Any]]
) -> BatchJob:
    """Create a batch job from an uploaded JSONL file of keyed requests. Never inline: the
    API has been seen to return inline results out of order and without the metadata
    sent (googleapis/python-genai#1909, #1886, #2008), while a file's results are keyed."""
    source = await upload_requests(run, job_prompts, with_files)
    display_name = f"pipeline {job_prompts[0].id} {os.urandom(4).hex()}"  # unique: a rerun may look it up
    config = {"display_name": display_name}
    journal.submitting(display_name, job_prompts)  # before the job exists: a rerun must find it, never pay twice
    try:
        created = await run.retried(
            lambda _: run.client.aio.batches.create(model=run.settings.model, src=source, config=config), API_CALL
        )
    except Exception as exc:
        if api_error_code(exc) is not None and classify(exc) in ("permanent", "auth"):  # the API said no: no job
            journal.created(display_name, None)
        raise  # else it may exist: the next run looks it up
    job = BatchJob(created.name, job_prompts)
    journal.created(display_name, job.name)
    log.debug("submitted %s: %d prompts, %s", job.name, len(job_prompts), source)
    run.progress.job("submitted")
    return job


async def upload_requests(run: Run, job_prompts: list[Prompt], with_files: dict[str, list[Any]]) -> str:
    """Upload a job's requests as a JSONL file through the Files API; returns its name."""
    rest: dict[int, dict[str, Any]] = {}  # each config's REST form, made once (most prompts share the run's)
    data = "".join(
        json_line({"key": p.id, "request": rest_request(p, rest, run.asking.maker, with_files.get(p.id))})
        for p in job_prompts
    ).encode()
    config = {"mime_type": "jsonl", "display_name": f"pipeline {job_prompts[0].id}"}
    uploaded = await run.retried(lambda _: run.client.aio.files.upload(file=io.BytesIO(data), config=config), TRANSFER)
    return str(uploaded.name)


async def collect_job(run: Run, job: BatchJob, first_look_s: float | None = None) -> list[Outcome]:
    """Wait for a job to end; then an outcome for each of its prompts. If the API says
    the job is gone, its prompts fail; if its results cannot be read, the run stops and
    the job stays in the journal for the next run: its answers are paid for."""
    try:
        ended = await wait_for_job(run, job, first_look_s)
        return await job_outcomes(run, job, ended)
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 (sorted below: the API's refusal, or results we cannot read)
        if api_error_code(exc) is not None:
            return all_failed(run, job.prompts, f"batch job {job.name}: {describe(exc, run.settings)}")
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise PipelineError(
            f"cannot read batch job {job.name} ({reason}); its answers stay on Google's side: run the same command "
            "again to collect them (with a newer google-genai if this persists)",
            1,
        ) from None


async def wait_for_job(run: Run, job: BatchJob, first_look_s: float | None) -> Any:
    """Poll the job every BATCH_POLL_S, backing off up to BATCH_POLL_MAX_S while it stays
    pending (a queue on Google's side can take hours); returns it once it has ended."""
    every_s = run.settings.batch_poll_s
    delay = every_s if first_look_s is None else first_look_s
    longest = max(BATCH_POLL_MAX_S, every_s)
    running = False
    while True:
        await asyncio.sleep(delay)
        current = await run.retried(lambda _: run.client.aio.batches.get(name=job.name), POLL)
        state = enum_text(current.state)
        log.debug("polled %s: %s", job.name, state)
        if state in JOB_ENDED:
            run.progress.job("done", ends="running" if running else None)
            return current
        if state == "JOB_STATE_RUNNING" and not running:
            run.progress.job("running")
            running = True
        delay = every_s if running else min(max(delay * 1.5, every_s), longest)


JOB_ENDED = {
    "JOB_STATE_SUCCEEDED",
    "JOB_STATE_PARTIALLY_SUCCEEDED",
    "JOB_STATE_FAILED",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_EXPIRED",
}


async def job_outcomes(run: Run, job: BatchJob, ended: Any) -> list[Outcome]:
    """An outcome per prompt of an ended job: its answer or its own error if the job
    succeeded, else the job's state as the reason."""
    state = enum_text(ended.state)
    # an expired job's prompts may pass in another
    if state not in ("JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED"):
        return all_failed(run, job.prompts, f"batch job {job.name} ended {state}", again=state == "JOB_STATE_EXPIRED")
    if not (ended.dest and ended.dest.file_name):  # jobs are sent as files, so their results come as one
        return all_failed(run, job.prompts, f"batch job {job.name} returned no responses file")
    data = await run.retried(lambda _: run.client.aio.files.download(file=ended.dest.file_name), TRANSFER)
    results = results_by_key(data)
    for response, _ in results.values():
        run.limits.gate.spend.bill(getattr(response, "usage_metadata", None))
        run.progress.tally.bill(getattr(response, "usage_metadata", None))
    return [job_outcome(prompt, *results.get(prompt.id, (None, None)), job, run) for prompt in job.prompts]


def rest_request(
    prompt: Prompt, rest: dict[int, dict[str, Any]], maker: PromptMaker, contents: list[Any] | None = None
) -> dict[str, Any]:
    """The prompt as a GenerateContentRequest in the REST API's JSON: what an interactive
    call sends, settings and all (google-genai's own dump of its config, by the API's names).
    `contents`: its turns with its files, when it has files."""
    contents = contents or maker.contents(prompt)
    request: dict[str, Any] = {"contents": [user_turn(contents)] if isinstance(contents, str) else contents}
    if prompt.config is None:
        return request
    if id(prompt.config) not in rest:
        dumped = prompt.config.model_dump(by_alias=True, exclude_none=True, mode="json")
        generation = {k: v for k, v in dumped.items() if k not in REQUEST_LEVEL}
        rest[id(prompt.config)] = {k: dumped[k] for k in REQUEST_LEVEL if k in dumped} | (
            {"generationConfig": generation} if generation else {}
        )
    return {**request, **rest[id(prompt.config)]}


def results_by_key(data: bytes) -> dict[str, tuple[Any, Any]]:
    """A responses file: JSON Lines of {"key", "response"} or {"key", "error"}."""
    from google.genai import types

    results = {}
    for line in data.decode().splitlines():
        if line.strip():
            item = json.loads(line)
            response = types.GenerateContentResponse.model_validate(item["response"]) if "response" in item else None
            results[str(item.get("key"))] = (response, SimpleNamespace(**item["error"]) if "error" in item else None)
    return results


def job_outcome(prompt: Prompt, response: Any, error: Any, job: BatchJob, run: Run) -> Outcome:
    attempt = run.asking.resubmit.attempt(prompt.id)
    if error is not None:  # a google.rpc.Status: its code is gRPC's (3 is INVALID_ARGUMENT), not HTTP's
        reason = f"batch request failed, code {getattr(error, 'code', '?')}: {getattr(error, 'message', '')}"
        return Failure(
            prompt, " ".join(reason.split()), attempt, again=getattr(error, "code", None) in BATCH_AGAIN_CODES
        )
    if response is None:
        return Failure(prompt, f"batch job {job.name} returned nothing for this prompt", attempt, again=True)
    outcome = to_outcome(prompt, response, attempt, run.settings)
    return not_as_asked(outcome) or outcome  # a job asks each prompt once: not asked again for its JSON


def all_failed(run: Run, prompts: list[Prompt], error: str, again: bool = False) -> list[Outcome]:
    """The outcome of each prompt of a job that failed as a whole (`again`: one that
    expired, worth submitting again)."""
    return [Failure(prompt, error, run.asking.resubmit.attempt(prompt.id), again=again) for prompt in prompts]


class BatchJournal:
    """OUTPUT_DIR/batch_jobs.jsonl: each submission in two lines, each appended and fsynced
    at once: before the job is created, its display name and prompts ("submitting"); then
    the name the API gave it ("submitted"). A rerun collects the jobs not yet written, instead of
    submitting their prompts again (which would pay for them twice); a submission with no
    second line (a run stopped mid-create) is looked up by its display name."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def submitting(self, display_name: str, job_prompts: list[Prompt]) -> None:
        """What its records need of each prompt: id, text, and the row's fields and answer schema if any."""
        self.append({"submitting": display_name, "prompts": [Records.batch_prompt(p) for p in job_prompts]})

    def created(self, display_name: str, name: str | None) -> None:
        """The job's name; None if it was never created."""
        self.append({"submitted": display_name, "job": name})

    def append(self, record: dict[str, Any]) -> None:
        with stop_on_os_error(f"cannot write to {self.path}"):
            append_line(self.path, record)

    async def load(self) -> tuple[list[BatchJob], dict[str, list[Prompt]]]:
        """The jobs created; and the submissions whose fate is unknown, by display name. A
        prompt submitted again (its result may pass in another job) belongs to its last
        submission only: an earlier job's result for it is not its outcome."""
        submissions: dict[str, list[Prompt]] = {}  # by display name, in the order submitted
        names: dict[str, str | None] = {}  # display name -> the job's name; None: never created; absent: unknown
        if ours(self.path).exists():
            async for first, lines in complete_lines(self.path, b'{"submit'):
                for number, line in enumerate(lines, first):
                    try:
                        record = json.loads(line)
                        if "submitting" in record:
                            submissions[str(record["submitting"])] = [
                                Records.journaled_prompt(p) for p in record["prompts"]
                            ]
                        else:
                            names[str(record["submitted"])] = str(record["job"]) if record["job"] else None
                    except (ValueError, KeyError, TypeError):
                        raise PipelineError(
                            f"{self.path}, line {number}, is not a batch job this pipeline recorded; {MOVE_IT_AWAY}"
                        ) from None
        jobs: list[BatchJob] = []
        unknown: dict[str, list[Prompt]] = {}
        later: set[str] = set()  # ids submitted after the submission at hand
        for display_name, job_prompts in reversed(submissions.items()):
            own = [prompt for prompt in job_prompts if prompt.id not in later]
            later.update(prompt.id for prompt in job_prompts)
            if display_name not in names:
                unknown[display_name] = own
            elif (name := names[display_name]) and own:
                jobs.append(BatchJob(name, own))
        return jobs[::-1], dict(reversed(unknown.items()))


async def find_unknown_jobs(run: Run, journal: BatchJournal) -> None:
    """Submissions a stopped run never heard back from: a job the API did create is found by
    its display name and collected like the others; otherwise its prompts are asked again."""
    unknown = run.past.unknown_submissions
    if not unknown:
        return
    found = {}
    async for job in await run.retried(lambda _: run.client.aio.batches.list(config={"page_size": 100}), API_CALL):
        if job.display_name in unknown:
            found[job.display_name] = job.name
    for display_name, job_prompts in unknown.items():
        journal.created(display_name, found.get(display_name))
        if display_name in found:
            run.past.add_batch_job(BatchJob(found[display_name], job_prompts))


# -------------------------------------------------------------------- pool --
class PostProcessor:
    """Runs postprocess() over the answers: on the event loop while it is quick, in a
    process pool once it is not. CPU-heavy work on the event loop would stall every request
    in flight; but a round trip to the pool costs a few hundred µs of this process's CPU,
    more than a cheap postprocess() (the shipped word count takes 2 µs), and starting the
    pool takes a quarter of a second (see worker_context). So the pool starts only when a
    batch of answers holds the loop longer than INLINE_MAX_S, and nothing starts for a run
    with nothing to do; with 0 processes, never. In the pool, answers travel in batches:
    the writer gathers up to POSTPROCESS_BATCH of them, waiting up to POSTPROCESS_WAIT_S
    for more while their work (measured in the pool) is not worth a trip; and a batch is
    split across processes only when its work is worth the extra trips."""

    def __init__(self, function: Callable[[str, str], dict[str, Any]], processes: int) -> None:
        self.function = function  # postprocess(), or --postprocess's
        self.processes = processes  # --postprocess-workers
        self.pool: ProcessPoolExecutor | None = None  # once started
        self.starting: asyncio.Future[ProcessPoolExecutor] | None = None  # the pool's start, in a thread
        self.cost_s = 0.0  # CPU time per answer, as last measured in the pool

    def start_pool(self) -> None:
        """Start the worker processes, in a thread (that takes a quarter of a second, see worker_context)."""
        if self.processes and self.starting is None:
            self.starting = asyncio.ensure_future(asyncio.to_thread(started_pool, self.processes))

    def pool_ready(self) -> ProcessPoolExecutor | None:
        """The pool, once started; None until then."""
        if self.pool is None and self.starting is not None and self.starting.done():
            try:
                self.pool = self.starting.result()
            except Exception as exc:  # noqa: BLE001 (whatever stopped the pool starting: one line)
                raise PipelineError(
                    f"cannot start the postprocess() processes ({exc}); try --postprocess-workers 0", 1
                ) from None
        return self.pool

    async def ready_pool(self) -> None:
        """Wait until the pool has started."""
        assert self.starting is not None
        await asyncio.wait([self.starting])
        self.pool_ready()

    def worth_waiting(self, count: int) -> bool:
        """Whether a batch of `count` answers had better wait for more before its trip."""
        return self.pool is not None and count < POSTPROCESS_BATCH and count * self.cost_s < ROUND_TRIP_S

    async def run(self, batch: list[Outcome]) -> list[Outcome]:
        """The batch with postprocess() applied: each Response gets its extra fields, or
        becomes a Failure if postprocess() raised on it."""
        responses = [o for o in batch if isinstance(o, Response)]
        pairs = [(r.prompt.text, r.text) for r in responses]
        if not pairs:
            return batch
        results = self.run_here(pairs) if self.pool_ready() is None else []
        if len(results) < len(pairs):  # too slow for the event loop: the pool takes the rest
            self.start_pool()
            await self.ready_pool()
            results += await self.run_in_pool(pairs[len(results) :])
        extras = iter(results)  # in the order of the batch's responses
        return [with_extra(o, next(extras)) if isinstance(o, Response) else o for o in batch]

    def run_here(self, pairs: list[tuple[str, str]]) -> list[str]:
        """postprocess() on the event loop, over the first `pairs` that INLINE_MAX_S allows
        (all of them with --postprocess-workers 0; none once the pool is starting)."""
        budget_s = math.inf if not self.processes else 0.0 if self.starting else INLINE_MAX_S
        results, cpu_s = postprocess_batch(self.function, pairs, budget_s)
        if cpu_s > INLINE_MAX_S:  # too much work for the event loop: the pool takes the next answers
            self.start_pool()
        return results

    async def run_in_pool(self, pairs: list[tuple[str, str]]) -> list[str]:
        loop = asyncio.get_running_loop()
        chunks = max(1, min(self.processes, len(pairs), int(len(pairs) * self.cost_s / ROUND_TRIP_S)))
        size = -(-len(pairs) // chunks)
        try:
            done = await asyncio.gather(
                *(
                    loop.run_in_executor(self.pool, postprocess_batch, self.function, pairs[i : i + size])
                    for i in range(0, len(pairs), size)
                )
            )
        except BrokenProcessPool:
            raise PipelineError("a postprocess() worker process died (out of memory?); rerun to continue", 1) from None
        except pickle.PicklingError as exc:  # e.g. postprocess() defined where the pool cannot find it by name
            raise PipelineError(
                f"cannot send postprocess() to its processes ({exc}); try --postprocess-workers 0"
            ) from None
        self.cost_s = sum(cpu_s for _, cpu_s in done) / len(pairs)
        return [result for results, _ in done for result in results]

    async def aclose(self) -> None:
        """Stop the worker processes: no child outlives the run, whatever ended it."""
        if self.starting is not None:
            with contextlib.suppress(Exception):  # a pool that never started has nothing to stop
                self.pool = await asyncio.shield(self.starting)
        if self.pool is not None:
            await asyncio.to_thread(self.pool.shutdown, wait=True, cancel_futures=True)


def started_pool(processes: int) -> ProcessPoolExecutor:
    """A process pool whose first worker is up (the others start as work comes)."""
    pool = ProcessPoolExecutor(processes, worker_context(), initializer=become_pool_worker)
    pool.submit(int).result()
    return pool


def worker_context() -> Any:
    """forkserver on Linux, elsewhere the platform's default (spawn): never fork, as this
    process has threads by the time the pool starts, and a child forked from it could
    inherit a lock that one of them holds, and hang on it. The fork server is a fresh
    process that loads pipeline.py once (about 0.25 s) and forks the workers from itself."""
    return multiprocessing.get_context("forkserver" if sys.platform == "linux" else None)


def become_pool_worker() -> None:
    """Set up a worker process: it yields the CPU to the event loop (on a busy machine the
    loop would otherwise wait whole scheduler slices behind it); Ctrl-C is the pipeline's
    to handle (it stops the pool); and if the pipeline is killed outright, the worker
    exits too instead of waiting forever."""
    os.nice(POOL_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=exit_with_parent, args=(parent.sentinel,), daemon=True).start()


def exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # ready when the parent process is gone
    os._exit(1)


def postprocess_batch(
    function: Callable[[str, str], dict[str, Any]], pairs: list[tuple[str, str]], budget_s: float = math.inf
) -> tuple[list[str], float]:
    """In a worker process: `function` over (prompt, response) pairs, and the CPU time it took.
    Each result is the extra fields as a JSON object, or, if `function` failed on that answer,
    the reason. On the event loop, `budget_s` of this thread's CPU time may stop it early: the
    first pairs' results. (CPU time, not wall time: a VM that pauses the process a moment must
    not pass for a slow postprocess().)"""
    started = time.thread_time()
    results = []
    for prompt, response in pairs:
        if time.thread_time() - started >= budget_s:
            break
        results.append(extra_fields(function, prompt, response))
    return results, time.thread_time() - started


def extra_fields(function: Callable[[str, str], dict[str, Any]], prompt: str, response: str) -> str:
    try:
        extra = function(prompt, response)
        if not isinstance(extra, dict):
            raise TypeError(f"returned {type(extra).__name__}, not a dict")
        if reserved := sorted(extra.keys() & {"id", "prompt"}):
            raise ValueError(f"returned {reserved[0]!r}, which resuming needs as it is")
        if taken := sorted(extra.keys() & RECORD_FIELDS):
            raise ValueError(f"returned {taken[0]!r}, a field the record has: name it otherwise")
        return json_line(extra)[:-1]  # encoded here, in the pool: the event loop only splices it on
    except Exception as exc:  # noqa: BLE001 (the user's code: any error fails just this answer)
        return POSTPROCESS_FAILED + " ".join(f"{type(exc).__name__}: {exc}".split())


def with_extra(response: Response, extra: str) -> Outcome:
    """The answer with postprocess()'s fields (a JSON object), or failed with the reason."""
    if not extra.startswith("{"):
        return Failure(response.prompt, extra, response.attempts, response=response.text)
    response.extra = extra
    return response


# ------------------------------------------------------------------ writer --
def open_writer(run: Run, number: int) -> Writer:
    """Writer `number`'s files: its own shards (numbered from the shared run.writing.shard_numbers),
    arrivals journal (none when post-processing runs inline: answers then reach the shards
    with no wait) and failure journal (sharing run.past.failures: see FailureLog)."""
    output_dir = run.settings.output_dir
    journal = ArrivalJournal(output_dir, f"{run.writing.name}.{number}", needed=run.settings.postprocess_workers > 0)
    shards = ShardWriter(output_dir, run.settings.shard_size, run.writing.shard_numbers, journal)
    return Writer(
        shards,
        FailureLog(failure_journal(output_dir, number), run.past.failures),
        run.writing.postprocessor,
        run.outcomes,
        run.progress,
    )


@dataclass
class Writer:
    """What one writer owns, and its one verb: write(batch) post-processes a batch of
    outcomes, writes the answers to its shards and the failures to its failure journal,
    counts them, and marks them done on the queue. Each answer is journaled before, as it
    is taken off the queue (arrived)."""

    shards: ShardWriter  # its shards, and its arrivals journal
    failures: FailureLog  # its failure journal
    postprocessor: PostProcessor  # shared by the writers: runs postprocess()
    outcomes: asyncio.Queue[Outcome]  # where its batches come from (each outcome marked done once written)
    progress: Progress  # counts what is written

    def arrived(self, batch: list[Outcome]) -> None:
        """Outcomes just taken off the queue: their answers journaled at once (a kill loses none)."""
        self.shards.arrived([outcome for outcome in batch if isinstance(outcome, Response)])

    def worth_waiting(self, taken: int) -> bool:
        """Whether to wait for more outcomes before post-processing `taken` (see PostProcessor)."""
        return self.postprocessor.worth_waiting(taken)

    async def write(self, batch: list[Outcome]) -> list[Outcome]:
        """The batch post-processed and written (what post-processing made of it is returned)."""
        done = await self.postprocessor.run(batch)
        answered = [o for o in done if isinstance(o, Response)]
        self.shards.write(answered, then=self.progress.written)  # counted as written: a full disk may stop it midway
        failed = [o for o in done if isinstance(o, Failure)]
        self.failures.write(failed, answered)
        self.progress.written(failed)
        for _ in done:
            self.outcomes.task_done()
        await self.shards.settle()
        return done

    async def aclose(self) -> None:
        """Its failure journal synced and closed, then its shards, however the writer ends."""
        try:
            await self.failures.aclose()
        finally:
            await self.shards.aclose()


async def next_batch(outcomes: asyncio.Queue[Outcome], writer: Writer) -> list[Outcome]:
    """The next outcome and all that are waiting; and, while post-processing them in the
    pool would not yet be worth the trip, what arrives within POSTPROCESS_WAIT_S. Each
    answer is journaled as it is taken, before any wait (see Writer.arrived)."""
    batch = taken(outcomes, await outcomes.get(), writer)
    if writer.worth_waiting(len(batch)):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POSTPROCESS_WAIT_S):
                while writer.worth_waiting(len(batch)):
                    batch += taken(outcomes, await outcomes.get(), writer)
    return batch


def taken(outcomes: asyncio.Queue[Outcome], first: Outcome, writer: Writer) -> list[Outcome]:
    """`first` and every outcome waiting behind it, their answers journaled."""
    batch = [first]
    while not outcomes.empty():
        batch.append(outcomes.get_nowait())
    writer.arrived(batch)
    return batch


class ShardWriter:
    """Appends responses to shard_00000.jsonl, shard_00001.jsonl, ... of `size` records.

    A batch goes to the operating system in plain write() calls, with no await between
    taking answers off the queue and writing them: copying a batch into the page cache
    takes microseconds (less than a thread hop), and a process killed at any moment then
    loses only the answers in flight and in the queue. Full shards are fsynced and closed
    in a worker thread while writing goes on, several at a time (a thread round trip
    per shard would cost more than the writing). A shard is created only when its first
    record arrives, so none is empty, and never over an existing file. With WRITERS > 1
    each writer has its own ShardWriter; they share `numbers`, so no two ever pick the same.

    It owns its arrivals journal: answers go in as they are taken (arrived), and a journal
    file goes once the shards holding its answers are synced (settle)."""

    def __init__(self, output_dir: Path, size: int, numbers: Iterator[int], journal: ArrivalJournal) -> None:
        self.output_dir = output_dir
        self.size = size
        self.numbers = numbers
        self.journal = journal  # the answers taken for these shards, as they arrived; used by this writer alone
        self.number = -1
        self.fd: int | None = None  # the open shard
        self.count = 0  # records in it
        self.full: list[tuple[int, int]] = []  # full shards (fd, number), open, not yet handed to a thread
        # jobs fsyncing and closing full shards, by first number
        self.syncing: list[tuple[asyncio.Future[None], int]] = []

    @property
    def name(self) -> str:
        return f"shard_{self.number:05d}.jsonl"

    def arrived(self, responses: list[Response]) -> None:
        """Answers just taken off the queue for these shards: journaled before any wait."""
        self.journal.write(responses)

    def write(self, responses: list[Response], then: Callable[[list[Response]], None]) -> None:
        """Append `responses`, calling `then` with each run of them once the OS has it (one run
        per shard touched), so that a full disk midway leaves the written ones counted."""
        while responses:
            if self.fd is None:
                self.number = next(self.numbers)
                self.fd = os.open(
                    self.output_dir / self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                )
            taken, responses = responses[: self.size - self.count], responses[self.size - self.count :]
            write_all(self.fd, "".join(map(Records.answer, taken)).encode())
            for response in taken:
                log.debug("wrote %s -> %s", response.prompt.id, self.name)
            self.count += len(taken)
            if self.count == self.size:
                self.full.append((self.fd, self.number))
                self.fd, self.count = None, 0
            then(taken)
        if len(self.full) >= SHARDS_PER_SYNC:
            self.sync_full()

    def sync_full(self) -> None:
        """Hand the full shards to a worker thread to fsync and close."""
        if self.full:
            job = asyncio.get_running_loop().run_in_executor(None, sync_and_close, *(fd for fd, _ in self.full))
            self.syncing.append((job, self.full[0][1]))
            self.full = []

    async def settle(self, pending: int = SYNCS_PENDING) -> None:
        """After a batch: wait until at most `pending` sync jobs are running (raising the first
        error), then close a full journal file, and remove those whose answers are durable."""
        while self.syncing and (len(self.syncing) > pending or self.syncing[0][0].done()):
            await self.syncing[0][0]  # a job that failed stays listed: its shards are not durable
            self.syncing.pop(0)
        self.journal.rotate(self.number)
        self.journal.forget(self.durable_below)

    @property
    def durable_below(self) -> int:
        """Every shard of this writer numbered below this one is fsynced and closed."""
        unsynced = [number for _, number in (*self.syncing, *self.full)] + (
            [self.number] if self.fd is not None else []
        )
        return min(unsynced, default=sys.maxsize)

    async def aclose(self) -> None:
        if self.fd is not None:
            self.full.append((self.fd, self.number))
            self.fd = None
        self.sync_full()
        try:
            await self.settle(pending=0)
        finally:
            self.journal.close()
            self.journal.forget(self.durable_below)


class ArrivalJournal:
    """OUTPUT_DIR/arrivals.<run>.<writer>.<n>.jsonl: each answer a writer takes off the
    queue, copied into the page cache before it waits for the pool or anything else, so
    that a kill -9 loses no answer that reached the writer: the next run turns those no
    shard holds into records, with no request. Kept small: a file is closed after
    ARRIVALS_PER_FILE answers and removed once the shards holding them are fsynced; the
    rest go when the run's shards are all synced.

    The file is mapped into memory, shared: what is copied there is in the page cache at
    once and outlives the process, as a write() would. A write() per batch taken, in a
    writer that takes one or two answers at a time, cost three times as much CPU (see
    tests/README.md, Paying twice): a system call that lets go of the GIL, where the copy is neither.
    Its space is reserved on disk before it is mapped (posix_fallocate), so a full disk
    is an error here and never a SIGBUS later; the mapping doubles when it must grow,
    and a closed file is cut to its lines. A killed run leaves zeros after them: the
    next run cuts those (see cut_at_zero)."""

    def __init__(self, output_dir: Path, name: str, needed: bool = True) -> None:
        self.output_dir = output_dir
        self.name = name  # "<run>.<writer>": unique to this writer of this run
        self.needed = needed  # False when post-processing runs inline: answers then reach the shards with no wait
        self.fd: int | None = None  # the file being filled
        self.path: Path | None = None  # ...its path
        self.map: mmap.mmap | None = None  # ...its reserved space, mapped
        self.end = 0  # ...where its lines end
        self.count = 0  # ...the answers in it
        self.files = itertools.count()
        self.closed: list[tuple[Path, int]] = []  # earlier files, each with the last shard its answers went to

    def write(self, responses: list[Response]) -> None:
        if not responses or not self.needed:
            return
        lines = "".join(map(Records.journal_line, responses)).encode()
        if self.fd is None:
            self.path = self.output_dir / f"arrivals.{self.name}.{next(self.files)}.jsonl"
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        if self.map is None or self.end + len(lines) > len(self.map):
            self.reserve(self.end + len(lines))
        assert self.map is not None
        self.map[self.end : self.end + len(lines)] = lines
        self.end += len(lines)
        self.count += len(responses)

    def reserve(self, size: int) -> None:
        """Make the file's reserved and mapped space hold at least `size` bytes."""
        assert self.fd is not None
        size = max(ARRIVALS_FILE_BYTES, size, 2 * len(self.map) if self.map else 0)
        reserve_space(self.fd, size)
        if self.map is not None:
            self.map.close()
        self.map = mmap.mmap(self.fd, size)

    def rotate(self, last_shard: int) -> None:
        """After a batch is in the shards, the last of them `last_shard`: a full file is closed."""
        if self.fd is not None and self.count >= ARRIVALS_PER_FILE:
            self.close(last_shard)

    def close(self, last_shard: int = sys.maxsize - 1) -> None:
        """Close the file; by default as one that goes only once every shard is synced."""
        if self.fd is not None and self.path is not None:
            if self.map is not None:
                self.map.close()
            os.ftruncate(self.fd, self.end)
            os.close(self.fd)
            self.closed.append((self.path, last_shard))
            self.fd, self.path, self.map, self.end, self.count = None, None, None, 0, 0

    def forget(self, durable_below: int) -> None:
        """Remove the closed files whose answers are all in synced shards (see ShardWriter.durable_below)."""
        while self.closed and self.closed[0][1] < durable_below:
            self.closed.pop(0)[0].unlink()


def reserve_space(fd: int, size: int) -> None:
    """Extend the file to `size` bytes of zeros that have their place on disk: storing into
    a mapping of space that has none (a full disk) would kill the process with SIGBUS.
    posix_fallocate where the system has it; else the zeros are written."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # pragma: no cover (macOS)
        have = os.fstat(fd).st_size
        os.pwrite(fd, bytes(size - have), have)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def sync_and_close(*fds: int) -> None:
    """fsync and close each file; every one is closed even if an fsync fails."""
    with contextlib.ExitStack() as closing:
        for fd in fds:
            closing.callback(os.close, fd)
        for fd in fds:
            os.fsync(fd)


class FailureLog:
    """A writer's journal of the prompts that failed for good: failed.jsonl (failed.K.jsonl
    for writer K > 0, so that each file has one writer). Failures are appended as they
    come, so a kill loses none. The writers share `unanswered` (id -> line: what
    failed.jsonl will hold), from which finish_failures() writes it when the run ends."""

    def __init__(self, path: Path, unanswered: dict[str, str]) -> None:
        self.path = path
        self.unanswered = unanswered
        self.fd: int | None = None

    def write(self, failures: list[Failure], answered: list[Response]) -> None:
        for response in answered:
            self.unanswered.pop(response.prompt.id, None)
        if not failures:
            return
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        for failure in failures:
            self.unanswered[failure.prompt.id] = Records.failure(failure)
            log.debug("failed %s -> %s: %s", failure.prompt.id, self.path.name, failure.error)
        write_all(self.fd, "".join(self.unanswered[f.prompt.id] for f in failures).encode())

    async def aclose(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            await asyncio.to_thread(sync_and_close, fd)


async def finish_failures(output_dir: Path, unanswered: dict[str, str]) -> None:
    """When every writer is done: failed.jsonl holds exactly the prompts that failed and
    are still unanswered, once each; the other writers' journals are merged into it."""
    with stop_on_os_error(f"cannot write to {output_dir}"):
        await asyncio.to_thread(replace_file, output_dir / FAILED_FILE, "".join(unanswered.values()))
        for path in failure_journals(output_dir):
            if path.name != FAILED_FILE:
                path.unlink()


def failure_journal(output_dir: Path, writer: int) -> Path:
    return output_dir / (FAILED_FILE if writer == 0 else f"failed.{writer}.jsonl")


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a crash leaves the old or the new file), or
    remove `path` when there is no text."""
    if not text:
        path.unlink(missing_ok=True)
        return
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


# ------------------------------------------------------------------ resume --
class Fingerprints:
    """A set of strings (or tuples of them) kept as their 64-bit hash() in sorted arrays: 8
    bytes each where a dict of the strings takes about 150, so that resuming a job of 10
    million prompts fits in 160 MB, not 1.5 GB. Filled once (add, then freeze), then only
    asked. The hashes are this process's own, never stored. Two values share one with odds
    of n / 2**64 per question: for 10 million, about 1 in 2 billion."""

    BUCKETS = 4096  # arrays, by a hash's low bits: sorting each needs memory for that one only

    def __init__(self) -> None:
        self.buckets = [array.array("q") for _ in range(self.BUCKETS)]  # each sorted once frozen
        self.mask = self.BUCKETS - 1  # a fingerprint's bucket is fingerprint & mask

    def add(self, values: Iterable[Any]) -> None:
        """Add each of `values` (one call for many: a rerun adds a million)."""
        buckets, mask = self.buckets, self.mask
        for fingerprint in map(hash, values):
            buckets[fingerprint & mask].append(fingerprint)

    def freeze(self) -> None:
        self.buckets = [array.array("q", sorted(set(bucket))) for bucket in self.buckets]

    def __contains__(self, value: object) -> bool:
        fingerprint = hash(value)
        bucket = self.buckets[fingerprint & self.mask]
        found = bisect.bisect_left(bucket, fingerprint)
        return found < len(bucket) and bucket[found] == fingerprint

    def __len__(self) -> int:
        return sum(map(len, self.buckets))


def asked_as(prompt_id: str, text: str, digest: str) -> tuple[str, ...]:
    """A request as resuming compares it: its id, its text, and its row's digest if it has one."""
    return (prompt_id, text, digest) if digest else (prompt_id, text)


class Answered:
    """The prompts earlier runs answered, each as a 64-bit fingerprint of the request it was
    asked with (asked_as), so that a reader can tell whether a prompt was answered, and
    whether with this very request (see PastRuns.skips).

    A prompt known by its place, <file name>:<line number> (a line of a text file, a row
    without an id of its own), has its fingerprint at that index of its file's array: one
    array lookup a question, 8 bytes a line. Any other id goes to Fingerprints, of its id
    and of its request (16 bytes a prompt, a binary search a question). A rerun of a
    finished job asks one question per input line: the arrays halved the time they took."""

    def __init__(self) -> None:
        # file name -> a fingerprint by line number (NO_FINGERPRINT: none)
        self.places: dict[str, array.array[int]] = {}
        self.ids = Fingerprints()  # the other ids...
        self.asked = Fingerprints()  # ...and asked_as(id, text, digest) of each
        self.count = 0  # prompts held, once frozen

    def add(self, answered: list[tuple[str, str, str]]) -> None:
        """Add prompts by their (id, text, row digest)."""
        others, places = [], self.places
        for prompt_id, text, digest in answered:
            name, _, number = prompt_id.rpartition(":")  # see place(), written out here: a rerun adds a million
            line = int(number) if number.isascii() and number.isdigit() and number[0] != "0" else 0
            slots = places.get(name) if line else None
            if slots is None and line and line <= PLACES_AT_FIRST:
                slots = places[name] = array.array("q", [NO_FINGERPRINT])
            if slots is not None and line < 2 * len(slots) + PLACES_AT_FIRST:  # dense enough for an array
                if line >= len(slots):
                    slots.extend(itertools.repeat(NO_FINGERPRINT, max(line + 1, 2 * len(slots)) - len(slots)))
                slots[line] = hash((text, digest) if digest else text)  # its place is its id
            else:
                others.append((prompt_id, text, digest))
        self.ids.add(prompt_id for prompt_id, _, _ in others)
        self.asked.add(itertools.starmap(asked_as, others))

    def freeze(self) -> None:
        self.ids.freeze()
        self.asked.freeze()
        for slots in self.places.values():  # arrays grow by doubling: cut what no line took
            del slots[-(-len(slots.tobytes().rstrip(b"\xff")) // slots.itemsize) :]  # NO_FINGERPRINT is all 0xff
        self.count = len(self.ids) + sum(len(slots) - slots.count(NO_FINGERPRINT) for slots in self.places.values())

    def holds(self, prompt_id: str, text: str, digest: str) -> bool | None:
        """True if `prompt_id` was answered as this request (asked_as); False if as another; None if not at all."""
        name, _, number = prompt_id.rpartition(":")  # see place(), written out here: a rerun asks once per input line
        line = int(number) if number.isascii() and number.isdigit() and number[0] != "0" else 0
        slots = self.places.get(name) if line else None
        if slots is not None and line < len(slots) and (held := slots[line]) != NO_FINGERPRINT:
            return held == hash((text, digest) if digest else text)
        if asked_as(prompt_id, text, digest) in self.asked:
            return True
        return False if prompt_id in self.ids else None

    def lines_of(self, name: str) -> array.array[int] | None:
        """The fingerprints of file `name`'s lines answered as plain text, by line number: a
        line's is hash(its text), or NO_FINGERPRINT (which no hash() is) if none."""
        return self.places.get(name)

    def __contains__(self, prompt_id: str) -> bool:
        name, line = place(prompt_id)
        slots = self.places.get(name) if line else None
        if slots is not None and line < len(slots) and slots[line] != NO_FINGERPRINT:
            return True
        return prompt_id in self.ids

    def __len__(self) -> int:
        return self.count


NO_FINGERPRINT = -1  # hash() never returns -1 (CPython keeps it for errors): an empty place
PLACES_AT_FIRST = 4096  # a file's array of places starts with a line this low, and grows by this much past double


def place(prompt_id: str) -> tuple[str, int]:
    """An id's file name and line number, if it is written as <name>:<number> (number 0: it is not)."""
    name, _, number = prompt_id.rpartition(":")
    return (name, int(number)) if number.isascii() and number.isdigit() and number[0] != "0" else (name, 0)


class Route(enum.Enum):
    """What a reader does with a prompt, as the output folder says (PastRuns.route); a third
    answer is a journaled Response, to be written with no request."""

    ASK = "ask"  # to the generators
    DONE = "done"  # left out: answered, refused for good, cut short at this budget, or in a batch job


@dataclass
class PastRuns:
    """What earlier runs left in the output dir, so that this run continues where they stopped."""

    output_dir: Path
    answered: Answered = field(default_factory=Answered)
    failures: dict[str, str] = field(default_factory=dict)  # prompt id -> its failed.jsonl line, if still unanswered
    refused: set[str] = field(default_factory=set)  # ...of those, the ids the API refused for good: not asked again
    # ...and those cut short, by id: the budget they were cut at
    cut_at: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_alone: int = 0  # refused prompts the readers skipped
    cut_left: int = 0  # prompts cut short before, at the budget they would be asked with now, that the readers skipped
    next_shard: int = 0
    batch_jobs: list[BatchJob] = field(default_factory=list)  # --batch jobs submitted, not yet all written
    in_batch_jobs: set[str] = field(default_factory=set)  # the ids of their prompts
    unknown_submissions: dict[str, list[Prompt]] = field(default_factory=dict)  # see BatchJournal
    # answers received, never written, by id (see ArrivalJournal)
    journaled: dict[str, Response] = field(default_factory=dict)
    arrival_files: list[Path] = field(default_factory=list)  # the arrivals journals that held them

    def add_batch_job(self, job: BatchJob) -> None:
        self.batch_jobs.append(job)
        self.in_batch_jobs.update(p.id for p in job.prompts)

    def route(self, prompt: Prompt) -> Route | Response:
        """Where a reader sends `prompt`: the answer an earlier run journaled for this very
        request (to the writers), or Route.DONE (see skips), or Route.ASK."""
        if self.journaled and (journaled := self.journaled_answer(prompt)):
            return journaled
        return Route.DONE if self.skips(prompt) else Route.ASK

    def skips(self, prompt: Prompt) -> bool:
        """Whether a reader leaves `prompt` out: answered, refused for good, or waiting in a
        batch job. An answered id whose request (asked_as) is not the one answered stops the
        run before that prompt is asked: the inputs were edited, and one folder would hold two jobs."""
        held = self.answered.holds(prompt.id, prompt.text, prompt.digest)
        if held:
            return True
        if prompt.id in self.refused:
            self.left_alone += 1
            return True
        if prompt.id in self.cut_at and self.cut_at[prompt.id] == budget_of(prompt.config):  # it would be cut again
            self.cut_left += 1
            return True
        if held is False:
            raise PipelineError(
                f"{prompt.id} is not the prompt that {self.output_dir} holds an answer for: the inputs "
                "changed since that run; choose a fresh --output-dir"
            )
        return prompt.id in self.in_batch_jobs

    def journaled_answer(self, prompt: Prompt) -> Response | None:
        """The answer an earlier run journaled for `prompt`, if it answered this very request
        (text and row digest); one for an edited row is dropped, and the row asked again."""
        journaled = self.journaled.pop(prompt.id, None) if self.journaled else None
        if journaled is None:
            return None
        if (journaled.prompt.text, journaled.prompt.digest) != (prompt.text, prompt.digest):
            log.info("%s was edited since an earlier run received its answer: asking it again", prompt.id)
            return None
        journaled.prompt = prompt  # the row's fields as they are now
        return journaled

    def drop_journaled(self) -> None:
        """Once every input is read: journaled answers that no input asked for now are not written."""
        if self.journaled:
            ids = ", ".join(itertools.islice(self.journaled, 5))
            log.warning(
                "dropping %s an earlier run journaled for ids no input has now: %s",
                plural(len(self.journaled), "answer"),
                ids,
            )
            self.journaled.clear()


async def load_shard(answered: Answered, path: Path) -> int:
    """Add a shard's prompts to `answered`; how many it held."""
    records = 0
    async for fronts, _ in read_records(path):
        answered.add(fronts)
        records += len(fronts)
    if not records:  # created, or emptied by the repair, just before a kill: no shard is ever empty
        path.unlink()
    return records


async def load_past_runs(output_dir: Path) -> PastRuns:
    """Read the shards and failed.jsonl of earlier runs. A last line cut short by a
    killed process is removed, so that prompt is simply asked again."""
    log.debug("reading what earlier runs left in %s", output_dir)
    past = PastRuns(output_dir)
    for number, path in shard_files(output_dir):
        if await load_shard(past.answered, path):
            past.next_shard = number + 1
    past.answered.freeze()
    for path in failure_journals(output_dir):  # appended to while running, so an id may repeat: the last line wins
        async for fronts, lines in read_records(path):
            past.failures.update(
                (prompt_id, line + "\n")
                for (prompt_id, _, _), line in zip(fronts, lines, strict=True)
                if prompt_id not in past.answered
            )
    for prompt_id, line in past.failures.items():
        failure = json.loads(line)
        if failure.get("permanent") is True:
            past.refused.add(prompt_id)
        elif failure.get("cut_short") is True:
            past.cut_at[prompt_id] = failure.get("budget") or {}
    await load_arrivals(past)
    jobs, unknown = await BatchJournal(output_dir / BATCH_JOURNAL).load()
    for job in jobs:
        if any(p.id not in past.answered and p.id not in past.failures for p in job.prompts):
            past.add_batch_job(job)
    for display_name, job_prompts in unknown.items():  # if created, it may hold answers to failed prompts too
        if any(p.id not in past.answered for p in job_prompts):
            past.unknown_submissions[display_name] = job_prompts
    return past


async def load_arrivals(past: PastRuns) -> None:
    """The answers earlier runs journaled as they arrived (see ArrivalJournal) and never
    wrote to a shard: the first of each id, for the reader to write with no request."""
    for path in sorted(files_named(past.output_dir, ARRIVALS)):
        past.arrival_files.append(path)
        await cut_at_zero(path)
        async for fronts, lines in read_records(path):
            for (prompt_id, _, _), line in zip(fronts, lines, strict=True):
                if prompt_id not in past.answered and prompt_id not in past.journaled:
                    try:
                        past.journaled[prompt_id] = Records.journaled_answer(json.loads(line))
                    except (KeyError, TypeError, ValueError):
                        raise PipelineError(
                            f"{path} holds a line that is not an answer this pipeline journaled; {MOVE_IT_AWAY}"
                        ) from None


MOVE_IT_AWAY = "move the file away or choose a fresh --output-dir"


def record_job(settings: Settings, generation: dict[str, Any], answered: bool) -> bool:
    """One folder, one job: its answers were all asked with one model and one set of settings.
    The first run records them in JOB_FILE; a rerun with others stops before any request,
    unless the folder holds no answer yet (a mistyped --model, say, is simply corrected).
    Each run's budget (BUDGET_FIELDS) is listed there too: a rerun may change it.
    True when the job recorded is replaced: what an earlier job was refused says nothing now."""
    path = ours(settings.output_dir / JOB_FILE)
    job = {"model": f"{settings.model} (offline)" if settings.offline else settings.model, "settings": generation}
    budget = {attribute: value for attribute in BUDGET_FIELDS if (value := getattr(settings, attribute)) is not None}
    recorded = recorded_job(path)
    known = recorded if isinstance(recorded, dict) else {}
    before = (
        {k: v for k, v in known["settings"].items() if k not in BUDGET_KEYS}
        if isinstance(known.get("settings"), dict)
        else {}
    )
    if recorded is not None and known.get("model") == job["model"] and before == generation:
        budgets = known["budgets"] if isinstance(known.get("budgets"), list) else []
        if budgets[-1:] != [budget]:
            with stop_on_os_error(f"cannot write {path}"):
                replace_file(path, json_line({**job, "budgets": [*budgets, budget]}))
        return False
    if recorded is None or not answered:
        with stop_on_os_error(f"cannot write {path}"):
            replace_file(path, json_line({**job, "budgets": [budget]}))
        return recorded is not None
    changed = ["--model or --offline"] if known.get("model") != job["model"] else []
    changed += sorted(
        SETTING_FLAGS.get(k, k) for k in before.keys() | generation.keys() if before.get(k) != generation.get(k)
    )
    raise PipelineError(
        f"{settings.output_dir} holds answers asked with other settings ({', '.join(changed)} changed since, "
        f"see {path}): choose a fresh --output-dir for the new job"
    )


def recorded_job(path: Path) -> Any:
    """What JOB_FILE holds, decoded; None if there is none yet."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PipelineError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise PipelineError(f"{path} is not a job this pipeline recorded; {MOVE_IT_AWAY}") from None


# for record_job
SETTING_FLAGS = {
    api_field: f"--{attribute.replace('_', '-')}" for attribute, api_field in GENERATION_FIELDS.items()
} | {"context": "--context"}


def shard_files(output_dir: Path) -> list[tuple[int, Path]]:
    named = files_named(output_dir, SHARD_NAME)
    return sorted((int(SHARD_NAME.fullmatch(p.name)[1]), p) for p in named)  # type: ignore[index]


def failure_journals(output_dir: Path) -> list[Path]:
    """failed.jsonl, and the journals of other writers that a killed run left (failed.K.jsonl)."""
    return sorted(files_named(output_dir, FAILED_JOURNAL), key=lambda p: natural_key(p.name))


def files_named(output_dir: Path, pattern: re.Pattern[str]) -> list[Path]:
    """The output dir's files whose names `pattern` matches, each a regular file (see ours).
    The folder's own listing says which are (no stat per file: a large job has 100,000s)."""
    with os.scandir(output_dir) as entries:
        found = [entry for entry in entries if pattern.fullmatch(entry.name)]
    for entry in found:
        if not entry.is_file():
            raise PipelineError(f"{entry.path} is not a regular file; {MOVE_IT_AWAY}")
    return [Path(entry.path) for entry in found]


def ours(path: Path) -> Path:
    """`path`, if absent or a regular file; a FIFO or folder by the name of one of our files
    (reading a FIFO would hang the run) stops it with one line instead."""
    if path.exists() and not path.is_file():  # (files_named says the same of many files at once)
        raise PipelineError(f"{path} is not a regular file; {MOVE_IT_AWAY}")
    return path


async def cut_at_zero(path: Path) -> None:
    """Cut an arrivals journal that a killed run left open (see ArrivalJournal) at the line
    holding its first zero byte: no line of ours holds one. After its lines come the zeros
    of its reserved space; and a copy cut short by the kill may have left holes of zeros
    anywhere in the lines it was copying (memcpy does not go in order), so those lines
    go too. Their prompts are asked again, like those of a torn line in a shard."""
    line_start = offset = 0
    async with aiofiles.open(path, "rb") as file:
        while chunk := await file.read(READ_CHUNK_BYTES):
            zero = chunk.find(b"\0")
            newline = chunk.rfind(b"\n", 0, zero if zero >= 0 else len(chunk))
            if newline >= 0:
                line_start = offset + newline + 1
            if zero >= 0:
                with stop_on_os_error(f"cannot repair {path}"):
                    os.truncate(path, line_start)
                return
            offset += len(chunk)


async def complete_lines(path: Path, opening: bytes) -> AsyncIterator[tuple[int, list[bytes]]]:
    """The lines of a file we append to, each of which starts with `opening`, in runs (see
    read_lines). A last line without its newline (the process died writing it) is removed
    from the file, not returned; but only if it is the start of such a line: a file
    someone else wrote is never cut (the caller refuses its complete lines, this its last)."""
    size = (await aiofiles.os.stat(path)).st_size
    end = 0
    async for first, lines in read_lines(path):
        end += sum(map(len, lines)) + len(lines)  # each line and its newline
        if end > size:  # the last line has none
            *lines, torn = lines
            if not (torn.startswith(opening) or opening.startswith(torn)):
                raise PipelineError(
                    f"{path}, line {first + len(lines)}, is not a line this pipeline wrote; {MOVE_IT_AWAY}"
                )
            log.warning("repairing %s: dropping its unfinished last line %d", path.name, first + len(lines))
            with stop_on_os_error(f"cannot repair {path}"):
                os.truncate(path, size - len(torn))
        if lines:
            yield first, lines


async def read_records(path: Path) -> AsyncIterator[tuple[list[tuple[str, str, str]], list[str]]]:
    """The records of a JSON Lines file we wrote, in runs: each record's (id, prompt, row
    digest), and its line. Repairs a torn last line. Only those three are decoded: they come
    first in every record (see RECORD), so the rest of the line is left as it is."""
    async for first, lines in complete_lines(path, Records.OPENING):
        try:
            texts = [line.decode() for line in lines]
            front = Records.front
            fronts = [front(text) for text in texts]
        except (ValueError, KeyError, TypeError):
            number = first + next(n for n, line in enumerate(lines) if not is_record(line))
            raise PipelineError(f"{path}, line {number}, is not a record this pipeline wrote; {MOVE_IT_AWAY}") from None
        yield fronts, texts


def is_record(line: bytes) -> bool:
    try:
        Records.front(line.decode())
    except (ValueError, KeyError, TypeError):
        return False
    return True


# ---------------------------------------------------------------- estimate --
@dataclass
class Estimate:
    """What --estimate found: the job's size in prompts and tokens, before anything is asked."""

    prompts: int = 0  # prompts that would be asked (rows that cannot be are left out)
    own_tokens: float = 0.0  # their own input tokens: the characters of all, scaled by the API's count of a sample
    prefix_tokens: int = 0  # the shared prefix each request sends (system instruction, context), as the API counts it
    sampled: int = 0  # prompts whose tokens the API counted
    # their files' tokens, estimated by type (and an image's by --media-resolution: see media_tokens)
    media_tokens: int = 0
    output_tokens: float = 0.0  # the answers' tokens: --max-output-tokens each, or as many as their prompt's own

    @property
    def input_tokens(self) -> float:
        return self.own_tokens + self.media_tokens + self.prompts * self.prefix_tokens


async def estimate(settings: Settings) -> Estimate:
    """--estimate: count the job's input tokens without a generateContent. Each prompt's
    characters are counted; up to ESTIMATE_SAMPLE - 1 distinct prompts, spread evenly over
    the inputs, are counted by the API's countTokens (free), and their ratio of tokens to
    characters scales the characters of all; the shared prefix is counted once."""
    job = Job.of(settings)
    files = await inputs_checked(await list_input_files(settings.input_dir))
    found, sample, chars = await sampled(settings, job, files)
    found.prefix_tokens, counts = await counted_by_the_api(settings, job, list(sample.values()))
    sampled_chars = sum(map(own_chars, sample.values()))
    found.sampled, found.own_tokens = len(sample), chars * sum(counts) / sampled_chars if sampled_chars else 0.0
    thinking = max(settings.thinking_budget or 0, 0)  # -1, the model's own choice: not known before
    if settings.max_output_tokens:
        found.output_tokens = found.prompts * settings.max_output_tokens
    else:
        found.output_tokens = found.own_tokens + found.prompts * thinking
    return found


async def sampled(settings: Settings, job: Job, files: list[Path]) -> tuple[Estimate, dict[str, Prompt], int]:
    """The job's prompts counted (and their characters), and the sample countTokens is asked
    for: distinct prompts spread evenly over the inputs (one count is the prefix's)."""
    every = max(1, -(-sum([await count_rows(path) for path in files]) // (ESTIMATE_SAMPLE - 1)))
    found, sample, chars = Estimate(), {}, 0
    async for prompt in sendable_prompts(files, job.maker):
        if found.prompts == (settings.limit or math.inf):
            break
        if found.prompts % every == 0 and len(sample) < ESTIMATE_SAMPLE - 1:
            sample.setdefault(prompt.text, prompt)
        found.prompts += 1
        chars += own_chars(prompt)
        found.media_tokens += media_tokens(prompt)
    return found, sample, chars


async def counted_by_the_api(settings: Settings, job: Job, sample: list[Prompt]) -> tuple[int, list[int]]:
    """countTokens of the shared prefix, and of each prompt of the sample."""
    client = connect(settings)
    try:
        outage = watch_host(settings, client, asyncio.Event())
        if not settings.offline:
            await outage.first_answer()  # a host never reached: one line
        api = Api.of(settings, client, Limits(Gate(None), outage, Concurrency(1)), Tally())
        prefix = await counted_tokens(api, settings.model, prefix_contents(job.context, job.generation))
        return prefix, await asyncio.gather(
            *(counted_tokens(api, settings.model, p.contents or p.text) for p in sample)
        )
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 (what the COUNT policy gave up on)
        raise PipelineError(f"--estimate: countTokens failed ({describe(exc, settings)})") from None
    finally:
        await client.aio.aclose()


async def sendable_prompts(files: list[Path], maker: PromptMaker) -> AsyncIterator[Prompt]:
    """The prompts of `files` that could be sent, the files they name read (for their
    pages and seconds: see media_units) as a run would; those that could not are left out."""
    media = Media(FilesFolder(maker.media_root), INLINE_LIMIT_MB)  # an estimate keeps nothing
    for path in files:
        with cannot_read(path):
            async for prompts in read_prompts(path, maker):
                for prompt in prompts:
                    if prompt.media and not prompt.error:
                        prompt = await media.resolve(prompt)
                    if not prompt.error:
                        yield prompt


def own_chars(prompt: Prompt) -> int:
    """The characters a prompt sends of its own (its turns' texts, or its text)."""
    return sum(map(len, turn_texts(prompt.contents) if prompt.contents else [prompt.text]))


def prefix_contents(context: list[dict[str, Any]], generation: dict[str, Any]) -> list[dict[str, Any]]:
    """What every request shares, as turns to count: the context, and the system instruction."""
    instruction = turn_texts([generation["systemInstruction"]]) if "systemInstruction" in generation else []
    return [*context, *map(user_turn, instruction)]


async def counted_tokens(api: Api, model: str, contents: str | list[Any]) -> int:
    """countTokens of `contents` (0 for none), retried with the COUNT policy."""
    if not contents:
        return 0
    counted = await api.retried(lambda _: api.client.aio.models.count_tokens(model=model, contents=contents), COUNT)
    return int(counted.total_tokens or 0)


def estimate_table(settings: Settings, found: Estimate) -> str:
    """--estimate's report: the job's tokens, then its cost at each price and its time."""
    price, minimum = price_of(settings.model), cache_minimum(settings.model)
    lines = [
        f"estimate for {settings.model}: {found.prompts:,} prompt{'' if found.prompts == 1 else 's'} (countTokens "
        f"asked for {found.sampled:,} of them, scaled to all)",
        f"  input tokens   {found.input_tokens:,.0f}, the shared prefix {found.prompts * found.prefix_tokens:,.0f} "
        f"of them ({found.prefix_tokens:,} a request; a cache needs {minimum:,})",
        f"  output tokens  {found.output_tokens:,.0f}: {output_assumed(settings)}",
    ]
    if price is None:
        return "\n".join([*lines, f"  cost           PRICES has no price for {settings.model}: add it to see one"])
    hours = estimated_hours(settings, found)
    standard = (found.input_tokens * price[0] + found.output_tokens * price[1]) / 1e6
    cached = (
        cached_cost(found, price, hours)
        if found.prefix_tokens >= minimum
        else "n/a: the shared prefix is under the minimum"
    )
    lines += [
        f"  standard       {dollars(standard)}",
        f"  flex           {dollars(standard * TIER_PRICES['flex'])}   (--service-tier flex: answers may take minutes)",
        f"  batch          {dollars(standard * BATCH_PRICE)}   (--batch: results within 24 h)",
        f"  with --cache   {cached}",
        f"  time           about {duration(hours * 3600)} at --workers {settings.workers}{limits_said(settings)}, at "
        f"{estimate_latency_s(settings):g} s an answer",
    ]
    return "\n".join(lines)


def output_assumed(settings: Settings) -> str:
    """How --estimate counts the answers' tokens, in words."""
    if settings.max_output_tokens:
        return f"{settings.max_output_tokens:,} each at most, thinking included (--max-output-tokens bounds both)"
    if (settings.thinking_budget or 0) > 0:
        return (
            f"assumed as many as each prompt's own, plus {settings.thinking_budget:,} of thinking each "
            "(--thinking-budget)"
        )
    return (
        "assumed as many as each prompt's own, thinking not counted "
        "(set --max-output-tokens for a bound: it includes thinking)"
    )


def cached_cost(found: Estimate, price: tuple[float, float, float, float], hours: float) -> str:
    """The standard price with the prefix read from an explicit cache, its storage for `hours`."""
    prefix = found.prompts * found.prefix_tokens
    usd = (
        found.own_tokens * price[0]
        + prefix * price[2]
        + found.output_tokens * price[1]
        + found.prefix_tokens * (price[0] + price[3] * hours)
    ) / 1e6
    return f"{dollars(usd)}   (the prefix at the cached price, plus {duration(hours * 3600)} of storage)"


def estimated_hours(settings: Settings, found: Estimate) -> float:
    """The longest of what --workers, --rpm and --tpm allow, in hours."""
    by_workers = found.prompts * estimate_latency_s(settings) / settings.workers
    by_rpm = found.prompts / settings.rpm * 60 if settings.rpm else 0.0
    by_tpm = found.input_tokens / settings.tpm * 60 if settings.tpm else 0.0
    return max(by_workers, by_rpm, by_tpm) / 3600


def estimate_latency_s(settings: Settings) -> float:
    return settings.offline_latency_ms / 1000 if settings.offline else ESTIMATE_LATENCY_S


def limits_said(settings: Settings) -> str:
    return "".join(f", --{name} {value:,g}" for name, value in (("rpm", settings.rpm), ("tpm", settings.tpm)) if value)


@dataclass(frozen=True)
class Shown:
    """What a Progress shows of an open run besides its Tally."""

    limits: Limits  # the spend and the time held (the Gate's), the host's state, the places in flight
    media: Media  # the files uploaded
    limit: Limit  # whether --limit stopped the readers before the job's end


# ---------------------------------------------------------------- progress --
class Progress:
    """What a person sees of the run: a bar on a terminal (log lines go above it), else a
    line every PROGRESS_EVERY_S; and the summary line at the end. It shows the Tally and,
    once the run is open (see open_run), what its parts know: the spend (the Gate's), the
    host's state (the Outage's) and the requests allowed in flight (the Concurrency's)."""

    def __init__(self, tally: Tally | None = None) -> None:
        self.tally = tally or Tally()  # what it shows
        self.bar: Any = None  # a tqdm bar when stderr is a terminal
        self.shown: Shown | None = None  # what it shows of the run besides the Tally, once the run is open

    def start(self, settings: Settings, shown: Shown) -> list[asyncio.Task[None]]:
        """Show the run: a bar, or progress lines; and the total, counted meanwhile, streaming."""
        self.shown = shown
        self.bar = progress_bar(settings, self.tally)
        if self.bar is not None:
            log.handlers[:] = [BarHandler(self.bar, log.handlers[0].formatter if log.handlers else None)]
        tasks = [] if self.bar is not None else [asyncio.create_task(self.report(settings.progress_every_s))]
        return [*tasks, asyncio.create_task(self.count_total(settings.input_dir, settings.limit))]

    async def report(self, every_s: float) -> None:
        """Where nobody watches a terminal (nohup, CI, a scheduler's log): a line every `every_s`."""
        while True:
            await asyncio.sleep(every_s)
            # then the run's one line is the error at the end
            if not (self.shown and self.shown.limits.outage.never_reached()):
                log.info("%s", self.line())

    async def count_total(self, input_dir: Path, limit: int | None) -> None:
        with contextlib.suppress(PipelineError, OSError):  # an input that cannot be read: the reader says so
            total = sum([await count_rows(path) for path in await list_input_files(input_dir)])
            self.tally.total = min(total, limit or total)
            if self.bar is not None:
                self.bar.total = self.tally.total
                self.bar.refresh()

    def written(self, outcomes: list[Response] | list[Failure]) -> None:
        """Outcomes now on disk: counted, and the bar moves."""
        self.tally.count(outcomes)
        if self.bar is not None and outcomes:
            if self.spend is not None or isinstance(outcomes[0], Failure):  # the spend moves with every answer
                self.bar.set_postfix_str(self.postfix(), refresh=False)
            self.bar.update(len(outcomes))

    def job(self, event: str, ends: str | None = None) -> None:
        """A batch job's event (see Tally.count_job), shown at once: jobs take minutes to hours."""
        self.tally.count_job(event, ends)
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix())
        else:
            log.info("%s; %d prompts written so far", self.jobs()[2:], self.tally.answered + self.tally.failed)

    def refresh(self) -> None:
        """Something the bar shows changed (an outage began, goes on or ended): shown now."""
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def spend(self) -> Spend | None:
        """The run's spend, when its model has a price."""
        spend = self.shown.limits.gate.spend if self.shown is not None else None
        return spend if spend is not None and spend.price is not None else None

    def postfix(self) -> str:
        """What the bar shows after its count: the spend, failures, batch jobs, uploads, the server's state."""
        parts = (
            self.cost(),
            f"{self.tally.failed} failed" if self.tally.failed else "",
            self.cut(),
            self.jobs()[2:],
            self.uploaded()[2:],
            *self.server_state(),
        )
        return "; ".join(part for part in parts if part)

    def server_state(self) -> tuple[str, str]:
        """An outage going on, and the requests in flight once the server has said it was full."""
        return (
            (self.shown.limits.outage.waiting(), self.shown.limits.concurrency.shown())
            if self.shown is not None
            else ("", "")
        )

    def cost(self) -> str:
        """The estimated spend so far, e.g. $0.42; nothing when the model has no price."""
        return dollars(self.spend.spent_usd) if self.spend is not None else ""

    def line(self) -> str:
        """E.g. 1200/5000 prompts (24%), 3 failed, 41.2/s, ETA 1m32s."""
        tally = self.tally
        done = tally.answered + tally.failed + tally.skipped
        rate = (tally.answered + tally.failed) / max(time.monotonic() - tally.started, 1e-9)
        spent = "".join(
            f", {part}" for part in (self.cost(), self.cut(), self.uploaded()[2:], *self.server_state()) if part
        )
        if tally.total is None:
            return f"{done}/? prompts, {tally.failed} failed, {rate:.1f}/s{spent}"
        eta = duration(max(tally.total - done, 0) / rate) if rate else "?"
        share = f"{100 * done // max(tally.total, 1)}%"
        return f"{done}/{tally.total} prompts ({share}), {tally.failed} failed, {rate:.1f}/s, ETA {eta}{spent}"

    def summary(self) -> str:
        tally, held_s = self.tally, self.shown.limits.gate.held_s if self.shown is not None else 0.0
        seconds = time.monotonic() - tally.started
        return (
            f"{tally.answered} answered, {tally.failed} failed{f', {self.cut()}' if tally.cut_short else ''}, "
            f"{tally.skipped} already done, {tally.retries} retries, "
            f"{tally.rate_limited} rate-limited, {held_s:.1f} s held by limits, "
            f"tokens {tally.prompt_tokens} in ({tally.cached_tokens} cached{self.hit_rate()}) / "
            f"{tally.response_tokens} out "
            f"+ {tally.thinking_tokens} thinking{f', {self.cost()} estimated' if self.cost() else ''}, "
            f"{self.pace(seconds)}{self.tiers()}{self.jobs()}{self.uploaded()}{self.network()}"
        )

    def cut(self) -> str:
        """The answers cut short at their budget, e.g. "20 cut short"; nothing if none."""
        return f"{self.tally.cut_short} cut short" if self.tally.cut_short else ""

    def pace(self, seconds: float) -> str:
        """How long it took, and how fast; a batch run's rate says nothing (Google answers within a day)."""
        tally = self.tally
        if not tally.jobs:
            return f"{seconds:.2f} s, {(tally.answered + tally.failed) / seconds if seconds > 0 else 0.0:.1f} prompts/s"
        again = f", {tally.resubmitted} results resubmitted" if tally.resubmitted else ""
        return f"{duration(seconds)} wall{again}"

    def hit_rate(self) -> str:
        """The share of input tokens read from a cache (explicit, or implicit: a repeated prefix), if any."""
        tally = self.tally
        return (
            f", {tally.cached_tokens / tally.prompt_tokens:.0%} of input"
            if tally.cached_tokens and tally.prompt_tokens
            else ""
        )

    def tiers(self) -> str:
        """The service tiers that served the answers, e.g. ", served 1,200 flex, 3 standard"."""
        served = ", ".join(f"{count:,} {tier}" for tier, count in self.tally.tiers.most_common())
        return f", served {served}" if served else ""

    def network(self) -> str:
        """Outages waited out, and the limit on requests in flight, if the server set one."""
        if self.shown is None:
            return ""
        outage, concurrency = self.shown.limits.outage, self.shown.limits.concurrency
        parts = [f"{outage.host} unreachable for {duration(outage.unreachable_s)}" if outage.unreachable_s else ""]
        if concurrency.refusals:
            parts.append(f"{concurrency.refusals} server-full answers, {concurrency.shown()} at the end")
        return "".join(f", {part}" for part in parts if part)

    def uploaded(self) -> str:
        """The files this run uploaded through the Files API, if any."""
        made = self.shown.media.made if self.shown is not None else 0
        return f", {plural(made, 'file')} uploaded" if made else ""

    def jobs(self) -> str:
        jobs = self.tally.jobs
        if not jobs:
            return ""
        resumed = f"{jobs['resumed']} resumed, " if jobs["resumed"] else ""
        return f", batch jobs: {resumed}{jobs['submitted']} submitted, {jobs['running']} running, {jobs['done']} done"


async def count_rows(path: Path) -> int:
    """How many prompts a file holds, for the progress display, without making them."""
    return await input_format(path).count(path)


class BarHandler(logging.Handler):
    """Log lines printed above the progress bar (tqdm.write), not through it."""

    def __init__(self, bar: Any, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.bar = bar
        self.setFormatter(formatter or RedactingFormatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.bar.write(self.format(record), file=sys.stderr)


def progress_bar(settings: Settings, tally: Tally) -> Any:
    """A live count on stderr when a person is watching (and -v is not printing events):
    done of the total (once counted) from where earlier runs stopped, rate, ETA, failures."""
    if settings.verbose or not sys.stderr.isatty() or not terminal_rows():
        return None  # where a bar cannot show (a pipe, a log file, a terminal of 0 rows): progress lines
    from tqdm import tqdm

    return tqdm(total=tally.total, initial=tally.skipped, unit=" prompts", file=sys.stderr, mininterval=0.2)


def terminal_rows() -> int:
    """The rows of stderr's terminal: 0 where it reports none (script, docker -t, ssh -tt
    from a script), where a bar would not show at all."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).lines
    except (OSError, ValueError):
        return 0


# ----------------------------------------------------------------- offline --
TWO_TIMES = re.compile(r"two times (-?\d+)", re.IGNORECASE)


class OfflineClient:
    """Stands in for genai.Client (client.aio.models.generate_content, client.aio.aclose)
    with deterministic answers and a simulated latency: no network, no key."""

    def __init__(self, latency_s: float, model: str, timeout_s: float = math.inf) -> None:
        self.latency_s = latency_s
        self.model = f"{model} (offline)"
        self.timeout_s = timeout_s  # a latency above it times out, as a real request would
        self.aio = SimpleNamespace(models=self, files=OfflineFiles(), aclose=self.aclose)

    async def generate_content(self, model: str, contents: str | list[Any], config: Any = None) -> Any:
        """Settings are ignored, but for JSON: asked for it, the answer has the schema's shape."""
        if self.latency_s:
            await asyncio.sleep(min(self.latency_s, self.timeout_s))
            if self.latency_s > self.timeout_s:
                raise TimeoutError
        prompt = contents if isinstance(contents, str) else last_user_text(contents)
        match = TWO_TIMES.search(prompt)
        text = f"Two times {match[1]} is {2 * int(match[1])}." if match else f"You said: {prompt}"
        if files := [] if isinstance(contents, str) else files_sent(contents[-1]):
            text += f" ({plural(len(files), 'file')}: {', '.join(files)})"
        if config is not None and config.response_mime_type == "application/json":
            text = JSON_ENCODER.encode(shaped_like(config.response_json_schema or {"required": ["answer"]}, text))
        usage = SimpleNamespace(
            prompt_token_count=len(prompt.split()),
            candidates_token_count=len(text.split()),
            thoughts_token_count=None,
            cached_content_token_count=None,
        )
        tier = enum_text(getattr(config, "service_tier", None))  # served as asked, as the API's header says
        return SimpleNamespace(
            text=text,
            candidates=[SimpleNamespace(finish_reason="STOP")],
            usage_metadata=usage,
            model_version=self.model,
            prompt_feedback=None,
            sdk_http_response=SimpleNamespace(headers={"x-gemini-service-tier": tier} if tier else {}),
        )

    async def count_tokens(self, model: str, contents: str | list[Any], config: Any = None) -> Any:
        """The offline model's count: characters / CHARS_PER_TOKEN."""
        return SimpleNamespace(
            total_tokens=text_tokens([contents] if isinstance(contents, str) else turn_texts(contents))
        )

    async def aclose(self) -> None:
        pass


class OfflineFiles:
    """Stands in for the Files API (client.aio.files): uploads kept as names, in memory."""

    def __init__(self) -> None:
        self.made: dict[str, Any] = {}  # by name

    async def upload(self, file: Path, config: dict[str, Any]) -> Any:
        name = f"files/offline-{len(self.made) + 1}"
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=48)
        self.made[name] = SimpleNamespace(
            name=name,
            uri=f"offline:{name}",
            display_name=config["display_name"],
            state="ACTIVE",
            expiration_time=expires,
        )
        return self.made[name]

    async def get(self, name: str) -> Any:
        return self.made[name]

    async def list(self, config: Any = None) -> AsyncIterator[Any]:
        return self.listed()

    async def listed(self) -> AsyncIterator[Any]:
        for made in list(self.made.values()):
            yield made

    async def delete(self, name: str) -> None:
        self.made.pop(name, None)


def files_sent(turn: dict[str, Any]) -> list[str]:
    """The files in a turn, as the offline model describes them: type and size, or type and URI."""
    said = []
    for part in turn.get("parts") or []:
        if "inline_data" in part:
            said.append(f"{part['inline_data']['mime_type']} of {len(part['inline_data']['data'])} bytes")
        elif "file_data" in part:
            said.append(f"{part['file_data']['mime_type']} at {part['file_data']['file_uri']}")
    return said


def shaped_like(schema: Any, text: str) -> Any:
    """A simulated answer of a JSON Schema's shape: an enum's value picked by the text,
    `text` for strings, its word count for numbers. Constraints beyond that are ignored."""
    if not isinstance(schema, dict):
        return text
    if schema.get("enum"):
        return schema["enum"][sum(map(ord, text)) % len(schema["enum"])]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "object" or "properties" in schema or "required" in schema:
        properties = schema.get("properties") or {}
        names = [*properties, *(name for name in schema.get("required", []) if name not in properties)]
        return {name: shaped_like(properties.get(name), text) for name in names}
    if kind == "array":
        return [shaped_like(schema.get("items"), text)]
    return {"integer": len(text.split()), "number": len(text.split()), "boolean": True, "null": None}.get(kind, text)


# --------------------------------------------------------------------- CLI --
class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line, not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every flag ("unset" for None, which cannot be passed); the epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None and action.help:
            return f"{action.help} (default: unset)"
        return super()._get_help_string(action)


HELP_EPILOG = """\
environment:
  GEMINI_API_KEY          your Gemini API key (GOOGLE_API_KEY is read too)
  GOOGLE_GEMINI_BASE_URL  another API endpoint, e.g. a proxy (read by google-genai)
  GOOGLE_GENAI_USE_VERTEXAI=true  use Vertex AI, with GOOGLE_CLOUD_PROJECT,
                          GOOGLE_CLOUD_LOCATION and Application Default Credentials
                          (GOOGLE_APPLICATION_CREDENTIALS, or gcloud's); with an API
                          key instead, Vertex AI express mode
inputs:
  *.jsonl  a request per line: {"prompt": ..., "id": ..., "system_instruction": ...,
           "config": {...}, "files": [...], other fields...}, or the Batch API's {"key", "request"}
  *.csv    a header naming a prompt column (and optionally id, system_instruction,
  *.tsv    files: names separated by |), comma- or tab-separated, as Excel writes them
  *.parquet  a JSONL row's columns, read a record batch at a time (needs: pip install pyarrow)
  others   a prompt per non-blank line, known as "<file name>:<line number>"
           (images, PDFs, audio and video are not: rows name them, relative to INPUT_DIR)
output:
  OUTPUT_DIR/shard_NNNNN.jsonl  one answer per line
  OUTPUT_DIR/failed.jsonl       prompts that failed for good
  OUTPUT_DIR/batch_jobs.jsonl   --batch: the jobs submitted, and their prompts
  OUTPUT_DIR/uploads.jsonl      files rows named that went through the Files API, for reruns
  OUTPUT_DIR/file_digests.jsonl the hash of each file rows named, by path, size and mtime
  OUTPUT_DIR/job.json           the model and settings the folder's answers were asked with
records: these fields in order, then the row's other fields (and postprocess()'s)
  a shard's:        {answer_fields}
  failed.jsonl's:   {failure_fields}
{field_meanings}
exit status:
  0 every prompt answered (or nothing to do)
  1 some prompts failed, the daily quota or --max-cost-usd is spent, the API's
    host was unreachable past --outage-limit-s, or an internal error: what was
    answered is kept; run again to continue
  2 refused at start-up, nothing sent: bad flag, setting, input folder, CSV
    header, output dir or key, or a host never reached in 25 s. Or stopped mid-run, keeping every answer, by
    what no retry fixes: an id given twice, inputs edited since their
    answers, a setting or model the API refuses for every prompt, the same
    refusal for the first 20 prompts, a full disk or other file error
  130 interrupted by Ctrl-C   143 stopped by SIGTERM (both: run again to continue)"""


def help_epilog() -> str:
    """HELP_EPILOG with the output records' fields (see RECORD) filled in."""
    meanings = "\n".join(f"    {field.name:<14} {field.meaning}" for field in RECORD)
    filled = {
        "{answer_fields}": record_help(ANSWER_FIELDS),
        "{failure_fields}": record_help(FAILURE_FIELDS),
        "{field_meanings}": meanings,
    }
    text = HELP_EPILOG
    for slot, value in filled.items():
        text = text.replace(slot, value)
    return text


def parse_args(argv: list[str] | None) -> Settings:
    """The settings block's constants (each as its flag's default, checked like a value given
    there), as overridden by `argv`; and the flags that are no setting: --offline, -v."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=help_epilog(), formatter_class=HelpFormatter)
    for setting in SETTINGS:
        p.add_argument(setting.flag, help=setting.help.replace("%", "%%"), **flag_reading(setting, p))
    p.add_argument("--offline", action="store_true", help="use a built-in simulated model: no network, no key")
    p.add_argument("-v", "--verbose", action="store_true", help="log every enqueue, answer, retry and write")
    p.add_argument("--version", action="version", version=f"pipeline.py {__version__}")
    a = p.parse_args(argv)
    if a.batch and a.offline:
        p.error("argument --batch: not with --offline (the Batch API has no offline stand-in)")
    if a.retry_max_s < a.retry_base_s:
        p.error(f"argument --retry-max-s: must be at least --retry-base-s ({a.retry_base_s:g})")
    if a.max_cost_usd is not None and (a.offline or a.batch):
        p.error(
            f"argument --max-cost-usd: not with "
            f"{'--offline (nothing is billed)' if a.offline else '--batch (a job is billed as a whole)'}"
        )
    if a.max_cost_usd is not None and price_of(a.model) is None:
        p.error(
            f"argument --max-cost-usd: PRICES (near the top of pipeline.py) has no price for --model {a.model}: add it"
        )
    return Settings(**vars(a))


def flag_reading(setting: Setting, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """How its flag reads a setting: a switch takes no value; any other reads one with its
    kind's check, and defaults to the constant, checked the same way (an edit gone wrong
    gets the same one-line error as a bad flag)."""
    if setting.check.read is bool:
        return {"action": "store_true", "default": setting.value()}
    try:
        default = setting.value()
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{setting.constant} = {globals()[setting.constant]!r} at the top of pipeline.py: {exc}")
    return {"type": setting.check.read, "metavar": setting.check.metavar, "default": default} | (
        {"nargs": "+"} if setting.check.many else {}
    )


def check_setup(settings: Settings) -> None:
    """Fail fast, before any request, on what would stop the run later anyway."""
    if not settings.input_dir.is_dir():
        raise PipelineError(f"input dir {settings.input_dir} does not exist or is not a folder (see --input-dir)")
    if settings.output_dir.resolve() == settings.input_dir.resolve():  # every rerun would read the shards as prompts
        raise PipelineError(f"--output-dir {settings.output_dir} is the input dir: choose another folder")
    if not settings.offline:
        check_credentials(settings)
    if settings.batch and settings.service_tier:
        raise PipelineError("--service-tier does not apply to --batch: the Batch API has a price of its own (half)")
    # the API refuses a request with both
    if settings.thinking_budget is not None and settings.thinking_level is not None:
        raise PipelineError(
            "--thinking-budget and --thinking-level: set one (--thinking-level for Gemini 3, --thinking-budget for 2.5)"
        )
    Job.of(settings)  # a misspelt setting stops the run here
    if settings.estimate:
        return  # it writes nothing
    if settings.cache and settings.offline:
        raise PipelineError(
            "--cache needs the API: the offline model keeps no caches (leave out --cache, or --offline)"
        )
    if settings.cache and not (settings.context or settings.system_instruction or settings.generation_config):
        raise PipelineError("--cache: nothing to cache: give --context files or --system-instruction")
    if settings.output_dir.exists() and not os.access(settings.output_dir, os.W_OK | os.X_OK):
        raise PipelineError(f"output dir {settings.output_dir} is not writable (see --output-dir)")


def made_output_dir(output_dir: Path) -> Path:
    """OUTPUT_DIR, made if missing: only once the run is sure to start (the host answered),
    so that a refused start leaves no folder behind."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot create output dir {output_dir}: {exc.strerror or exc}") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise PipelineError(f"output dir {output_dir} is not writable (see --output-dir)")
    return output_dir


@contextlib.contextmanager
def output_dir_locked(output_dir: Path) -> Iterator[None]:
    """One run per output folder: two would answer the same prompts, pay twice and write
    them twice. An advisory flock, which the kernel releases when the process dies
    (kill -9 included), so no stale lock is ever left; the file keeps the holder's pid."""
    with stop_on_os_error(f"cannot lock {output_dir}"):
        fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode(errors="replace").strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise PipelineError(
                f"another run is using {output_dir}{pid}: wait for it to end, or choose another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # never unlinked: a run waiting on this inode would lock a file nobody else sees


def configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(relativeCreated)9.1f ms  %(message)s" if verbose else "%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)  # INFO: --batch's progress
    log.propagate = False


def cli(argv: list[str] | None = None) -> int:
    """Run from the command line; returns the exit status."""
    settings = parse_args(argv)
    configure_logging(settings.verbose)
    try:
        check_setup(settings)
        if settings.estimate:
            return printed(estimate_table(settings, asyncio.run(estimate(settings))))
    except PipelineError as exc:
        print(redact(f"error: {exc}"), file=sys.stderr)
        return exc.exit_code
    return run_and_report(settings)


def printed(report: str) -> int:
    """Print `report` to stdout: 0; or 1, quietly, if stdout was closed (piped into `head`)."""
    try:
        print(report, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left for the exit's flush to fail on
        return 1
    return 0


def run_and_report(settings: Settings) -> int:
    """Run the job; the summary line, one line saying how it ended, and the exit status."""
    progress = Progress()
    tally = progress.tally
    try:
        asyncio.run(main(settings, progress))
    except StopForNow as exc:
        return finish(
            progress, f"stopped after {plural(tally.answered + tally.skipped, 'prompt')} done: {exc}", exc.exit_code
        )
    except PipelineError as exc:
        return finish(progress, f"error: {exc}", exc.exit_code)
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        stopped_by = stage_error(exc)  # a signal came while the run was shutting down after this
        jobs = tally.jobs_unfinished
        running = f"{plural(jobs, 'batch job')} still on Google's side; " if jobs else ""
        status = 143 if "SIGTERM" in exc.args else 130  # 128 + the signal's number, as shells and schedulers expect
        interrupted = f"interrupted: {running}run the same command again to continue where it stopped"
        return finish(progress, f"error: {stopped_by}\n{interrupted}" if stopped_by else interrupted, status)
    except Exception as exc:  # a bug: still one line, and the details with -v
        log.debug("internal error", exc_info=True)
        return finish(progress, f"internal error: {type(exc).__name__}: {exc} (rerun with -v for details)", 1)
    return finish(progress, *how_it_ended(settings, progress))


def how_it_ended(settings: Settings, progress: Progress) -> tuple[str, int]:
    """The last line of a run that ran to its end, and its exit status."""
    tally, spend = progress.tally, progress.spend
    if spend is not None and spend.exhausted:
        return (
            f"stopped after {plural(tally.answered, 'prompt')}: the budget of ${settings.max_cost_usd:g} is spent "
            f"({dollars(spend.spent_usd)}): run the same command again with a larger --max-cost-usd to continue",
            1,
        )
    left_alone = (
        f"; {plural(tally.left_alone, 'prompt')} refused for good before {'was' if tally.left_alone == 1 else 'were'} "
        "not asked again (--retry-failed asks them)"
        if tally.left_alone
        else ""
    )
    cut_left = (
        f"; {plural(tally.cut_left, 'prompt')} cut short before at this budget "
        f"{'was' if tally.cut_left == 1 else 'were'} "
        "not asked again (a larger --max-output-tokens asks them)"
        if tally.cut_left
        else ""
    )
    if tally.failed or tally.left_alone or tally.cut_left:
        failed = f"{plural(tally.failed, 'prompt')} failed" if tally.failed else "nothing failed this time"
        return f"{failed}: see {settings.output_dir / FAILED_FILE}{left_alone}{cut_left}", 1
    if tally.answered + tally.failed == 0:
        done_before = (
            f"all {plural(tally.skipped, 'prompt')} {'was' if tally.skipped == 1 else 'were'} answered before"
            if tally.skipped
            else "no prompts"
        )
        return f"nothing to do: {done_before} in {settings.input_dir}", 0
    if progress.shown is not None and progress.shown.limit.reached:
        return (
            f"done: the job's first {plural(settings.limit, 'prompt')} (--limit) answered in {settings.output_dir}; "
            f"the same command without --limit asks the rest",
            0,
        )
    return f"done: answers in {settings.output_dir}", 0


def stage_error(exc: BaseException) -> PipelineError | None:
    """The error that was ending the run when `exc` interrupted its shutdown, if one was."""
    while (exc := exc.__context__) is not None:  # type: ignore[assignment]
        if isinstance(exc, PipelineError):
            return exc
    return None


def finish(progress: Progress, message: str, exit_code: int) -> int:
    """The summary line (unless nothing was even tried: then it says nothing), and how it ended."""
    progress.close()
    tally = progress.tally
    if tally.answered + tally.failed + tally.skipped + tally.retries or tally.jobs or exit_code == 0:
        print(progress.summary(), file=sys.stderr)
    print(redact(message), file=sys.stderr)
    return exit_code


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


if __name__ == "__main__":
    status = cli()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written, synced and closed by now: skip the interpreter's teardown of
    # every object the run made (with thousands of workers, up to half a second after Ctrl-C).
    os._exit(status)
