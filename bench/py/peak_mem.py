"""Run a command and report the peak memory of its whole process tree: the sum of every process's
proportional set size (PSS, /proc/<pid>/smaps_rollup), sampled every 0.2 s. A DataLoader's worker
processes share the parent's libraries copy-on-write: summing their RSS would count those pages
once per process, PSS counts each page once. For one process PSS is its RSS less what it shares.

Usage: peak_mem.py OUT_FILE CMD...  (the command's exit status is passed on; OUT_FILE gets
`peak_pss_mib N`).
"""

import os
import subprocess
import sys
import time


def tree(root):
    children = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    out_file, cmd = sys.argv[1], sys.argv[2:]
    p = subprocess.Popen(cmd)
    peak = 0
    while p.poll() is None:
        peak = max(peak, sum(pss_kib(q) for q in tree(p.pid)))
        time.sleep(0.2)
    with open(out_file, "w") as f:
        f.write(f"peak_pss_mib {peak / 1024:.0f}\n")
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
