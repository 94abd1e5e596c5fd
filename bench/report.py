#!/usr/bin/env python3
"""Aggregate chatbench runs: median and spread over repetitions, ratios
between servers, CSV/JSON/Markdown summaries and gnuplot plots.

    report.py RAW_DIR [OUT_DIR]

Reads RAW_DIR/runs.csv (one line per run, written by chatbench) and the
per-run *.e2e.hgrm files; writes summary.{md,csv,json} and plots to OUT_DIR
(default RAW_DIR).

Runs are grouped by point: (mode, scenario, size, conns, rate, group size).
run.sh tags runs MODE.SCENARIO.SIZE.c<conns>[.r<rate>][.k<K>].rep<N>; the
older MODE.SCENARIO.SIZE.r<N> (one point per scenario) is read as well.
conns, rate and group size come from runs.csv; the tag's r<rate> is used
for connect-storm only (its connect rate is not in runs.csv). Runs marked
INVALID (generator CPU > 90%) are listed but left out of the medians.
Only the Python standard library is used; plots need gnuplot.
"""
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

MODES = ["chat", "mock", "nchan", "socketio"]
SCENARIOS = ["idle", "connect-storm", "dm", "group", "mixed"]
MSG_SCENARIOS = ("dm", "group", "mixed")

# (column, label, lower is better)
METRICS = {
    "idle": [
        ("rss_per_conn_b", "server RSS per connection (B)", True),
        ("server_rss_mib", "server RSS, all connected (MiB)", True),
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
    ("recv_per_s", "deliveries/s to others (measured)", False),
    ("lost", "lost", True),
    ("dup", "duplicated", True),
    ("ooo", "out of order", True),
    ("send_fail", "send failures", True),
    ("gen_cpu_run_pct", "generator CPU %", True),
]
for _s in MSG_SCENARIOS:
    METRICS[_s] = MSG_METRICS

POINT_COLS = ("scenario", "size", "conns", "rate", "group_size")


def fnum(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def inum(v, default=0):
    f = fnum(v)
    return default if f is None else int(round(f))


def num(v):
    """an int when whole (1000.0 -> 1000), else the float"""
    if v is None:
        return 0
    return int(v) if float(v).is_integer() else v


def parse_tag(tag):
    """MODE.SCENARIO.SIZE.c<conns>[.r<rate>][.k<K>].rep<N>, or the older
    MODE.SCENARIO.SIZE.r<N>; anything else: {}"""
    parts = tag.split(".")
    if len(parts) < 4:
        return {}
    info = {"mode": parts[0]}
    m = re.fullmatch(r"rep(\d+)", parts[-1]) or \
        re.fullmatch(r"r(\d+)", parts[-1])
    if not m:
        return {}
    info["rep"] = int(m.group(1))
    for p in parts[3:-1]:
        m = re.fullmatch(r"([crk])(\d+)", p)
        if m:
            info[{"c": "conns", "r": "rate", "k": "k"}[m.group(1)]] = \
                int(m.group(2))
    return info


def point_of(row, info):
    """(scenario, size, conns, rate, group_size); rate: msg/s (connect-storm:
    connects/s, 0 if unknown); group_size 0 where it does not apply"""
    sc = row["scenario"]
    size = inum(row.get("size"))
    conns = inum(row.get("conns"), info.get("conns", 0))
    if sc == "idle":
        rate, k = 0, 0
    elif sc == "connect-storm":
        rate, k = info.get("rate", 0), 0
    elif sc == "dm":
        rate, k = num(fnum(row.get("rate"))), 0
    else:
        rate = num(fnum(row.get("rate")))
        k = inum(row.get("group_size"), info.get("k", 0))
    return (sc, size, conns, rate, k)


def load(rawdir):
    path = os.path.join(rawdir, "runs.csv")
    if not os.path.exists(path):
        sys.exit("no runs.csv in %s" % rawdir)
    runs = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            info = parse_tag(row["tag"])
            row["_mode"] = info.get("mode", row["mode"])
            row["_rep"] = "r%d" % info.get("rep", 1)
            row["_point"] = point_of(row, info)
            kb = fnum(row.get("server_rss_after_kb"))
            row["server_rss_mib"] = kb / 1024.0 if kb and kb > 0 else None
            runs.append(row)
    return runs


def point_sort(p):
    sc, size, conns, rate, k = p
    return (SCENARIOS.index(sc) if sc in SCENARIOS else 99, size, k,
            float(rate), conns)


def deliveries(p):
    """deliveries/s offered at a point: msg/s x members (the sender's own
    copy included); None where it does not apply"""
    sc, size, conns, rate, k = p
    if sc == "dm":
        return rate * 2
    if sc == "group":
        return rate * k
    return None


def grp(n):
    return "{:,}".format(n) if isinstance(n, int) else "{:,.1f}".format(n)


def point_label(p):
    sc, size, conns, rate, k = p
    c = "%s conns" % grp(conns)
    if sc == "idle":
        return "idle %s" % c
    if sc == "connect-storm":
        if rate:
            return "connect-storm %s @ %s/s" % (c, grp(rate))
        return "connect-storm %s" % c
    if sc == "dm":
        return "dm %d B @ %s msg/s (%s)" % (size, grp(rate), c)
    if sc == "group":
        return "group K=%d, %d B @ %s msg/s = %s deliveries/s (%s)" % (
            k, size, grp(rate), grp(deliveries(p)), c)
    return "%s %d B @ %s msg/s, K=%d (%s)" % (sc, size, grp(rate), k, c)


def point_slug(p):
    sc, size, conns, rate, k = p
    s = "%s-%d-c%d" % (sc, size, conns)
    if rate:
        s += "-r%s" % rate
    if k:
        s += "-k%d" % k
    return s


def aggregate(runs):
    groups = {}
    for r in runs:
        groups.setdefault((r["_mode"],) + r["_point"], []).append(r)

    out = []
    for key in sorted(groups, key=lambda k: (point_sort(k[1:]), k[0])):
        rs = groups[key]
        mode, p = key[0], key[1:]
        sc = p[0]
        valid = [r for r in rs if r["valid"] == "1"]
        entry = {"mode": mode, "scenario": sc, "size": p[1],
                 "conns": p[2], "rate": p[3], "group_size": p[4],
                 "deliveries_per_s": deliveries(p),
                 "point": point_label(p),
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
        if valid and sc in MSG_SCENARIOS:
            srt = sorted(valid, key=lambda r: fnum(r["e2e_p99_ms"]) or 0)
            entry["median_tag"] = srt[len(srt) // 2]["tag"]
        out.append(entry)
    return out


def pkey(e):
    return tuple(e[c] for c in POINT_COLS)


def ratios(agg):
    """value of each mode / value of the baseline (chat if present) at the
    same point"""
    by = {(e["mode"],) + pkey(e): e for e in agg}
    for e in agg:
        e["ratios"] = {}
        for base in ("chat", "mock", "nchan"):
            b = by.get((base,) + pkey(e))
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


def fmt_ratio(r):
    if r >= 100:
        return "%.0f" % r
    if r >= 0.1 or r == 0:
        return "%.2f" % r
    return "%.2g" % r


def cell_text(e, col, ratio=True):
    mm = e["metrics"].get(col) if e else None
    if mm is None:
        return "-"
    s = fmt(mm["median"])
    if mm["n"] > 1:
        s += " [%s–%s]" % (fmt(mm["min"]), fmt(mm["max"]))
    if ratio:
        for base in ("chat", "mock"):
            rt = e.get("ratios", {}).get(base, {}).get(col)
            if rt is not None:
                s += " (×%s vs %s)" % (fmt_ratio(rt), base)
                break
    return s


def read_params(outdir, rawdir):
    for d in (outdir, rawdir):
        p = os.path.join(d, "params.txt")
        if os.path.exists(p):
            with open(p) as f:
                return f.read().rstrip()
    return ""


def machine_line(params):
    kv = {}
    for line in params.splitlines():
        for m in re.finditer(r"(\w+)=((?:\[[^\]]*\])|(?:[^ ]+))", line):
            kv.setdefault(m.group(1), m.group(2))
        if line.startswith("cpu="):
            kv["cpu"] = line[4:]
        if line.startswith("mem="):
            kv["mem"] = line[4:]
    bits = []
    if "nproc" in kv:
        bits.append("%s CPUs" % kv["nproc"])
    if "cpu" in kv:
        bits.append(kv["cpu"])
    if "mem" in kv:
        bits.append(kv["mem"] + " RAM")
    if "kernel" in kv:
        bits.append("Linux " + kv["kernel"])
    if "nginx" in kv:
        bits.append("nginx " + kv["nginx"])
    if "node" in kv:
        bits.append("Node " + kv["node"])
    if "server_cpus" in kv:
        bits.append("server on CPU %s, generator on CPU %s, %s nginx "
                    "worker(s)" % (kv.get("server_cpus"), kv.get("gen_cpus"),
                                   kv.get("server_workers", "?")))
    return "; ".join(bits)


def scenario_plots(sc, outdir):
    names = {"idle": ["memory-vs-conns.png"],
             "connect-storm": ["connect-rate.png"],
             "dm": ["latency-vs-rate-dm.png"]}.get(sc, [])
    if sc == "group":
        names = sorted(p for p in os.listdir(outdir)
                       if p.startswith("latency-vs-rate-group-"))
    return [p for p in names if os.path.exists(os.path.join(outdir, p))]


def write_md(outdir, rawdir, agg):
    lines = ["# chatbench summary", ""]
    params = read_params(outdir, rawdir)
    if params:
        ml = machine_line(params)
        if ml:
            lines += ["Machine: " + ml + ".", ""]
        lines += ["```", params, "```", ""]
    lines += [
        "Medians over valid repetitions; [min–max] is the spread. "
        "Ratios are this server's median over the baseline's at the same "
        "point, in the same run (chat = ngx_chat_module; mock = the Node "
        "stand-in, not a result). Group deliveries/s = msg/s × K, the "
        "sender's own copy included; the measured \"deliveries/s to "
        "others\" leaves it out.",
        ""]
    modes_present = [m for m in MODES if any(e["mode"] == m for e in agg)]
    for sc in SCENARIOS:
        es = [e for e in agg if e["scenario"] == sc]
        if not es:
            continue
        points = sorted({pkey(e) for e in es}, key=point_sort)
        cell = {(e["mode"], pkey(e)): e for e in es}
        cols = [m for m in modes_present if any(e["mode"] == m for e in es)]
        lines += ["## " + sc, ""]

        if sc in MSG_SCENARIOS:
            # at a glance: one row per point
            lines.append("| point | " + " | ".join(
                "%s e2e p50 / p99 (ms)" % m for m in cols) + " |")
            lines.append("|---|" + "---|" * len(cols))
            for p in points:
                row = []
                for m in cols:
                    e = cell.get((m, p))
                    mm = e["metrics"] if e else {}
                    if "e2e_p99_ms" not in mm:
                        row.append("-")
                        continue
                    s = "%s / %s" % (fmt(mm["e2e_p50_ms"]["median"]),
                                     fmt(mm["e2e_p99_ms"]["median"]))
                    rt = e["ratios"].get("chat", {}).get("e2e_p99_ms")
                    if rt is not None:
                        s += " (p99 ×%s vs chat)" % fmt_ratio(rt)
                    row.append(s)
                lines.append("| %s | %s |" % (point_label(p), " | ".join(row)))
            lines.append("")

        lines.append("| point | metric | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        invalid = []
        for p in points:
            first = True
            for col, label, _ in METRICS[sc]:
                row = [cell_text(cell.get((m, p)), col) for m in cols]
                lines.append("| %s | %s | %s |" % (
                    "**%s**" % point_label(p) if first else "", label,
                    " | ".join(row)))
                first = False
            lines.append("|  | valid runs | %s |" % " | ".join(
                "%d/%d" % (cell[(m, p)]["valid_runs"], cell[(m, p)]["runs"])
                if (m, p) in cell else "-" for m in cols))
            for m in cols:
                if (m, p) in cell:
                    invalid += cell[(m, p)]["invalid"]
        lines.append("")
        for inv in invalid:
            lines.append("- INVALID " + inv)
        if invalid:
            lines.append("")
        for png in scenario_plots(sc, outdir):
            lines += ["![%s](%s)" % (png, png), ""]
        if sc in MSG_SCENARIOS:
            links = []
            for p in points:
                png = "latency-%s.png" % point_slug(p)
                if os.path.exists(os.path.join(outdir, png)):
                    links.append("[%s](%s)" % (point_label(p), png))
            if links:
                lines += ["Latency by percentile (median run of each "
                          "server): " + "; ".join(links) + ".", ""]
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_csv(outdir, agg):
    with open(os.path.join(outdir, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "scenario", "size", "conns", "rate",
                    "group_size", "deliveries_per_s", "point", "metric", "n",
                    "median", "min", "max", "spread_pct", "ratio_vs_chat",
                    "ratio_vs_nchan", "valid_runs", "runs"])
        for e in agg:
            for col, m in e["metrics"].items():
                w.writerow([e["mode"], e["scenario"], e["size"], e["conns"],
                            e["rate"], e["group_size"],
                            "" if e["deliveries_per_s"] is None
                            else e["deliveries_per_s"],
                            e["point"], col, m["n"],
                            m["median"], m["min"], m["max"],
                            "%.1f" % m["spread_pct"],
                            e["ratios"].get("chat", {}).get(col, ""),
                            e["ratios"].get("nchan", {}).get(col, ""),
                            e["valid_runs"], e["runs"]])


# ---- plots ----

def q(text):
    """a gnuplot single-quoted string"""
    return "'" + str(text).replace("'", "''") + "'"


def _has_cairo():
    try:
        r = subprocess.run(["gnuplot", "-e", "set terminal"],
                           capture_output=True, text=True, timeout=20)
        return "pngcairo" in (r.stdout + r.stderr)
    except (OSError, subprocess.SubprocessError):
        return False


def _mmm(e, col):
    """median, min, max of a metric, or None"""
    mm = e["metrics"].get(col)
    if not mm:
        return None
    return (mm["median"], mm["min"], mm["max"])


def _write_dat(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(" ".join("%g" % v for v in row) + "\n")


def _main_size(agg, sc):
    """the body size the sweep was run at: 64 if present, else the size
    with the most points"""
    sizes = {}
    for e in agg:
        if e["scenario"] == sc:
            sizes.setdefault(e["size"], set()).add(pkey(e))
    if not sizes:
        return None
    if 64 in sizes:
        return 64
    return max(sizes, key=lambda s: len(sizes[s]))


def latency_plot(pdir, outdir, name, title, xlabel, series):
    """series: [(title, color index, point type, [(x, entry)])] -> gnuplot
    lines: e2e p99 solid, p50 dashed, min-max of the repetitions as error
    bars"""
    plots = []
    for stitle, color, pt, pts in series:
        rows = []
        for x, e in sorted(pts, key=lambda t: t[0]):
            p50, p99 = _mmm(e, "e2e_p50_ms"), _mmm(e, "e2e_p99_ms")
            if not p50 or not p99 or min(p50 + p99) <= 0:
                continue
            rows.append((x,) + p50 + p99)
        if not rows:
            continue
        dat = os.path.join(pdir, "%s-%d.dat" % (name, len(plots)))
        _write_dat(dat, rows)
        plots.append("%s using 1:5:6:7 with yerrorlines lc %d dt 1 pt %d "
                     "lw 2 title %s" % (q(dat), color, pt, q(stitle + " p99")))
        plots.append("%s using 1:2:3:4 with yerrorlines lc %d dt 2 pt %d "
                     "lw 1 title %s" % (q(dat), color, pt, q(stitle + " p50")))
    if not plots:
        return []
    return [
        "set output %s" % q(os.path.join(outdir, name + ".png")),
        "set title %s" % q(title),
        "set logscale x", "set logscale y", "set offsets graph 0.05, "
        "graph 0.05, 0, 0",
        "set xlabel %s" % q(xlabel), "set ylabel 'e2e latency (ms)'",
        "set key outside right top",
        "plot " + ", ".join(plots),
        "unset logscale x", "unset logscale y", "set offsets 0, 0, 0, 0",
        "set key inside top left",
    ]


def plots(rawdir, outdir, agg):
    if shutil.which("gnuplot") is None:
        print("gnuplot not found: no plots")
        return
    pdir = os.path.join(rawdir, "plot-data")
    os.makedirs(pdir, exist_ok=True)
    script = ["set terminal pngcairo size 1000,600 noenhanced" if
              _has_cairo() else "set terminal png size 1000,600 noenhanced",
              "set grid", "set key top left"]
    modes = [m for m in MODES if any(e["mode"] == m for e in agg)]
    color = {m: MODES.index(m) + 1 for m in modes}

    # (a) dm: e2e p50/p99 vs msg/s, one line per server
    size = _main_size(agg, "dm")
    if size is not None:
        series = []
        for m in modes:
            pts = [(e["rate"], e) for e in agg if e["mode"] == m and
                   e["scenario"] == "dm" and e["size"] == size]
            series.append((m, color[m], 7, pts))
        script += latency_plot(
            pdir, outdir, "latency-vs-rate-dm",
            "dm (1:1), %d B: e2e latency vs rate (median of runs, bars: "
            "min-max)" % size,
            "msg/s offered (= deliveries/s to the other member)", series)

    # (b) group: e2e p50/p99 vs deliveries/s; K=10 on its own, other K
    # together (one line per server and K)
    size = _main_size(agg, "group")
    if size is not None:
        ks = sorted({e["group_size"] for e in agg
                     if e["scenario"] == "group" and e["size"] == size})
        sets = [[10], [k for k in ks if k != 10]] if 10 in ks else [ks]
        pts_types = {k: 5 + 2 * i for i, k in enumerate(ks)}
        for kset in sets:
            if not kset:
                continue
            series = []
            for m in modes:
                for k in kset:
                    pts = [(e["deliveries_per_s"], e) for e in agg
                           if e["mode"] == m and e["scenario"] == "group"
                           and e["size"] == size and e["group_size"] == k]
                    t = m if len(kset) == 1 else "%s K=%d" % (m, k)
                    series.append((t, color[m], pts_types[k], pts))
            script += latency_plot(
                pdir, outdir,
                "latency-vs-rate-group-k" + "-".join(str(k) for k in kset),
                "group K=%s, %d B: e2e latency vs deliveries/s (median of "
                "runs, bars: min-max)" % (", ".join(map(str, kset)), size),
                "deliveries/s offered (msg/s x K, the sender's copy "
                "included)", series)

    # latency spectrum per point: one line per server (median run)
    for p in sorted({pkey(e) for e in agg if e["scenario"] in MSG_SCENARIOS},
                    key=point_sort):
        series = []
        for e in agg:
            if pkey(e) != p or not e.get("median_tag"):
                continue
            h = os.path.join(rawdir, e["median_tag"] + ".e2e.hgrm")
            if os.path.exists(h) and os.path.getsize(h) > 80:
                series.append((e["mode"], h))
        if not series:
            continue
        script += [
            "set output %s" % q(os.path.join(
                outdir, "latency-%s.png" % point_slug(p))),
            "set title %s" % q("end-to-end latency by percentile: %s "
                               "(median run)" % point_label(p)),
            "set logscale x", "set logscale y",
            "set xlabel 'percentile'", "set ylabel 'ms'",
            "set xtics ('50%%' 2, '90%%' 10, '99%%' 100, "
            "'99.9%%' 1000, '99.99%%' 10000)",
            "plot " + ", ".join(
                "%s using 4:1 with lines lw 2 lc %d title %s"
                % (q(h), color[m], q(m)) for m, h in series),
            "unset logscale x", "unset logscale y", "set xtics auto",
        ]

    # (c) idle: server RSS per connection and in total vs connections
    idle = [e for e in agg if e["scenario"] == "idle"]
    if idle:
        panels = []
        for col, ylabel, ptitle in (
                ("rss_per_conn_b", "bytes per connection",
                 "server RSS per idle connection"),
                ("server_rss_mib", "MiB",
                 "server RSS with all connections up")):
            plots_ = []
            for m in modes:
                rows = []
                for e in sorted((e for e in idle if e["mode"] == m),
                                key=lambda e: e["conns"]):
                    v = _mmm(e, col)
                    if v:
                        rows.append((e["conns"],) + v)
                if rows:
                    dat = os.path.join(pdir, "idle-%s-%s.dat" % (col, m))
                    _write_dat(dat, rows)
                    plots_.append("%s using 1:2:3:4 with yerrorlines "
                                  "lc %d pt 7 lw 2 title %s"
                                  % (q(dat), color[m], q(m)))
            if plots_:
                panels.append((ptitle, ylabel, plots_))
        if panels:
            script += [
                "set output %s" % q(os.path.join(outdir,
                                                 "memory-vs-conns.png")),
                "set multiplot layout 1,%d title 'idle connections "
                "(median of runs, bars: min-max)'" % len(panels),
                "set logscale x", "set offsets graph 0.05, graph 0.05, 0, 0",
                "set key inside top right",
                "set xlabel 'idle connections'", "set yrange [0:*]",
            ]
            for ptitle, ylabel, pl in panels:
                script += ["set title %s" % q(ptitle),
                           "set ylabel %s" % q(ylabel),
                           "plot " + ", ".join(pl)]
            script += ["unset multiplot", "unset logscale x",
                       "set key inside top left",
                       "set offsets 0, 0, 0, 0", "set yrange [*:*]"]

    # connect-storm: connects/s achieved, bars per point
    storm = [e for e in agg if e["scenario"] == "connect-storm"]
    if storm:
        smodes = [m for m in modes if any(e["mode"] == m for e in storm)]
        pts = sorted({pkey(e) for e in storm}, key=point_sort)
        dat = os.path.join(pdir, "connect-rate.dat")
        with open(dat, "w") as f:
            f.write("point " + " ".join(smodes) + "\n")
            for p in pts:
                vals = []
                for m in smodes:
                    e = next((x for x in storm if x["mode"] == m and
                              pkey(x) == p), None)
                    v = _mmm(e, "connect_rate") if e else None
                    vals.append("%g" % v[0] if v else "NaN")
                f.write('"%s" %s\n' % (point_label(p), " ".join(vals)))
        script += [
            "set output %s" % q(os.path.join(outdir, "connect-rate.png")),
            "set title 'connect-storm: connects per second achieved "
            "(median of runs)'",
            "set ylabel 'connects/s'", "set xlabel ''",
            "set style data histogram", "set style histogram cluster gap 1",
            "set style fill solid 0.8 border -1", "set boxwidth 0.9",
            "set yrange [0:*]",
            "plot " + ", ".join(
                "%s using %d:xtic(1) lc %d title columnheader(%d)"
                % (q(dat), i + 2, color[m], i + 2)
                for i, m in enumerate(smodes)),
            "set yrange [*:*]", "set style data lines",
        ]

    gp = os.path.join(pdir, "plots.gp")
    with open(gp, "w") as f:
        f.write("\n".join(script) + "\n")
    r = subprocess.run(["gnuplot", gp], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        print("gnuplot failed:", r.stderr[-2000:])


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
    write_md(outdir, rawdir, agg)
    # a compact table on stdout
    for e in agg:
        m = e["metrics"]
        key = "%-9s %-58s" % (e["mode"], e["point"])
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
