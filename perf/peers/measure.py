#!/usr/bin/env python3
"""Run one command as a whole process and measure it.

    measure.py --timeout T --json J --log L [--env K=V ...] -- CMD...

Runs `/usr/bin/time -v -o TIMEFILE timeout -k 10 T CMD` with stdout+stderr to L, and records in J:
  wall_s                  perf_counter around the whole thing (process start-up included)
  exit_code, timed_out    (timeout's 124 / 137 mean the cap was hit)
  time_v                  GNU time's fields: max_rss_kb, user_s, sys_s, cpu_percent, elapsed, ...
  tree_peak_rss_kb        peak of the summed RSS of the whole process tree (every descendant of
                          the time process, and every process in their process groups), sampled
                          from /proc every 100 ms.  Needed for PyFlink, whose JVM is not a child
                          that the Python client waits for, so time -v sees only the client.
                          Can miss peaks shorter than 100 ms.
  tree_peak_procs         most processes seen in the tree at once
  loadavg_before          /proc/loadavg just before the start
  log_tail                the last lines of L
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def proc_table():
    """pid -> (ppid, pgid, rss_kb) for every process we can read."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # the command name (field 2) may contain spaces and parentheses: split after the last ')'
        rest = data[data.rfind(b")") + 2 :].split()
        try:
            ppid, pgid, rss_pages = int(rest[1]), int(rest[2]), int(rest[21])
        except (IndexError, ValueError):
            continue
        out[int(name)] = (ppid, pgid, rss_pages * PAGE_KB)
    return out


def tree_rss(root):
    table = proc_table()
    children = {}
    for pid, (ppid, _pgid, _rss) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, stack = set(), [root]
    while stack:
        p = stack.pop()
        if p in tree or p not in table:
            continue
        tree.add(p)
        stack.extend(children.get(p, ()))
    groups = {table[p][1] for p in tree}
    groups.discard(os.getpgid(0))  # never count our own group (the harness)
    for pid, (_ppid, pgid, _rss) in table.items():
        if pgid in groups:
            tree.add(pid)
    tree.discard(os.getpid())
    return sum(table[p][2] for p in tree if p in table), len(tree)


TIME_FIELDS = {
    "Maximum resident set size (kbytes)": ("max_rss_kb", int),
    "User time (seconds)": ("user_s", float),
    "System time (seconds)": ("sys_s", float),
    "Percent of CPU this job got": (
        "cpu_percent",
        lambda s: int(s.rstrip("%")) if s.rstrip("%").isdigit() else None,
    ),
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": ("elapsed", str),
    "Major (requiring I/O) page faults": ("major_faults", int),
    "Minor (reclaiming a frame) page faults": ("minor_faults", int),
    "Voluntary context switches": ("voluntary_cs", int),
    "Involuntary context switches": ("involuntary_cs", int),
    "Exit status": ("time_exit_status", int),
}


def parse_time_v(path):
    res = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, val = line.strip().rpartition(": ")
                if key in TIME_FIELDS:
                    name, conv = TIME_FIELDS[key]
                    try:
                        res[name] = conv(val)
                    except ValueError:
                        res[name] = val
    except OSError:
        pass
    return res


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return lines[-n:]
    except OSError:
        return []


def run(cmd, timeout_s, log, env=None):
    with open("/proc/loadavg") as f:
        load = f.read().strip()
    fd, timefile = tempfile.mkstemp(prefix="peers-time-", suffix=".txt")
    os.close(fd)
    full = ["/usr/bin/time", "-v", "-o", timefile, "timeout", "-k", "10", str(timeout_s)] + cmd
    peak, peak_procs, stop = [0], [0], threading.Event()
    with open(log, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT, env=env)

        def sample():
            while not stop.is_set():
                rss, n = tree_rss(proc.pid)
                peak[0] = max(peak[0], rss)
                peak_procs[0] = max(peak_procs[0], n)
                stop.wait(0.1)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        code = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    tv = parse_time_v(timefile)
    os.unlink(timefile)
    # GNU time reports the child's status; timeout exits 124 (TERM) or 137 (KILL) when it fires
    return {
        "cmd": cmd,
        "wall_s": round(wall, 4),
        "exit_code": code,
        "timed_out": code in (124, 137),
        "timeout_s": timeout_s,
        "time_v": tv,
        "tree_peak_rss_kb": peak[0],
        "tree_peak_procs": peak_procs[0],
        "loadavg_before": load,
        "log": log,
        "log_tail": tail(log),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--env", action="append", default=[], help="K=V added to the command's environment")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command")
    env = dict(os.environ)
    for kv in a.env:
        k, _, v = kv.partition("=")
        env[k] = v
    timeout = int(a.timeout) if a.timeout == int(a.timeout) else a.timeout
    res = run(cmd, timeout, a.log, env)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(
        f"wall {res['wall_s']:.2f} s, exit {res['exit_code']}, "
        f"rss time-v {res['time_v'].get('max_rss_kb', 0) / 1024:.0f} MB, tree {res['tree_peak_rss_kb'] / 1024:.0f} MB",
        file=sys.stderr,
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
