"""
The sweep behind config/gutenberg.py: a few shapes and settings, each trained by train.py for the
same wall-clock budget on the same machine, each measured by eval.py on all the held-out books.

    python sweep.py                     # every run below: about 11 minutes each on 2 CPU cores
    python sweep.py --runs=default,lr3e-3 --max_time=300   # some of them, on a smaller budget

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
    "default": [],  # a dense Llama of 4 x 256, bf16 autocast, 1000 iterations
    "lr3e-3": ["--learning_rate=3e-3"],
    # a smaller vocabulary: a cheaper output layer, fewer bytes per token (python prepare.py --vocab_size=4096)
    "bpe4096": ["--data_dir=data/gutenberg_bpe4096", "--max_iters=1050"],
    "compile": ["--compile=True", "--max_iters=1150"],
    "gpt": ["--arch=gpt", "--max_iters=1100"],  # the course's GPT (learned positions, LayerNorm, GELU)
    "gpt-fp32": ["--arch=gpt", "--dtype=float32", "--max_iters=500"],  # float32: half the speed here
    "gpt-6x256": ["--arch=gpt", "--n_layer=6", "--max_iters=950"],
}


def main(c: dict) -> None:
    names = [n.strip() for n in c["runs"].split(",") if n.strip()] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"error: unknown run(s) {', '.join(unknown)}: choose among {', '.join(RUNS)}")
    os.makedirs("out-sweep", exist_ok=True)
    table = ["| run | overrides of config/gutenberg.py | iterations | wall | tokens/s | val bits/byte (eval.py) |",
             "|---|---|---|---|---|---|"]
    rows = {}  # the rows of earlier sweeps stay in the table until their run is redone
    if os.path.exists("out-sweep/sweep.md"):
        with open("out-sweep/sweep.md") as f:
            rows = {line.split("|")[1].strip(): line.rstrip("\n") for line in f.readlines()[2:] if line.startswith("| ")}
    for name in names:
        out = os.path.join("out-sweep", name)
        cmd = [sys.executable, "train.py", "config/gutenberg.py", *RUNS[name], f"--out_dir={out}",
               f"--max_time={c['max_time']}", "--overwrite=True"]  # a run redone replaces its own out_dir
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        log = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if log.returncode:
            raise SystemExit(f"error: run {name} failed:\n{log.stderr[-2000:]}")
        done = re.search(r"done: (\d+) iterations", log.stdout)
        speeds = sorted(float(s.replace(",", "")) for s in re.findall(r"([\d,]+) tokens/s", log.stdout))
        fitted = re.search(r"(\d+) of the max_iters=\d+ iterations fit", log.stdout)
        stopped = f" ({fitted.group(1)} fitted in max_time)" if fitted else ""
        stopped = " (stopped by max_time)" if "reached at iteration" in log.stdout else stopped
        ev = subprocess.run([sys.executable, "eval.py", f"--out_dir={out}"], capture_output=True, text=True)
        if ev.returncode:
            raise SystemExit(f"error: eval.py on run {name} failed:\n{ev.stderr[-2000:]}")
        bpb = float(re.search(r"([\d.]+) bits per byte", ev.stdout)[1])
        speed = f"{speeds[len(speeds) // 2]:,.0f}" if speeds else "?"  # the median of the logged rates
        row = (f"| {name} | {' '.join(RUNS[name]) or '(none)'} | {done[1] if done else '?'}{stopped} | "
               f"{wall / 60:.1f} min | {speed} | {bpb:.4f} |")
        print(row, flush=True)
        rows[name] = row
        table = table[:2] + [rows[n] for n in RUNS if n in rows]
        with open("out-sweep/sweep.md.tmp", "w") as f:
            f.write("\n".join(table) + "\n")
        os.replace("out-sweep/sweep.md.tmp", "out-sweep/sweep.md")
    print("\n" + "\n".join(table) + "\n\nwritten to out-sweep/sweep.md")


if __name__ == "__main__":
    main(configure(globals()))
