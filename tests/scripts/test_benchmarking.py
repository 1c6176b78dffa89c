"""``scripts/benchmarking.py``: the header, timing and table helpers every benchmark script shares."""

import os
import re
import time

import benchmarking


def test_header_names_the_date_the_machine_the_details_and_the_command():
    line = benchmarking.header("/somewhere/scripts/bench_demo.py", ["--data", "my images", "--steps", "2"],
                               "resnet18 224px", "")
    fields = line.split(" | ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", fields[0])
    assert "cores" in fields[1] and "torch " in fields[1] and "threads" in fields[1]
    if hasattr(os, "getloadavg"):  # a busy machine's figures mislead: the load is in the header
        assert re.search(r"load average [\d.]+, [\d.]+, [\d.]+ at start", fields[1])
    assert fields[2:] == ["resnet18 224px", "`python scripts/bench_demo.py --data 'my images' --steps 2`"]


def test_command_without_arguments_has_no_trailing_space():
    assert benchmarking.command("bench_demo.py", []) == "`python scripts/bench_demo.py`"


def test_table_header_aligns_names_left_and_figures_right():
    assert benchmarking.table_header("data", "step", "seconds", left=2).splitlines() == [
        "| data | step | seconds |", "| --- | --- | ---: |"]
    assert benchmarking.table_row("bare", 12.5, "1.00") == "| bare | 12.5 | 1.00 |"


def test_interleaved_takes_turns_and_summarises_each_contender():
    calls = []
    measures = {"a": lambda: calls.append("a") or float(len(calls)),
                "b": lambda: calls.append("b") or float(len(calls))}
    assert benchmarking.interleaved(measures, 3, summary=min) == {"a": 1.0, "b": 2.0}
    assert calls == ["a", "b"] * 3


def test_seconds_per_call_runs_the_warm_up_untimed():
    calls = []
    seconds = benchmarking.seconds_per_call(lambda: calls.append(1), calls=4, warmup=2)
    assert len(calls) == 6 and 0 <= seconds < 1


def test_timed_and_stopwatch():
    assert benchmarking.timed(sum, [1, 2, 3])[0] == 6
    with benchmarking.Stopwatch() as watch:
        time.sleep(0.01)
    taken = watch.seconds
    time.sleep(0.01)
    assert watch.seconds == taken >= 0.01  # frozen at the block's end
