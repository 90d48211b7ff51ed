"""
The sweep behind config/gutenberg.py: a few shapes and settings, each trained by train.py on the
same machine, each measured by eval.py on all the held-out books.

    python sweep.py                     # every run for the same 10 minutes (schedules fitted by max_time)
    python sweep.py --runs=default,adamw --max_time=300   # some of them, on a smaller budget
    python sweep.py --fixed_compute=True --device=cuda    # every run for the same FLOPs, on a GPU

With a wall-clock budget, train.py counts the iterations that fit and ends each run's schedule
there. With fixed_compute, each run trains the iterations written beside it: those of the FLOPs of
1,400 iterations of 4,096 tokens on 4 layers of width 256 (what fit in 10 minutes on a 2-core CPU
with AMX when the sweep was made, 2026-11-26; the code is faster now), by model.flops_per_token:
1,687 for the default's 3 layers (a test checks every count).
At a fixed number of tokens the loss does not depend on the hardware, so a GPU can sweep what a
CPU trains. Results go to out-sweep/<run>/ and, as a table, to out-sweep/sweep.md.
"""

import os
import re
import subprocess
import sys
import time

from configurator import configure, file_names
from tokenizer import prepare_command

# -----------------------------------------------------------------------------
runs = ""  # comma-separated names from RUNS; "" = all
max_time = 600.0  # the budget of every run, in seconds (without fixed_compute)
fixed_compute = False  # train each run for its iterations of RUNS (the same FLOPs) instead of max_time
device = ""  # passed to train.py and eval.py; "" = their default
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.abspath(__file__))  # train.py, eval.py, config/; out-sweep/ goes to the working folder
TIED = ["--tie_embeddings=True", "--embedding_lr=0"]
RUNS = {  # name: (overrides of config/gutenberg.py, iterations of the same FLOPs as 1,400 of 4 x 256)
    "default": ([], 1687),  # a dense Llama of 3 x 256, bf16, Muon, an untied token table at 2e-2
    "tied": (TIED, 1687),
    "adamw": (["--optimizer=adamw", *TIED], 1687),  # the earlier recipe
    "muon4e-3": (["--learning_rate=4e-3"], 1687),
    "4-layers": (["--n_layer=4"], 1400),  # the earlier default's shape
    "2-layers": (["--n_layer=2"], 2121),
    "6-layers": (["--n_layer=6"], 1045),
    "width192": (["--n_embd=192", "--n_head=3", "--n_kv_head=3", "--d_ff=768"], 2523),
    "batch8": (["--batch_size=8", "--warmup_iters=100"], 3373),  # twice the steps, of half the tokens
    # a smaller vocabulary: a cheaper output layer, fewer bytes per token
    # (python prepare.py --vocab_size=4096 first)
    "bpe4096": (["--data_dir=data/gutenberg_bpe4096"], 2090),
    "gpt": (["config/gpt.py", "--optimizer=adamw"], 1892),  # the course's GPT: learned positions, GELU
}


def main(c: dict) -> None:
    names = [n.strip() for n in c["runs"].split(",") if n.strip()] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"error: unknown run(s) {', '.join(unknown)}: choose among {', '.join(RUNS)}")
    for name in names:  # every run's data first: a missing folder would stop the sweep hours in
        args = train_args(RUNS[name][0])
        given = [a.removeprefix("--data_dir=") for a in args if a.startswith("--data_dir=")]
        data_dir = given[-1] if given else file_names(args[0])["data_dir"]
        if not os.path.exists(os.path.join(data_dir, "meta.json")):
            raise SystemExit(f"error: run {name} trains on {data_dir}, which is not prepared here: run "
                             f"{prepare_command(data_dir)} first, or leave the run out (--runs=...)")
    os.makedirs("out-sweep", exist_ok=True)
    table = ["| run | overrides of config/gutenberg.py | iterations | wall | tokens/s | "
             "val bits/byte (eval.py) |",
             "|---|---|---|---|---|---|"]
    rows = {}  # the rows of earlier sweeps stay in the table until their run is redone
    if os.path.exists("out-sweep/sweep.md"):
        with open("out-sweep/sweep.md") as f:
            rows = {line.split("|")[1].strip(): line.rstrip("\n") for line in f.readlines()[2:]
                    if line.startswith("| ")}
    for name in names:
        out = os.path.join("out-sweep", name)
        overrides, iters = RUNS[name]
        budget = [f"--max_time={c['max_time']}"]  # train.py fits the schedule in it
        if c["fixed_compute"]:
            budget = [f"--max_iters={iters}", "--max_time=0"]
        dev = [f"--device={c['device']}"] if c["device"] else []
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *train_args(overrides), *budget, *dev,
               f"--out_dir={out}", "--overwrite=True"]  # a run redone replaces its own out_dir
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        if rows.pop(name, None):  # its earlier model is being replaced: the table keeps only what exists
            write_table(table, rows)
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
        ev = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--out_dir={out}", *dev],
                            capture_output=True, text=True)
        if ev.returncode:
            raise SystemExit(f"error: eval.py on run {name} failed:\n{ev.stderr[-2000:]}")
        bpb = float(re.search(r"([\d.]+) bits per byte", ev.stdout)[1])
        speed = f"{speeds[len(speeds) // 2]:,.0f}" if speeds else "?"  # the median of the logged rates
        row = (f"| {name} | {' '.join(overrides) or '(none)'} | {done[1] if done else '?'}{stopped} | "
               f"{wall / 60:.1f} min | {speed} | {bpb:.4f} |")
        print(row, flush=True)
        rows[name] = row
        write_table(table, rows)
    with open("out-sweep/sweep.md") as f:
        print("\n" + f.read() + "\nwritten to out-sweep/sweep.md")


def train_args(overrides: list[str]) -> list[str]:
    """A run's train.py arguments: config/gutenberg.py (or the config file the run names instead),
    then its overrides, config files found beside sweep.py whatever the working folder."""
    config = [] if overrides[:1] and overrides[0].endswith(".py") else ["config/gutenberg.py"]
    return [os.path.join(ROOT, a) if a.endswith(".py") else a for a in config + overrides]


def write_table(header: list[str], rows: dict) -> None:
    """out-sweep/sweep.md, atomically: the header, then a row for each run that ended, in RUNS' order."""
    with open("out-sweep/sweep.md.tmp", "w") as f:
        f.write("\n".join(header + [rows[n] for n in RUNS if n in rows]) + "\n")
    os.replace("out-sweep/sweep.md.tmp", "out-sweep/sweep.md")


if __name__ == "__main__":
    try:
        main(configure(globals()))
    except KeyboardInterrupt:  # the same Ctrl-C stops the run in progress
        raise SystemExit("interrupted: out-sweep/sweep.md lists the runs that ended") from None
