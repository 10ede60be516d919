"""Where a loaded host's idle CPU time goes: read `perf script` output of the scheduler's
switch and wake-up events and print, over the recorded window,

- the share of the CPUs' time spent idle;
- the share spent idle while a thread already woken waited on another, busy CPU (the
  scheduler queued it there and nothing moved it to the idle one): CPU time the load
  could have used;
- each thread's wake-up-to-run latency (p50, mean, p90).

Record with (as root; -a: every CPU, so that idle time is seen):

    perf record -e sched:sched_switch,sched:sched_wakeup -a -o sched.data -- sleep 0.5
    perf script -i sched.data -F comm,tid,cpu,time,event,trace | python3 scripts/sched_idle.py

README, Benchmarks, gives what it showed for `make bench-overhead`'s setup.
"""

import re
import sys
from collections import defaultdict

EVENT = re.compile(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)")
SWITCH_TO = re.compile(r"next_comm=(.+?) next_pid=(\d+)")
WAKEUP = re.compile(r"comm=(.+?) pid=(\d+) .*target_cpu=(\d+)")


def parse(lines):
    """(time, cpu, kind, pid, target cpu, name) per event, in time order."""
    events = []
    for line in lines:
        m = EVENT.match(line)
        if not m:
            continue
        _, _, cpu, t, kind, rest = m.groups()
        if kind == "sched_switch" and (s := SWITCH_TO.search(rest)):
            events.append((float(t), int(cpu), "run", int(s.group(2)), int(cpu), s.group(1)))
        elif kind == "sched_wakeup" and (w := WAKEUP.search(rest)):
            events.append((float(t), int(cpu), "wake", int(w.group(2)), int(w.group(3)), w.group(1)))
    events.sort()
    return events


def analyse(events):
    cpus = sorted({e[1] for e in events} | {e[4] for e in events})
    running = dict.fromkeys(cpus, 0)  # pid 0: the CPU is idle
    waiting = {}  # woken pid -> (since, cpu it was queued on)
    names, latency = {}, defaultdict(list)
    idle_time = stranded = 0.0  # in CPU-seconds
    last = events[0][0]
    for t, cpu, kind, pid, target, name in events:
        dt, last = t - last, t
        idle = sum(1 for c in cpus if running[c] == 0)
        queued_on_busy = sum(1 for _, c in waiting.values() if running[c] != 0)
        idle_time += dt * idle
        stranded += dt * min(idle, queued_on_busy)
        names[pid] = name
        if kind == "wake":
            waiting[pid] = (t, target)
        else:
            running[cpu] = pid
            if pid in waiting:
                latency[pid].append(t - waiting.pop(pid)[0])
    window = events[-1][0] - events[0][0]
    return window, len(cpus), idle_time, stranded, names, latency


def main():
    events = parse(sys.stdin)
    if len(events) < 2:
        sys.exit("sched_idle: no sched_switch/sched_wakeup events on stdin")
    window, ncpu, idle_time, stranded, names, latency = analyse(events)
    capacity = window * ncpu
    print(f"window {window * 1e3:.1f} ms on {ncpu} CPUs")
    print(f"CPU time idle: {100 * idle_time / capacity:.1f}%")
    print(f"  while a woken thread waited on a busy CPU: {100 * stranded / capacity:.1f}%")
    print("wake-up to run, per thread (us):")
    rows = sorted(latency.items(), key=lambda kv: -len(kv[1]))
    for pid, waits in rows[:8]:
        waits.sort()
        n = len(waits)
        p50, p90, mean = waits[n // 2], waits[int(n * 0.9)], sum(waits) / n
        print(f"  {names[pid]:18s} n={n:6d} p50={p50 * 1e6:5.0f} mean={mean * 1e6:5.0f} p90={p90 * 1e6:5.0f}")


if __name__ == "__main__":
    main()
