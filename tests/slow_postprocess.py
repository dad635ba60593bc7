"""python tests/slow_postprocess.py ARGS...: pipeline.py, but with a postprocess() that takes
6 ms of CPU an answer, so that its pool of processes starts (a quick one runs on the event loop,
see PostProcessor). The tests that kill a run or stop it with a signal use it, to see the
pool go with it."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline


def slow_postprocess(prompt: str, response: str) -> dict[str, Any]:
    busy_until = time.thread_time() + 0.006  # more CPU than pipeline.INLINE_MAX_S
    while time.thread_time() < busy_until:
        pass
    return pipeline.postprocess(prompt, response)


def parse_args(argv: list[str] | None, parse: Any = pipeline.parse_args) -> Any:
    return dataclasses.replace(parse(argv), postprocess=slow_postprocess)


if __name__ == "__main__":
    pipeline.parse_args = parse_args
    status = pipeline.cli()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
