#!/usr/bin/env python3
"""Aggregate chatbench runs: median and spread over repetitions, ratios
between servers, CSV/JSON/Markdown summaries and gnuplot plots.

    report.py RAW_DIR [OUT_DIR]

Reads RAW_DIR/runs.csv (one line per run, written by chatbench; tags are
MODE.SCENARIO.SIZE.rREP) and the per-run *.e2e.hgrm files; writes
summary.{md,csv,json} and plots to OUT_DIR (default RAW_DIR). Runs marked
INVALID (generator CPU > 90%) are listed but left out of the medians.
Only the Python standard library is used; plots need gnuplot.
"""
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys

MODES = ["chat", "mock", "nchan", "socketio"]
SCENARIOS = ["idle", "connect-storm", "dm", "group", "mixed"]

# (column, label, lower is better)
METRICS = {
    "idle": [
        ("rss_per_conn_b", "server RSS per connection (B)", True),
        ("connect_rate", "connects/s", False),
        ("conn_p99_ms", "connect p99 (ms)", True),
        ("conn_failed", "failed connections", True),
    ],
    "connect-storm": [
        ("connect_rate", "connects/s achieved", False),
        ("conn_p50_ms", "connect p50 (ms)", True),
        ("conn_p99_ms", "connect p99 (ms)", True),
        ("conn_max_ms", "connect max (ms)", True),
        ("conn_failed", "failed connections", True),
        ("rss_per_conn_b", "server RSS per connection (B)", True),
    ],
}
MSG_METRICS = [
    ("e2e_p50_ms", "e2e p50 (ms)", True),
    ("e2e_p90_ms", "e2e p90 (ms)", True),
    ("e2e_p99_ms", "e2e p99 (ms)", True),
    ("e2e_p999_ms", "e2e p99.9 (ms)", True),
    ("e2e_max_ms", "e2e max (ms)", True),
    ("ack_p99_ms", "ack p99 (ms)", True),
    ("sent_per_s", "sent/s", False),
    ("recv_per_s", "deliveries/s", False),
    ("lost", "lost", True),
    ("dup", "duplicated", True),
    ("ooo", "out of order", True),
    ("send_fail", "send failures", True),
    ("gen_cpu_run_pct", "generator CPU %", True),
]
for _s in ("dm", "group", "mixed"):
    METRICS[_s] = MSG_METRICS


