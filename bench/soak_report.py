#!/usr/bin/env python3
"""bench/soak_report.py -- verdict and plot of a bench/soak.sh run.

    soak_report.py --out DIR --raw DIR [--error-log FILE] [--threshold KIB]
                   [--duration S] [--asan 0|1]

Reads DIR/samples.csv (one row per process and sample), DIR/global.csv (one
row per sample), RAW/bench/*.json (one per chatbench run) and
RAW/runs-rc.log; writes DIR/summary.txt, DIR/summary.json,
DIR/sanitizer.txt (if any report), DIR/soak-wide.csv, DIR/soak.gp and
DIR/soak.png (gnuplot). Prints the summary. Exit status 0 when memory is
FLAT and every check passed, 3 otherwise.

Memory verdict: least-squares slope of each worker's RssAnon (private
anonymous memory) over the second half of the load, in KiB/min; GROWING
when any worker's slope is above the threshold.
"""

import argparse
import csv
import glob
import json
import os
import re
import subprocess
import sys


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def slope(points):
    """least squares: (slope per x unit, intercept) or (None, None)"""
    n = len(points)
    if n < 3:
        return None, None
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None, None
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return b, my - b * mx


def median(v):
    v = sorted(v)
    if not v:
        return None
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def load_csv(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


SAN_RE = re.compile(r"AddressSanitizer|LeakSanitizer|ThreadSanitizer|"
                    r"runtime error:|Sanitizer:DEADLYSIGNAL|SUMMARY: \w+Sanitizer")
LEVEL_RE = re.compile(r"\[(emerg|alert|crit|error|warn|notice)\]")


def normalize(line):
    """an error-log line without time, pids, connection numbers, numbers"""
    line = re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", line)
    line = re.sub(r"\d+#\d+: (\*\d+ )?", "", line)
    line = re.sub(r", client: .*", "", line)
    line = re.sub(r"\b0x[0-9a-f]+\b", "0x…", line)
    line = re.sub(r"\d+", "N", line)
    return line[:160]


def scan_log(path):
    res = {"levels": {}, "sanitizer_lines": 0, "distinct": {}, "san_blocks": [],
           "exits": {}}
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return res
    block = None
    for line in lines:
        m = LEVEL_RE.search(line)
        if m:
            lvl = m.group(1)
            res["levels"][lvl] = res["levels"].get(lvl, 0) + 1
            if lvl in ("emerg", "alert", "crit", "error", "warn"):
                k = normalize(line)
                res["distinct"][k] = res["distinct"].get(k, 0) + 1
        m = re.search(r"worker process \d+ exited (with code \d+|on signal \d+)", line)
        if m:
            res["exits"][m.group(1)] = res["exits"].get(m.group(1), 0) + 1
        if SAN_RE.search(line):
            res["sanitizer_lines"] += 1
        # sanitizer report blocks: from "==pid==ERROR:" to "SUMMARY:"
        if re.match(r"^==\d+==ERROR: ", line) or "runtime error:" in line:
            block = [line]
            res["san_blocks"].append(block)
            if "runtime error:" in line:
                block = None
            continue
        if block is not None:
            block.append(line)
            if line.startswith("SUMMARY: "):
                block = None
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--raw", required=True)
    ap.add_argument("--error-log", default="")
    ap.add_argument("--threshold", type=float, default=64.0)
    ap.add_argument("--noise-floor", type=float, default=1024.0)
    ap.add_argument("--duration", type=float, default=0)
    ap.add_argument("--asan", default="0")
    a = ap.parse_args()

    samples = load_csv(os.path.join(a.out, "samples.csv"))
    glob_rows = load_csv(os.path.join(a.out, "global.csv"))
    out = []

    def say(s=""):
        out.append(s)

    load_t = [num(r["t_s"]) for r in samples if r["phase"] == "load"]
    dur = a.duration or (max(load_t) if load_t else 0)
    half = dur / 2.0

    # ---- per-process series ----
    procs = {}
    for r in samples:
        t = num(r["t_s"])
        if t is None:
            continue
        p = procs.setdefault(r["pid"], {"role": r["role"], "rows": []})
        p["rows"].append((t, r))

    workers = [pid for pid, p in procs.items() if p["role"] == "worker"]
    workers.sort(key=lambda pid: procs[pid]["rows"][0][0])

    summary = {"duration_s": dur, "threshold_kib_per_min": a.threshold,
               "noise_floor_kib": a.noise_floor,
               "asan": a.asan == "1", "workers": {}, "checks": {}}

    say("== soak summary (%s)" % os.path.basename(os.path.abspath(a.out)))
    say("load %.0f s; second half = t in [%.0f, %.0f] s; %d samples; workers seen: %s"
        % (dur, half, dur, len(glob_rows), " ".join(workers) or "none"))
    if a.asan == "1":
        say("ASan build: RSS includes shadow memory and the allocator quarantine; "
            "the slope is indicative only")
    say()
    say("%-8s %10s %10s %10s %10s %11s %11s %8s %8s %8s"
        % ("worker", "anon@0", "anon@half", "anon@end", "anon max",
           "slope 1st", "slope 2nd", "fds@0", "fds max", "fds@end"))
    say("%-8s %10s %10s %10s %10s %11s %11s %8s %8s %8s"
        % ("", "KiB", "KiB", "KiB", "KiB", "KiB/min", "KiB/min", "", "", ""))

    verdict_slopes = []
    fits = {}
    fd_leak = []
    for pid in workers:
        rows = procs[pid]["rows"]
        anon = [(t, num(r["rssanon_kb"])) for t, r in rows if num(r["rssanon_kb"]) is not None]
        fds = [(t, num(r["fds"])) for t, r in rows if num(r["fds"]) is not None]
        base = [v for t, v in anon if t <= 0]
        first = [(t / 60.0, v) for t, v in anon if 0 <= t < half]
        second = [(t / 60.0, v) for t, v in anon if half <= t <= dur]
        s1, _ = slope(first)
        s2, i2 = slope(second)
        # lived through the second half: first and last samples near its
        # ends (within a fifth of it, or two sample intervals)
        steps = [b2[0] - b1[0] for b1, b2 in zip(anon, anon[1:])]
        tol = max(0.2 * (dur - half), 2 * (median(steps) or 0))
        covers = bool(second) and second[0][0] * 60 <= half + tol and second[-1][0] * 60 >= dur - tol
        at_half = [v for t, v in anon if t >= half]
        base_fd = [v for t, v in fds if t <= 0]
        end_fd = [num(r["fds"]) for t, r in rows
                  if r["phase"] in ("cooldown", "end") and num(r["fds"]) is not None]
        w = {
            "anon_start_kb": median(base) if base else (anon[0][1] if anon else None),
            "anon_half_kb": at_half[0] if at_half else None,
            "anon_end_kb": anon[-1][1] if anon else None,
            "anon_max_kb": max(v for t, v in anon) if anon else None,
            "slope_first_half_kib_min": s1,
            "slope_second_half_kib_min": s2,
            "covers_second_half": bool(covers),
            "vmrss_end_kb": num(rows[-1][1]["vmrss_kb"]),
            "private_end_kb": num(rows[-1][1]["private_kb"]),
            "fds_start": median(base_fd) if base_fd else (fds[0][1] if fds else None),
            "fds_max": max(v for t, v in fds) if fds else None,
            "fds_end": end_fd[-1] if end_fd else None,
            "first_t": rows[0][0], "last_t": rows[-1][0],
        }
        summary["workers"][pid] = w
        if s2 is not None and covers:
            verdict_slopes.append(s2)
            fits[pid] = (s2, i2)
        if w["fds_start"] is not None and w["fds_end"] is not None \
                and w["fds_end"] > w["fds_start"] + 8:
            fd_leak.append(pid)

        def f(v, fmt="%10.0f"):
            return (fmt % v) if v is not None else ("%10s" % "-")
        say("%-8s %s %s %s %s %s %s %s %s %s"
            % (pid, f(w["anon_start_kb"]), f(w["anon_half_kb"]), f(w["anon_end_kb"]),
               f(w["anon_max_kb"]), f(s1, "%11.1f"), f(s2, "%11.1f") + ("" if covers else "*"),
               f(w["fds_start"], "%8.0f"), f(w["fds_max"], "%8.0f"), f(w["fds_end"], "%8.0f")))
    if any(not summary["workers"][p]["covers_second_half"] for p in workers):
        say("  * this worker did not live through the second half (replaced?): not in the verdict")

    # sum of the workers alive at each sample
    by_t = {}
    for r in samples:
        if r["role"] == "worker" and r["phase"] == "load":
            t = num(r["t_s"])
            by_t[t] = by_t.get(t, 0) + (num(r["rssanon_kb"]) or 0)
    sum_second = [(t / 60.0, v) for t, v in sorted(by_t.items()) if half <= t <= dur]
    ssum, _ = slope(sum_second)
    summary["sum_slope_second_half_kib_min"] = ssum

    # master
    mrows = [r for pid, p in procs.items() if p["role"] == "master" for t, r in p["rows"]]
    if mrows:
        say("master: RssAnon %s -> %s KiB, fds %s -> %s"
            % (mrows[0]["rssanon_kb"], mrows[-1]["rssanon_kb"], mrows[0]["fds"], mrows[-1]["fds"]))

    # ---- global ----
    def col(name, phase=None):
        return [num(r[name]) for r in glob_rows
                if num(r[name]) is not None and (phase is None or r["phase"] == phase)]
    used = col("zone_used_pages")
    total = col("zone_total_pages")
    zrss = [num(r["zone_rss_kb"]) for r in samples if r["role"] == "worker" and num(r["zone_rss_kb"]) is not None]
    pgc = col("pg_nginx_conns", "load")
    pga = col("pg_conns")
    tcp = col("tcp_estab", "load")
    if used and total:
        say("shared zone: slab pages used %d..%d of %d (%.1f%% max), last %d; zone Rss in a worker up to %.0f KiB"
            % (min(used), max(used), total[-1], 100.0 * max(used) / total[-1], used[-1], max(zrss) if zrss else 0))
    elif zrss:
        say("shared zone: Rss in a worker up to %.0f KiB (slab header not readable)" % max(zrss))
    else:
        say("shared zone: not found")
    summary["zone"] = {"used_pages_min": min(used) if used else None,
                       "used_pages_max": max(used) if used else None,
                       "total_pages": total[-1] if total else None,
                       "rss_max_kb": max(zrss) if zrss else None}
    if pga:
        say("PostgreSQL client backends: nginx %s..%s during the load (all clients up to %d); at the end %s"
            % (int(min(pgc)) if pgc else "-", int(max(pgc)) if pgc else "-", max(pga),
               glob_rows[-1]["pg_nginx_conns"] or "-"))
    summary["pg_nginx_conns"] = {"min": min(pgc) if pgc else None, "max": max(pgc) if pgc else None}
    if tcp:
        say("established connections to nginx: up to %d during the load, %s at the end"
            % (max(tcp), glob_rows[-1]["tcp_estab"]))

    # ---- chatbench runs ----
    keys = {"lost": ("integrity", "lost"), "dup": ("integrity", "dup"),
            "out_of_order": ("integrity", "out_of_order"), "stray": ("integrity", "stray"),
            "seq_gap": ("integrity", "seq_gap"), "seq_back": ("integrity", "seq_back"),
            "send_fail": ("errors", "send_fail"), "unacked": ("errors", "unacked"),
            "retries": ("errors", "retries"), "unavailable": ("errors", "unavailable"),
            "rate_limited": ("errors", "rate_limited"), "err_other": ("errors", "other"),
            "setup_fail": ("errors", "setup_fail"),
            "conn_ok": ("connections", "ok"), "conn_failed": ("connections", "failed"),
            "dropped": ("connections", "dropped"), "sent": ("messages", "sent"),
            "acked": ("messages", "acked"), "skipped": ("messages", "skipped"),
            "expected": ("deliveries", "expected"), "received": ("deliveries", "received")}
    tot = {k: 0 for k in keys}
    runs = {"msg": 0, "storm": 0}
    p99s, maxes, bad_runs = [], [], []
    for path in sorted(glob.glob(os.path.join(a.raw, "bench", "*.json"))):
        try:
            with open(path) as f:
                j = json.load(f)
        except (OSError, ValueError):
            bad_runs.append(os.path.basename(path) + ": unreadable")
            continue
        runs["storm" if j.get("scenario") == "connect-storm" else "msg"] += 1
        for k, (a1, a2) in keys.items():
            tot[k] += int(j.get(a1, {}).get(a2, 0) or 0)
        if j.get("scenario") != "connect-storm":
            e = j.get("latency_e2e_ms", {})
            if e.get("n"):
                p99s.append(e["p99"])
                maxes.append(e["max"])
    rcs = {}
    try:
        with open(os.path.join(a.raw, "runs-rc.log")) as f:
            for line in f:
                m = re.search(r"(\S+) rc=(\d+)", line)
                if m:
                    rcs[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    for tag, rc in sorted(rcs.items()):
        if rc not in (0, 3):
            bad_runs.append("%s exited %d (%s)" % (tag, rc, {124: "timeout", 2: "run failed"}.get(rc, "?")))
    checkfail = sorted(t for t, rc in rcs.items() if rc == 3)
    say()
    say("chatbench: %d message runs, %d connect-storms; connections ok %d failed %d dropped %d"
        % (runs["msg"], runs["storm"], tot["conn_ok"], tot["conn_failed"], tot["dropped"]))
    say("  messages sent %d acked %d skipped %d; deliveries expected %d received %d"
        % (tot["sent"], tot["acked"], tot["skipped"], tot["expected"], tot["received"]))
    say("  integrity: lost %d dup %d out-of-order %d stray %d seq-gap %d seq-back %d"
        % (tot["lost"], tot["dup"], tot["out_of_order"], tot["stray"], tot["seq_gap"], tot["seq_back"]))
    say("  errors: send-fail %d unacked %d retries %d unavailable %d rate-limited %d other %d setup-fail %d"
        % (tot["send_fail"], tot["unacked"], tot["retries"], tot["unavailable"],
           tot["rate_limited"], tot["err_other"], tot["setup_fail"]))
    if p99s:
        say("  e2e latency p99 per run: median %.2f ms, worst %.2f ms; max %.2f ms"
            % (median(p99s), max(p99s), max(maxes)))
    if checkfail:
        say("  runs whose --check failed: %s" % " ".join(checkfail[:20]))
    for b in bad_runs[:20]:
        say("  run problem: %s" % b)
    summary["chatbench"] = dict(tot, runs=runs, failed_runs=bad_runs, check_failed=checkfail,
                                e2e_p99_median_ms=median(p99s), e2e_p99_worst_ms=max(p99s) if p99s else None)

    # ---- error log ----
    lg = scan_log(a.error_log) if a.error_log else scan_log("")
    lv = lg["levels"]
    say()
    say("error.log during the soak: emerg %d alert %d crit %d error %d warn %d; sanitizer lines %d"
        % (lv.get("emerg", 0), lv.get("alert", 0), lv.get("crit", 0), lv.get("error", 0),
           lv.get("warn", 0), lg["sanitizer_lines"]))
    bad_exits = sum(n for k, n in lg["exits"].items() if k != "with code 0")
    if lg["exits"]:
        say("worker exits: " + ", ".join("%s: %d" % kv for kv in sorted(lg["exits"].items()))
            + ("" if a.asan != "1" else " (an ASan worker that leaked exits non-zero)"))
    for k, n in sorted(lg["distinct"].items(), key=lambda kv: -kv[1])[:10]:
        say("  %6d x %s" % (n, k))
    if lg["san_blocks"]:
        with open(os.path.join(a.out, "sanitizer.txt"), "w") as f:
            for b in lg["san_blocks"]:
                f.write("\n".join(b) + "\n\n")
        say("  %d sanitizer report(s): %s" % (len(lg["san_blocks"]), os.path.join(a.out, "sanitizer.txt")))
        for b in lg["san_blocks"][:5]:
            say("  | " + b[0][:200])
            frames = [l for l in b if re.match(r"\s+#\d+ ", l)][:6]
            for fr in frames:
                say("  |   " + fr.strip()[:200])
    summary["error_log"] = {"levels": lv, "sanitizer_lines": lg["sanitizer_lines"],
                            "worker_exits": lg["exits"],
                            "sanitizer_reports": len(lg["san_blocks"]),
                            "top": sorted(lg["distinct"].items(), key=lambda kv: -kv[1])[:10]}

    # ---- verdict ----
    # GROWING: a worker's trend is above the threshold and amounts to more
    # than the noise floor over the second half (malloc trimming moves
    # RssAnon in steps of a few hundred KiB, which on a short soak would
    # read as a slope)
    half_min = (dur - half) / 60.0
    if verdict_slopes:
        worst = max(verdict_slopes)
        mem = "GROWING" if worst > a.threshold and worst * half_min > a.noise_floor else "FLAT"
    else:
        worst, mem = None, "UNKNOWN"
    checks = {
        "memory": mem,
        "integrity": "PASS" if all(tot[k] == 0 for k in
                                   ("lost", "dup", "out_of_order", "stray", "seq_gap", "seq_back")) else "FAIL",
        "errors": "PASS" if all(tot[k] == 0 for k in
                                ("send_fail", "unacked", "conn_failed", "dropped", "setup_fail")) else "FAIL",
        "runs": "PASS" if not bad_runs and runs["msg"] > 0 else "FAIL",
        "log": "PASS" if (lv.get("emerg", 0) + lv.get("alert", 0) + lv.get("crit", 0)
                          + lg["sanitizer_lines"] + bad_exits) == 0 else "FAIL",
        "fds": "PASS" if not fd_leak else "FAIL",
    }
    summary["checks"] = checks
    summary["worst_slope_kib_min"] = worst
    say()
    say("VERDICT memory: %s — worst worker RssAnon slope over the second half %s KiB/min "
        "= %s KiB over %.1f min (GROWING: > %.0f KiB/min and > %.0f KiB); sum of workers %s KiB/min"
        % (mem, "%.1f" % worst if worst is not None else "-",
           "%.0f" % (worst * half_min) if worst is not None else "-", half_min,
           a.threshold, a.noise_floor, "%.1f" % ssum if ssum is not None else "-"))
    say("VERDICT checks: " + "  ".join("%s=%s" % kv for kv in checks.items() if kv[0] != "memory")
        + ("  (fds above baseline+8 after the load: %s)" % " ".join(fd_leak) if fd_leak else ""))
    ok = mem == "FLAT" and all(v == "PASS" for k, v in checks.items() if k != "memory")
    say("VERDICT overall: %s" % ("PASS" if ok else "FAIL"))

    with open(os.path.join(a.out, "summary.txt"), "w") as f:
        f.write("\n".join(out) + "\n")
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print("\n".join(out))

    plot(a, samples, glob_rows, workers, procs, fits, half, dur)
    return 0 if ok else 3


def plot(a, samples, glob_rows, workers, procs, fits, half, dur):
    # wide CSV: one row per sample time, columns per worker
    times = sorted({num(r["t_s"]) for r in samples if num(r["t_s"]) is not None})
    cell = {}
    for r in samples:
        cell[(num(r["t_s"]), r["pid"])] = r
    g = {num(r["t_s"]): r for r in glob_rows}
    wide = os.path.join(a.out, "soak-wide.csv")
    cols = ["t_min", "zone_used_mib", "pg_conns", "pg_nginx_conns", "tcp_estab"]
    for pid in workers:
        cols += ["anon_%s" % pid, "vmrss_%s" % pid, "fds_%s" % pid, "zrss_%s" % pid]
    with open(wide, "w") as f:
        f.write(",".join(cols) + "\n")
        for t in times:
            gr = g.get(t, {})
            up = num(gr.get("zone_used_pages"))
            row = ["%.3f" % (t / 60.0), "%.3f" % (up * 4096 / 1048576.0) if up is not None else "",
                   gr.get("pg_conns", ""), gr.get("pg_nginx_conns", ""), gr.get("tcp_estab", "")]
            for pid in workers:
                r = cell.get((t, pid))
                if r:
                    row += ["%.3f" % (num(r["rssanon_kb"]) / 1024.0), "%.3f" % (num(r["vmrss_kb"]) / 1024.0),
                            r["fds"], "%.3f" % (num(r["zone_rss_kb"]) / 1024.0) if num(r["zone_rss_kb"]) is not None else ""]
                else:
                    row += ["", "", "", ""]
            f.write(",".join(str(x) for x in row) + "\n")

    def c(name):
        return cols.index(name) + 1

    png = os.path.join(a.out, "soak.png")
    gp = ["set terminal pngcairo size 1600,1000 font ',10'" if has_cairo() else "set terminal png size 1600,1000",
          "set termoption noenhanced", "set output '%s'" % png, "set datafile separator ','", "set datafile missing ''",
          "set key outside right top", "set grid", "set xlabel 'minutes since load start'",
          "set multiplot layout 2,2 title 'ngx_chat_module soak: %s'" % os.path.basename(os.path.abspath(a.out)),
          "set arrow 1 from %f, graph 0 to %f, graph 1 nohead dt 3 lc rgb 'gray'" % (half / 60.0, half / 60.0),
          "set arrow 2 from %f, graph 0 to %f, graph 1 nohead dt 3 lc rgb 'gray'" % (dur / 60.0, dur / 60.0)]
    parts = []
    for i, pid in enumerate(workers):
        parts.append("'%s' skip 1 using %d:%d with lines lw 2 lc %d title 'w%s RssAnon'" % (wide, 1, c("anon_%s" % pid), i + 1, pid))
        parts.append("'%s' skip 1 using %d:%d with lines dt 2 lc %d title 'w%s VmRSS'" % (wide, 1, c("vmrss_%s" % pid), i + 1, pid))
        if pid in fits:
            b, i0 = fits[pid]
            parts.append("(x >= %f && x <= %f) ? (%f + %f * x) / 1024.0 : 1/0 with lines lw 1 lc rgb 'black' "
                         "title sprintf('w%s fit %%.1f KiB/min', %f)" % (half / 60.0, dur / 60.0, i0, b, pid, b))
    gp += ["set title 'worker memory (MiB); second-half fit'", "set ylabel 'MiB'",
           "set samples 400",
           ("plot " + ", \\\n     ".join(parts)) if parts else "plot 0 notitle"]
    parts = ["'%s' skip 1 using 1:%d with lines lw 2 lc %d title 'w%s fds'" % (wide, c("fds_%s" % pid), i + 1, pid)
             for i, pid in enumerate(workers)]
    parts.append("'%s' skip 1 using 1:%d with lines lc rgb 'gray' title 'established (all workers)'" % (wide, c("tcp_estab")))
    gp += ["set title 'open files per worker'", "set ylabel 'fds'", "plot " + ", \\\n     ".join(parts)]
    parts = ["'%s' skip 1 using 1:%d with lines lw 2 lc rgb 'dark-red' title 'slab pages used (MiB)'" % (wide, c("zone_used_mib"))]
    parts += ["'%s' skip 1 using 1:%d with lines dt 2 lc %d title 'w%s zone Rss (MiB)'" % (wide, c("zrss_%s" % pid), i + 1, pid)
              for i, pid in enumerate(workers)]
    gp += ["set title 'shared zone ngx_chat_module'", "set ylabel 'MiB'", "plot " + ", \\\n     ".join(parts)]
    gp += ["set title 'PostgreSQL client backends'", "set ylabel 'connections'",
           "plot '%s' skip 1 using 1:%d with lines lw 2 title 'all', '%s' skip 1 using 1:%d with lines lw 2 title 'nginx chat'"
           % (wide, c("pg_conns"), wide, c("pg_nginx_conns")),
           "unset multiplot"]
    gpf = os.path.join(a.out, "soak.gp")
    with open(gpf, "w") as f:
        f.write("\n".join(gp) + "\n")
    try:
        r = subprocess.run(["gnuplot", gpf], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            print("gnuplot failed: %s" % r.stderr.strip()[-500:])
        else:
            print("plot: %s" % png)
    except (OSError, subprocess.TimeoutExpired) as e:
        print("no plot: %s" % e)


def has_cairo():
    try:
        r = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True, timeout=20)
        return "pngcairo" in (r.stdout + r.stderr)
    except (OSError, subprocess.TimeoutExpired):
        return False


if __name__ == "__main__":
    sys.exit(main())
