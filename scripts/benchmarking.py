"""What every benchmark in ``scripts/`` prints around its figures: the machine it ran on, the
timing, and the Markdown table.

    import benchmarking

    print(benchmarking.header(__file__, argv, "resnet18 224px, batch 64"))
    seconds = benchmarking.seconds_per_call(lambda: model(images), calls=20, warmup=2)
    print(benchmarking.table_header("loop", "images/s", "vs bare"))
    print(benchmarking.table_row("bare", f"{64 / seconds:.0f}", "1.00"))

The scripts run as ``python scripts/NAME.py`` (their folder is on ``sys.path``, so this module
imports as a plain ``import benchmarking``); the tests add ``scripts`` to ``sys.path`` through
pytest's ``pythonpath`` setting.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ssl_pretrain.engine.hardware import cpu_name, describe_cpu


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages now (None where the system has none: Windows)."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


LOAD_AT_START = load_average()
"""The 1, 5 and 15-minute load averages when the script imported this module (its first lines):
other work on the machine before the benchmark added its own. A busy machine's figures mislead."""


# ---------------------------------------------------------------------------------------------
# the machine


def machine() -> str:
    """The machine in one line: CPU model, usable cores (of all), memory, instruction set and bf16
    (oneDNN's cap included), torch and its threads, and the load average at the start."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = os.cpu_count()
    parts = [f"{cpu_name()}, {cores} cores" + (f" (of {total})" if total and total != cores else "")]
    try:
        parts.append(f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")
    except (AttributeError, ValueError, OSError):
        pass
    parts.append(describe_cpu())
    parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    if LOAD_AT_START is not None:
        parts.append("load average " + ", ".join(f"{value:.1f}" for value in LOAD_AT_START) + " at start")
    return ", ".join(parts)


def command(script: str, argv: list[str] | None = None) -> str:
    """The command as one would type it again: ```python scripts/NAME.py ARGS``` (``argv``: the
    arguments ``main`` was given; None: the process's own)."""
    words = ["python", f"scripts/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)]
    return f"`{shlex.join(words)}`"


def header(script: str, argv: list[str] | None, *details: str) -> str:
    """The line that opens a benchmark's table: date and time | machine | ``details`` | command.

    Args:
        script: the benchmark's ``__file__``.
        argv: the arguments its ``main`` was given (None: ``sys.argv[1:]``).
        details: what the run measured (model, batch, sizes), each its own ``|`` field.
    """
    return " | ".join([f"{datetime.now():%Y-%m-%d %H:%M}", machine(), *filter(None, details), command(script, argv)])


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the script's docstring as written (usage lines kept)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_settings(parser: argparse.ArgumentParser, help: str = "a preset setting, repeatable") -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, as ``ssl-pretrain --set`` takes them."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


# ---------------------------------------------------------------------------------------------
# timing


def timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(function(*args, **kwargs), wall-clock seconds it took)``."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


class Stopwatch:
    """The time of a block: ``with Stopwatch() as watch: ...``, then ``watch.seconds`` (read inside
    the block, the time so far)."""

    def __enter__(self) -> Stopwatch:
        self.started, self.stopped = time.perf_counter(), None
        return self

    def __exit__(self, *exception: object) -> None:
        self.stopped = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.stopped or time.perf_counter()) - self.started


def seconds_per_call(run: Callable[[], Any], calls: int = 1, warmup: int = 0) -> float:
    """Wall-clock seconds per call of ``run()``, over ``calls`` calls after ``warmup`` untimed ones
    (the first calls pay for allocation, caches and kernel choice)."""
    for _ in range(warmup):
        run()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - started) / calls


def interleaved(measures: dict[str, Callable[[], float]], rounds: int,
                summary: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Each measure taken ``rounds`` times, the contenders taking turns round after round, so a
    change in the machine's speed (a shared host's neighbours) meets all of them; returns
    ``summary`` (median, ``min`` for the best time, ``max`` for the best rate) of each one's rounds."""
    taken: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            taken[name].append(measure())
    return {name: summary(values) for name, values in taken.items()}


# ---------------------------------------------------------------------------------------------
# tables


def table_header(*columns: str, left: int = 1) -> str:
    """A Markdown table's header and rule: the first ``left`` columns left-aligned (names), the
    rest right-aligned (figures)."""
    rule = ["---" if index < left else "---:" for index in range(len(columns))]
    return table_row(*columns) + "\n" + table_row(*rule)


def table_row(*cells: Any) -> str:
    """One Markdown row, ``| a | b |``, of cells already formatted (anything else goes through ``str``)."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
