"""The benchmark's reports: the console table, the lines against issue 16's targets, Markdown
and a bar chart. Every one shows luafcgid's distance to the floor."""

import datetime
import os
import shlex

from bench.peers import FASTCGI, MODES, label
from bench.workloads import WORKLOADS

COLUMNS = ["peer", "mode", "workload", "conns", "req/s", "p50 ms", "p99 ms", "errors", "RSS MB",
           "CPU µs/req", "luafcgid/peer"]
RIGHT = {4, 5, 6, 7, 8, 9, 10}


def ok(results, key):
    r = results.get(key)
    return r if r is not None and "error" not in r else None


def table_rows(results, order):
    """One row per measured (peer, mode, workload, conns). The ratio compares luafcgid with a
    FastCGI peer behind the same nginx lines (same mode) only; none against the ceilings."""
    rows = []
    for key in order:
        peer, mode, workload, conns = key
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            rows.append([peer, mode or "-", workload, str(conns), "failed"] + ["-"] * 6)
            continue
        ratio = "-"
        ref = ok(results, ("luafcgid", mode, workload, conns))
        if peer in FASTCGI and ref and r["rps"] > 0:
            ratio = "%.2f" % (ref["rps"] / r["rps"])
        rows.append([peer, mode or "-", workload, str(conns), "%.0f" % r["rps"], "%.2f" % r["p50_ms"],
                     "%.2f" % r["p99_ms"], str(r["errors"]),
                     "%.1f" % r["rss_mb"], "%.0f" % r["cpu_us"], ratio])
    return rows


def summary(results, connections, lua_cost):
    """luafcgid against the targets of issue 16, from this run's figures: lines of text.
    `lua_cost`: CPU µs of one call of the page's main() in one LuaJIT state, or None."""
    conns = 16 if 16 in connections else connections[0]

    def get(peer, mode, workload, field="rps"):
        r = ok(results, (peer, mode, workload, conns))
        return r[field] if r else None

    def ratio(peer, mode, workload, peer_mode=None):
        ours, theirs = get("luafcgid", mode, workload), get(peer, peer_mode or mode, workload)
        return "%.2f" % (ours / theirs) if ours and theirs else "n/a"

    def us(value):
        return "n/a" if value is None else "%.0f" % value

    at = "%d conns" % conns
    fpm = {m: get("php-fpm", m, "hello") for m in MODES}
    best = max((m for m in MODES if fpm[m]), key=lambda m: fpm[m], default=None)
    lines = [
        "plain, hello, %s: luafcgid/php-fpm %s (target >= 1.0), luafcgid/c-original %s (target >= 1.2)"
        % (at, ratio("php-fpm", "plain", "hello"), ratio("c-original", "plain", "hello")),
        "plain, hello, %s: backend CPU µs/req luafcgid %s, php-fpm %s (target: luafcgid <= php-fpm)"
        % (at, us(get("luafcgid", "plain", "hello", "cpu_us")), us(get("php-fpm", "plain", "hello", "cpu_us"))),
        "at their best, hello, %s: luafcgid keepalive/php-fpm %s %s (target >= 1.0, aim 1.3)"
        % (at, best or "-", ratio("php-fpm", "keepalive", "hello", best)),
        "plain, page, %s: luafcgid/floor %s (target >= 0.9), luafcgid/wsapi %s (target >= 1.4), "
        "luafcgid/c-original %s (target >= 1.5)"
        % (at, ratio("floor", "plain", "page"), ratio("wsapi", "plain", "page"),
           ratio("c-original", "plain", "page")),
    ]
    for mode in MODES:
        lines.append("%s, %s: luafcgid/floor hello %s, page %s" % (
            mode, at, ratio("floor", mode, "hello"), ratio("floor", mode, "page")))
    for mode in MODES:
        page, hello, floor = (get(p, mode, w, "cpu_us") for p, w in
                              (("luafcgid", "page"), ("luafcgid", "hello"), ("floor", "page")))
        overhead = page - lua_cost if page is not None and lua_cost is not None else None
        floor_overhead = floor - lua_cost if floor is not None and lua_cost is not None else None
        lines.append("%s, %s: page overhead (CPU µs per page %s minus %s µs of Lua in main()) %s, beside "
                     "CPU µs per hello %s (target: overhead <= CPU per hello); the floor's overhead %s"
                     % (mode, at, us(page), us(lua_cost), us(overhead), us(hello), us(floor_overhead)))
    for many in [c for c in connections if c != 16]:
        for mode in MODES:
            errors, worst = 0, None
            for workload in WORKLOADS:
                ours = ok(results, ("luafcgid", mode, workload, many))
                theirs = ok(results, ("php-fpm", mode, workload, many))
                if ours:
                    errors += ours["errors"]
                if ours and theirs and theirs["p99_ms"] > 0:
                    p99 = ours["p99_ms"] / theirs["p99_ms"]
                    worst = p99 if worst is None else max(worst, p99)
            lines.append("%s, %d conns: luafcgid errors %d (target 0); worst p99 luafcgid/php-fpm %s "
                         "(target <= 1)" % (mode, many, errors, "%.2f" % worst if worst else "n/a"))
    return lines


