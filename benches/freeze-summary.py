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
            # Each guest is thawed once its own disks are taken: its share of
            # the snapshot phase runs from the barrier's close (the last
            # freeze acknowledged) to its thaw being sent.
            took = [x["took_us"] for x in rep["snapshots"]]
            last_ack = max(v["metrics"]["freeze_ack_at_us"] for v in rep["vms"])
            rows = []
            for v in rep["vms"]:
                m = v["metrics"]
                w = m["freeze_window_us"]
                # A guest whose watchdog thawed it first reported no window
                # to the coordinator: it counts as not app-consistent.
                if w is None or m.get("thaw_sent_at_us") is None:
                    continue
                wait = last_ack - m["freeze_ack_at_us"]
                snap = m["thaw_sent_at_us"] - last_ack
                rows.append((w, wait, snap, w - wait - snap))
            if not rows:
                continue
            med = lambda k: statistics.median(x[k] for x in rows)
            phases.append((len(rep["vms"]), rd["disk_size"] >> 30, rd["provider"], rd["round"],
                           med(0), med(1), med(2), med(3), max(took) if took else 0))
    print()
    print("| guests | disk | provider | round | window p50 | = barrier wait p50 | + snapshots until its thaw p50 | + the rest p50 (replies, thaw) | slowest disk's snapshot |")
    print("|---|---|---|---|---|---|---|---|---|")
    for g, d, pr, rd, w, a, sn, rest, took in phases:
        print(f"| {g} | {d} GiB | {pr} | {rd + 1} | {ms(w)} | {ms(a)} | {ms(sn)} | {ms(rest)} | {ms(took)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
