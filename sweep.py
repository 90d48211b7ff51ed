"""
The sweep behind config/gutenberg.py: a few shapes and settings, each trained by train.py for the
same wall-clock budget on the same machine, each measured by eval.py on all the held-out books.

    python sweep.py                     # every run below: about 11 minutes each on 2 CPU cores
    python sweep.py --runs=default,lr3e-3 --max_time=300

Each run's max_iters is chosen so that its cosine schedule ends within the budget on a 2-core
CPU (from its measured ms/iter); max_time stops it anyway on a slower machine, and the table then
says so. Results go to out-sweep/<run>/ and, as a table, to out-sweep/sweep.md.
"""

import os
import re
import subprocess
import sys
import time

from configurator import configure

# -----------------------------------------------------------------------------
runs = ""  # comma-separated names from RUNS; "" = all
max_time = 600.0  # the budget of every run, in seconds
# -----------------------------------------------------------------------------
RUNS = {  # name: overrides of config/gutenberg.py
    "default": [],
    "bf16": ["--dtype=bfloat16", "--max_iters=1100"],  # bf16 autocast: about 2x the speed on CPUs with AMX
    "bf16-6x256": ["--dtype=bfloat16", "--n_layer=6", "--max_iters=950"],
    "bf16-llama": ["--dtype=bfloat16", "--arch=llama", "--n_kv_head=2", "--moe_every=0", "--d_ff=1024",
                   "--max_iters=1000"],
}


def main(c: dict) -> None:
    names = [n.strip() for n in c["runs"].split(",") if n.strip()] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"error: unknown run(s) {', '.join(unknown)}: choose among {', '.join(RUNS)}")
    os.makedirs("out-sweep", exist_ok=True)
    table = ["| run | overrides of config/gutenberg.py | iterations | wall | tokens/s | val bits/byte (eval.py) |",
             "|---|---|---|---|---|---|"]
    for name in names:
        out = os.path.join("out-sweep", name)
        cmd = [sys.executable, "train.py", "config/gutenberg.py", *RUNS[name], f"--out_dir={out}",
               f"--max_time={c['max_time']}"]
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        log = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if log.returncode:
            raise SystemExit(f"error: run {name} failed:\n{log.stderr[-2000:]}")
        done = re.search(r"done: (\d+) iterations", log.stdout)
        speeds = sorted(float(s.replace(",", "")) for s in re.findall(r"([\d,]+) tokens/s", log.stdout))
        stopped = " (stopped by max_time)" if "reached at iteration" in log.stdout else ""
        ev = subprocess.run([sys.executable, "eval.py", f"--out_dir={out}"], capture_output=True, text=True, check=True)
        bpb = float(re.search(r"([\d.]+) bits per byte", ev.stdout)[1])
        row = (f"| {name} | {' '.join(RUNS[name]) or '(none)'} | {done[1] if done else '?'}{stopped} | "
               f"{wall / 60:.1f} min | {speeds[len(speeds) // 2]:,.0f} | {bpb:.4f} |")
        print(row, flush=True)
        table.append(row)
        with open("out-sweep/sweep.md.tmp", "w") as f:
            f.write("\n".join(table) + "\n")
        os.replace("out-sweep/sweep.md.tmp", "out-sweep/sweep.md")
    print("\n" + "\n".join(table) + "\n\nwritten to out-sweep/sweep.md")


if __name__ == "__main__":
    main(configure(globals()))