def fnum(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load(outdir):
    path = os.path.join(outdir, "runs.csv")
    if not os.path.exists(path):
        sys.exit("no runs.csv in %s" % outdir)
    runs = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parts = row["tag"].split(".")
            if len(parts) >= 4 and parts[-1].startswith("r"):
                row["_mode"] = parts[0]
                row["_rep"] = parts[-1]
            else:
                row["_mode"] = row["mode"]
                row["_rep"] = "r1"
            runs.append(row)
    return runs


def aggregate(runs):
    groups = {}
    for r in runs:
        key = (r["_mode"], r["scenario"], int(r["size"]))
        groups.setdefault(key, []).append(r)

    out = []
    for (mode, sc, size), rs in sorted(groups.items()):
        valid = [r for r in rs if r["valid"] == "1"]
        entry = {"mode": mode, "scenario": sc, "size": size,
                 "runs": len(rs), "valid_runs": len(valid),
                 "invalid": [r["tag"] + ": " + r["invalid_reason"]
                             for r in rs if r["valid"] != "1"],
                 "tags": [r["tag"] for r in rs], "metrics": {}}
        for col, label, _ in METRICS.get(sc, []):
            vals = [fnum(r.get(col)) for r in valid]
            vals = [v for v in vals if v is not None]
            if not vals:
                continue
            med = statistics.median(vals)
            entry["metrics"][col] = {
                "label": label, "median": med, "min": min(vals),
                "max": max(vals), "n": len(vals),
                "spread_pct": (100.0 * (max(vals) - min(vals)) / med
                               if med else 0.0),
            }
        # the run whose e2e p99 is the median one, for the spectrum plot
        if valid and sc in ("dm", "group", "mixed"):
            srt = sorted(valid, key=lambda r: fnum(r["e2e_p99_ms"]) or 0)
            entry["median_tag"] = srt[len(srt) // 2]["tag"]
        out.append(entry)
    return out


def ratios(agg):
    """value of each mode / value of the baseline (chat if present)."""
    by = {(e["mode"], e["scenario"], e["size"]): e for e in agg}
    for e in agg:
        e["ratios"] = {}
        for base in ("chat", "mock", "nchan"):
            b = by.get((base, e["scenario"], e["size"]))
            if b is None or base == e["mode"]:
                continue
            for col, m in e["metrics"].items():
                bm = b["metrics"].get(col)
                if bm and bm["median"]:
                    e["ratios"].setdefault(base, {})[col] = (
                        m["median"] / bm["median"])
    return agg


def fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.3g" % v


def write_md(outdir, agg):
    lines = ["# chatbench summary", ""]
    params = os.path.join(outdir, "params.txt")
    if os.path.exists(params):
        lines += ["```", open(params).read().rstrip(), "```", ""]
    lines += [
        "Medians over valid repetitions; [min–max] is the spread. "
        "Ratios are this server's median over the baseline's "
        "(chat = ngx_chat_module; mock = the Node stand-in, not a result).",
        ""]
    modes_present = [m for m in MODES if any(e["mode"] == m for e in agg)]
    for sc in SCENARIOS:
        es = [e for e in agg if e["scenario"] == sc]
        if not es:
            continue
        sizes = sorted({e["size"] for e in es})
        for size in sizes:
            cell = {e["mode"]: e for e in es if e["size"] == size}
            title = sc if sc in ("idle", "connect-storm") else \
                "%s, %d B bodies" % (sc, size)
            lines += ["## " + title, ""]
            cols = [m for m in modes_present if m in cell]
            lines.append("| metric | " + " | ".join(cols) + " |")
            lines.append("|---|" + "---|" * len(cols))
            for col, label, _ in METRICS[sc]:
                row = []
                for m in cols:
                    mm = cell[m]["metrics"].get(col)
                    if mm is None:
                        row.append("-")
                        continue
                    s = fmt(mm["median"])
                    if mm["n"] > 1:
                        s += " [%s–%s]" % (fmt(mm["min"]), fmt(mm["max"]))
                    for base in ("chat", "mock"):
                        rt = cell[m].get("ratios", {}).get(base, {}).get(col)
                        if rt is not None:
                            s += " (×%.2f vs %s)" % (rt, base)
                            break
                    row.append(s)
                lines.append("| %s | %s |" % (label, " | ".join(row)))
            runs = " ".join("%s %d/%d" % (m, cell[m]["valid_runs"],
                                          cell[m]["runs"]) for m in cols)
            lines += ["", "valid runs: " + runs, ""]
            for m in cols:
                for inv in cell[m]["invalid"]:
                    lines.append("- INVALID " + inv)
            if any(cell[m]["invalid"] for m in cols):
                lines.append("")
            pngs = [p for p in ("latency-%s-%d.png" % (sc, size),)
                    if os.path.exists(os.path.join(outdir, p))]
            for p in pngs:
                lines += ["![%s](%s)" % (p, p), ""]
    for p in ("e2e-p99.png", "e2e-p50.png", "connect-rate.png",
              "rss-per-conn.png"):
        if os.path.exists(os.path.join(outdir, p)):
            lines += ["![%s](%s)" % (p, p), ""]
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_csv(outdir, agg):
    with open(os.path.join(outdir, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "scenario", "size", "metric", "n", "median",
                    "min", "max", "spread_pct", "ratio_vs_chat",
                    "ratio_vs_nchan", "valid_runs", "runs"])
        for e in agg:
            for col, m in e["metrics"].items():
                w.writerow([e["mode"], e["scenario"], e["size"], col, m["n"],
                            m["median"], m["min"], m["max"],
                            "%.1f" % m["spread_pct"],
                            e["ratios"].get("chat", {}).get(col, ""),
                            e["ratios"].get("nchan", {}).get(col, ""),
                            e["valid_runs"], e["runs"]])


def plots(rawdir, outdir, agg):
    if shutil.which("gnuplot") is None:
        print("gnuplot not found: no plots")
        return
    pdir = os.path.join(rawdir, "plot-data")
    os.makedirs(pdir, exist_ok=True)
    script = ["set terminal pngcairo size 900,560 noenhanced" if
              _has_cairo() else "set terminal png size 900,560 noenhanced",
              "set grid", "set key top left"]

    # latency spectrum per scenario/size: one line per server (median run)
    for sc in ("dm", "group", "mixed"):
        for size in sorted({e["size"] for e in agg if e["scenario"] == sc}):
            series = []
            for e in agg:
                if e["scenario"] != sc or e["size"] != size:
                    continue
                tag = e.get("median_tag")
                if not tag:
                    continue
                h = os.path.join(rawdir, tag + ".e2e.hgrm")
                if os.path.exists(h) and os.path.getsize(h) > 80:
                    series.append((e["mode"], h))
            if not series:
                continue
            script += [
                "set output '%s'" % os.path.join(
                    outdir, "latency-%s-%d.png" % (sc, size)),
                "set title 'end-to-end latency by percentile: %s, %d B "
                "(median run)'" % (sc, size),
                "set logscale x", "set logscale y",
                "set xlabel 'percentile'", "set ylabel 'ms'",
                "set xtics ('50%%' 2, '90%%' 10, '99%%' 100, "
                "'99.9%%' 1000, '99.99%%' 10000)",
                "plot " + ", ".join(
                    "'%s' using 4:1 with lines lw 2 title '%s'" % (h, m)
                    for m, h in series),
                "unset logscale x", "unset logscale y", "set xtics auto",
            ]

    # bar charts of medians: rows = scenario/size, columns = servers
    def bars(name, col, scs, title, ylabel, logy=False):
        modes = [m for m in MODES if any(
            e["mode"] == m and col in e["metrics"] for e in agg
            if e["scenario"] in scs)]
        rows = []
        for sc in scs:
            for size in sorted({e["size"] for e in agg
                                if e["scenario"] == sc}):
                vals = []
                for m in modes:
                    e = next((x for x in agg if x["mode"] == m and
                              x["scenario"] == sc and x["size"] == size),
                             None)
                    mm = e["metrics"].get(col) if e else None
                    vals.append(mm["median"] if mm else float("nan"))
                label = sc if sc in ("idle", "connect-storm") else \
                    "%s-%d" % (sc, size)
                rows.append((label, vals))
        if not rows or not modes:
            return
        dat = os.path.join(pdir, name + ".dat")
        with open(dat, "w") as f:
            f.write("row " + " ".join(modes) + "\n")
            for label, vals in rows:
                f.write(label + " " + " ".join(
                    "%g" % v if v == v else "NaN" for v in vals) + "\n")
        script.extend([
            "set output '%s'" % os.path.join(outdir, name + ".png"),
            "set title '%s'" % title, "set ylabel '%s'" % ylabel,
            "set xlabel ''",
            "set style data histogram", "set style histogram cluster gap 1",
            "set style fill solid 0.8 border -1", "set boxwidth 0.9",
            "set yrange [0:*]" if not logy else "set logscale y",
            "plot " + ", ".join(
                "'%s' using %d:xtic(1) title columnheader(%d)" % (dat, i + 2,
                                                                  i + 2)
                for i in range(len(modes))),
            "unset logscale y", "set yrange [*:*]", "set style data lines",
        ])

    bars("e2e-p99", "e2e_p99_ms", ("dm", "group", "mixed"),
         "end-to-end latency p99 (median of runs)", "ms")
    bars("e2e-p50", "e2e_p50_ms", ("dm", "group", "mixed"),
         "end-to-end latency p50 (median of runs)", "ms")
    bars("connect-rate", "connect_rate", ("connect-storm",),
         "connects per second achieved", "connects/s")
    bars("rss-per-conn", "rss_per_conn_b", ("idle",),
         "server RSS per idle connection", "bytes")

    gp = os.path.join(pdir, "plots.gp")
    with open(gp, "w") as f:
        f.write("\n".join(script) + "\n")
    r = subprocess.run(["gnuplot", gp], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        print("gnuplot failed:", r.stderr[-2000:])


def _has_cairo():
    try:
        r = subprocess.run(["gnuplot", "-e", "set terminal"],
                           capture_output=True, text=True, timeout=20)
        return "pngcairo" in (r.stdout + r.stderr)
    except (OSError, subprocess.SubprocessError):
        return False


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    rawdir = sys.argv[1]
    outdir = sys.argv[2] if len(sys.argv) == 3 else rawdir
    os.makedirs(outdir, exist_ok=True)
    agg = ratios(aggregate(load(rawdir)))
    write_csv(outdir, agg)
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(agg, f, indent=1)
    plots(rawdir, outdir, agg)
    write_md(outdir, agg)
    # a compact table on stdout
    for e in agg:
        m = e["metrics"]
        key = "%-9s %-14s %5d" % (e["mode"], e["scenario"], e["size"])
        if e["scenario"] in ("idle", "connect-storm"):
            print("%s  conn/s %-8s conn p99 %-8s rss/conn %-8s valid %d/%d"
                  % (key, fmt(m.get("connect_rate", {}).get("median")),
                     fmt(m.get("conn_p99_ms", {}).get("median")),
                     fmt(m.get("rss_per_conn_b", {}).get("median")),
                     e["valid_runs"], e["runs"]))
        else:
            print("%s  p50 %-7s p99 %-7s p99.9 %-7s deliv/s %-8s lost %s "
                  "dup %s valid %d/%d"
                  % (key, fmt(m.get("e2e_p50_ms", {}).get("median")),
                     fmt(m.get("e2e_p99_ms", {}).get("median")),
                     fmt(m.get("e2e_p999_ms", {}).get("median")),
                     fmt(m.get("recv_per_s", {}).get("median")),
                     fmt(m.get("lost", {}).get("median")),
                     fmt(m.get("dup", {}).get("median")),
                     e["valid_runs"], e["runs"]))


if __name__ == "__main__":
    main()
