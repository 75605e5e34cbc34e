"""CPU accounting during a run: the target's processes, ours as a whole, and everything else on the machine.

On a shared 2-core machine a test suite started by someone else halves the figures; the benchmark cannot stop
it, but it can see it. "Other load" is the machine's busy time that none of our processes (the fleet, wrk,
the orchestrator) used, as a share of all cores; a run that saw much of it is flagged in the report.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _machine_busy() -> int:
    """Busy jiffies of all CPUs together (everything but idle and iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def _groups_cpu(groups: set[int]) -> dict[int, int]:
    """utime + stime of every live process, by process group, for the groups asked for."""
    by_group: dict[int, int] = dict.fromkeys(groups, 0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        group = int(fields[2])
        if group in by_group:
            by_group[group] += int(fields[11]) + int(fields[12])
    return by_group


def _own_seconds() -> float:
    """This process and its reaped children (the wrk runs that already ended)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class CpuShare:
    target: float  # the target's processes, in cores (1.0 = one core busy all the time)
    other: float  # the rest of the machine's busy time not ours, as a share of all cores (0..1)


class CpuMeter:
    """Start before a run and `stop()` after: what the target used, and what others used meanwhile."""

    def __init__(self, target_groups: Iterable[int], fleet_groups: Iterable[int]) -> None:
        self._target = set(target_groups)
        self._ours = set(fleet_groups) | self._target
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, int, dict[int, int], float]:
        return time.monotonic(), _machine_busy(), _groups_cpu(self._ours), _own_seconds()

    def stop(self) -> CpuShare:
        now, busy, groups, own = self._snapshot()
        then, busy0, groups0, own0 = self._start
        wall = max(1e-3, now - then) * TICKS  # in clock ticks, like every other figure here
        target = sum(max(0, groups[g] - groups0.get(g, 0)) for g in self._target)
        ours = sum(max(0, groups[g] - groups0.get(g, 0)) for g in self._ours) + (own - own0) * TICKS
        cores = os.cpu_count() or 1
        return CpuShare(
            target=target / wall, other=min(1.0, max(0.0, (busy - busy0 - ours) / (wall * cores)))
        )
