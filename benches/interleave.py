#!/usr/bin/env python3
"""Times commands in alternation, round by round, and prints medians.

    interleave.py RUNS PREPARE LABEL=CMD...

The machine these benches run on is shared: for minutes at a time its
system time can double. hyperfine times one command's runs back to back,
so a slow phase can land on one side of a pair only; alternating puts
every phase on both sides, and rotating the order each round keeps any
command from always running after the same one. Each command runs once
more first, as warm-up.
Prints one JSON object: per label, the median, minimum and maximum wall
time and the median user and system CPU time, in seconds.
"""
import json
import resource
import statistics
import subprocess
import sys
import time


def main():
    runs, prepare = int(sys.argv[1]), sys.argv[2]
    cmds = [a.split("=", 1) for a in sys.argv[3:]]
    wall = {label: [] for label, _ in cmds}
    cpu = {label: [] for label, _ in cmds}
    for r in range(runs + 1):
        # Each round starts one command later, so that no command always
        # follows the same one (and the removal of its output).
        for label, cmd in cmds[r % len(cmds):] + cmds[:r % len(cmds)]:
            subprocess.run(prepare, shell=True, check=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            took = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if r > 0:
                wall[label].append(took)
                cpu[label].append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))
    out = {}
    for label, _ in cmds:
        w = wall[label]
        out[label] = {
            "median": statistics.median(w),
            "min": min(w),
            "max": max(w),
            "user": statistics.median(u for u, _ in cpu[label]),
            "system": statistics.median(s for _, s in cpu[label]),
            "runs": len(w),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