def text_table(rows):
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(COLUMNS), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown(rows, targets, args, notes, argv):
    lines = ["# luafcgid benchmark", "",
             "- date: %s" % datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z"),
             "- nproc: %d" % os.cpu_count(),
             "- command: `%s`" % " ".join(shlex.quote(a) for a in argv),
             "- duration per run: %gs, rounds: %d, wrk threads: %d, nginx workers: %d"
             % (args.duration, args.rounds, args.threads, args.nginx_workers),
             ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---:" if i in RIGHT else "---" for i in range(len(COLUMNS))) + "|")
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    lines.append("mode: plain = a new connection per request (`fastcgi_pass unix:...`); keepalive = an "
                 "upstream block with `keepalive N` and `fastcgi_keep_conn on`. floor: the least a Python + "
                 "lupa FastCGI responder does (bench/floor.py). req/s: requests per "
                 "second; p50/p99: latency percentiles from wrk; errors: non-2xx/3xx responses + socket "
                 "errors; RSS: resident memory of the backend's process tree after the run (nginx itself "
                 "for the nginx peers); CPU µs/req: the CPU time the backend's process tree used during "
                 "the run per request answered (on a busy machine the steadier measure); luafcgid/peer: "
                 "luafcgid's req/s divided by the peer's, same mode.")
    lines += ["", "Against the targets:", ""] + ["- " + t for t in targets]
    if notes:
        lines += ["", "Notes:", ""] + ["- " + n for n in notes]
    return "\n".join(lines) + "\n"


def plot(results, order, path):
    """Requests/s per (workload, conns), one bar per peer and mode; luafcgid's bars are
    labelled with their share of the floor's requests/s in the same mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, series = [], []
    for peer, mode, workload, conns in order:
        if (workload, conns) not in groups:
            groups.append((workload, conns))
        if (peer, mode) not in series:
            series.append((peer, mode))
    fig, ax = plt.subplots(figsize=(max(8, 2.0 * len(groups)), 5))
    width = 0.8 / max(1, len(series))
    for i, (peer, mode) in enumerate(series):
        xs, ys = [], []
        for g, (workload, conns) in enumerate(groups):
            r = ok(results, (peer, mode, workload, conns))
            if not r:
                continue
            x = g + (i - (len(series) - 1) / 2.0) * width
            xs.append(x)
            ys.append(r["rps"])
            floor = ok(results, ("floor", mode, workload, conns))
            if peer == "luafcgid" and floor:
                ax.text(x, r["rps"] * 1.1, "%.2f× floor" % (r["rps"] / floor["rps"]), rotation=90,
                        ha="center", va="bottom", fontsize=7)
        ax.bar(xs, ys, width, label=label(peer, mode), hatch="//" if mode == "keepalive" else None)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(["%s\n%d conns" % g for g in groups])
    ax.set_ylabel("requests/s")
    ax.set_yscale("log")
    ax.set_title("luafcgid benchmark (nproc %d)" % os.cpu_count(), pad=40)
    ax.legend(ncol=min(5, len(series)), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
              fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
