"""The Python benchmark of epx (bench/bench.py is its command line; `bench.py report` reads a
record).

    routing.py  every rank's top-k routing, what one rank sends and receives under it, and
                the oracle: what every epx op must return, computed with torch (`check`)
    cases.py    the configurations' inputs and what each timed op does (epx and NCCL)
    low_latency.py  the low-latency ops: their samples, bytes and check
    timing.py   events, warm-up, barrier, medians, CUDA-graph replays, input rotation
    sweep.py    the per-rank worker: buffers, the sweep over configurations, the records
    report.py   the JSON record, the stdout table and the markdown table; ncu stall summaries
    plot.py     the PNG beside the JSON

Only report.py and plot.py are imported without PyTorch (they read a finished record).
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def say(*parts):
    print(*parts, flush=True)


def describe_error(error):
    """An exception in one line, short enough for a note."""
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) < 400 else text[:400] + " ..."
