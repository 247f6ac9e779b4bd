"""How long this machine stalls a thread that runs none of our code: a floor under loop lag.

One thread reads the clock in a tight loop for ``--seconds`` and records
every gap of more than ``--gap-ms`` between two adjacent reads, with the
CPU time the thread was charged from the read before the gap (the CPU time
is read every 4,096 clock reads, well under a millisecond apart, and after
each gap). The loop allocates nothing the collector tracks and makes no
other system call (the clock is read in the vDSO), so a gap is the
machine's: either the thread was descheduled (its CPU time stands still),
or something below the scheduler held the CPU, such as the host stopping
the virtual CPU or interrupt handling, while the thread was charged for it
(its CPU time advances with the gap). No library code runs, and none is
imported (hence no ``_measure`` helpers here).

* ``worst_gap_ms`` and ``worst_gap_cpu_ms``: the longest gap and the CPU
  time charged over it;
* ``gaps_over_20ms`` and ``gaps_over_20ms_per_minute``: gaps that alone
  would miss ``max_loop_lag_ms <= 20`` (the target of
  ``benchmarks/throughput.py``);
* ``gaps``: the longest ten, as ``[second, gap_ms, cpu_ms]``.

Run it with nothing else running, to read it beside the loop-lag figures.

Usage: ``python benchmarks/machine_stalls.py [--seconds S] [--gap-ms MS] [--json]``
(other arguments, such as those ``nox -s bench`` passes to every script, are ignored)
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from _report import print_result


def spin(seconds: float, gap: float) -> tuple[int, list[tuple[float, float, float]]]:
    """Read the clock until ``seconds`` pass; return the reads and the gaps over ``gap``."""
    clock, cpu = time.perf_counter, time.thread_time
    start = previous = clock()
    previous_cpu = cpu()
    end = start + seconds
    reads = 0
    gaps: list[tuple[float, float, float]] = []
    while previous < end:
        now = clock()
        reads += 1
        if now - previous > gap:
            charged = cpu()
            gaps.append((now - start, now - previous, charged - previous_cpu))
            previous_cpu = charged
        elif not reads & 0xFFF:
            # Keep the CPU reading recent without a second call on every read.
            previous_cpu = cpu()
        previous = now
    return reads, gaps


def measure(args: argparse.Namespace) -> dict[str, Any]:
    reads, gaps = spin(args.seconds, args.gap_ms / 1000)
    longest = sorted(gaps, key=lambda gap: gap[1], reverse=True)
    over_20 = sum(1 for _, length, _ in gaps if length > 0.020)
    worst = longest[0] if longest else (0.0, 0.0, 0.0)
    return {
        "seconds": args.seconds,
        "reads_per_s": round(reads / args.seconds),
        "gaps_over_threshold": len(gaps),
        "worst_gap_ms": round(worst[1] * 1000, 2),
        "worst_gap_cpu_ms": round(worst[2] * 1000, 2),
        "gaps_over_20ms": over_20,
        "gaps_over_20ms_per_minute": round(over_20 / args.seconds * 60, 2),
        "gaps": [
            [round(at, 2), round(length * 1000, 2), round(charged * 1000, 2)]
            for at, length, charged in longest[:10]
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--gap-ms", type=float, default=3.0, help="record gaps longer than this")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, _ = parser.parse_known_args()
    print_result(measure(args), as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
