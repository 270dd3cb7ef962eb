#!/usr/bin/env python3
"""Markdown tables from `vsnap bench freeze --json` results.

    benches/freeze-summary.py RESULT.json...

One row per disk size and provider: the freeze window per guest (p50, p99,
max, ms), the host-observed window, barrier skew, snapshot time, the
writers' p99 and longest write during backups and their p99 outside, and
the backup throughput. Then where the time inside the freeze goes, per
round: each guest's freeze window split into waiting at the barrier for
the other guests, the snapshot, and the rest (the thaw's round trip)."""
import json
import statistics
import sys


def ms(us):
    return f"{us / 1000:.1f}"


def main(paths):
    print("| guests | disk | provider | freeze window p50 / p99 / max | host window p50 / max | barrier skew p50 / max | snapshot p50 / max | write during p99 / max | write outside p99 | backup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    phases = []
    for p in paths:
        r = json.load(open(p))
        for s in r["summary"]:
            f, h, k, n = s["freeze_window_us"], s["host_window_us"], s["barrier_skew_us"], s["snapshot_us"]
            w = s.get("writes")
            during = f"{ms(w['during']['p99'])} / {ms(w['during']['max'])}" if w else "-"
            outside = ms(w["outside"]["p99"]) if w else "-"
            print(f"| {s['guests']} | {s['disk_size'] >> 30} GiB | {s['provider']} | "
                  f"{ms(f['p50'])} / {ms(f['p99'])} / {ms(f['max'])} | {ms(h['p50'])} / {ms(h['max'])} | "
                  f"{ms(k['p50'])} / {ms(k['max'])} | {ms(n['p50'])} / {ms(n['max'])} | {during} | {outside} | "
                  f"{s['backup_bytes_per_s'] / 2**20:.0f} MiB/s |")
        for rd in r["rounds"]:
            rep = rd["report"]
            # A guest whose watchdog thawed it first reported no window
            # to the coordinator: it is counted as not app-consistent.
            vms = [v for v in rep["vms"] if v["metrics"]["freeze_window_us"] is not None]
            if not vms:
                continue
            last_ack = max(v["metrics"]["freeze_ack_at_us"] for v in rep["vms"])
            waits = [last_ack - v["metrics"]["freeze_ack_at_us"] for v in vms]
            wins = [v["metrics"]["freeze_window_us"] for v in vms]
            snap = rep["snapshot_us"]
            rest = [w - a - snap for w, a in zip(wins, waits)]
            phases.append((len(rep["vms"]), rd["disk_size"] >> 30, rd["provider"], rd["round"],
                           statistics.median(wins), statistics.median(waits), snap, statistics.median(rest),
                           [x["took_us"] for x in rep["snapshots"]]))
    print()
    print("| guests | disk | provider | round | window p50 | = barrier wait p50 | + snapshot | + thaw round trip p50 | slowest disk's snapshot |")
    print("|---|---|---|---|---|---|---|---|---|")
    for g, d, pr, rd, w, a, sn, rest, took in phases:
        print(f"| {g} | {d} GiB | {pr} | {rd + 1} | {ms(w)} | {ms(a)} | {ms(sn)} | {ms(rest)} | {ms(max(took))} |")


if __name__ == "__main__":
    main(sys.argv[1:])
