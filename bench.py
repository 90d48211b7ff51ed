"""
Measures every stage against its baseline, side by side in one run on the machine it runs on, and
prints a table: each figure beside its baseline, re-measured in the same run, and their ratio (no
figure is compared across runs or machines).

    python bench.py                          # everything: about 10 minutes on 2 CPU cores
    python bench.py --only=generate,moe      # sections: peak, train, generate, data, compile, moe, profile
    python bench.py --only=decode            # compile's decode half: eager, dynamic=True, static cache
    python bench.py --only=profile           # the default training step, per operator, against the old path

The baselines are the old path of the training step (model.py and AdamW as of commit 859c13a,
eager), the course's choices (the TP: GPT-2 tokenizer, its model and batch, its generation
loop that recomputes the whole sequence for every new token, its Dataset that scans the documents
for every item) and transformers' own generate() with a KV cache, on the same weights.
Training figures come from real train.py runs (a few iterations each, in a subprocess, so that the
peak memory is that run's own); the rest is timed here.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from configurator import resolve
from model import MoE, SwiGLU, make_model, model_args_from, next_token_loss
from plumbing import (
    BatchedMuon,
    Runtime,
    check_ctrl_c,
    check_device,
    configure_optimizer,
    ctrl_c_ends_quietly,
    fast_bf16,
    keep_freed_memory,
    measure_peak_flops,
    peak_matmul_size,
    resolve_compile,
    resolve_dtype,
    resolve_optimizer,
)
from tokenizer import load as load_tokenizer

# -----------------------------------------------------------------------------
only = ""  # comma-separated sections; "" = all
out_dir = "out-gutenberg"  # the generation section's weights (absent: a random model of the same shape)
train_iters = 16  # iterations per training measurement (the first log interval is warm-up, not counted)
new_tokens = 256  # generation: 8-token prompt, this many new tokens (capped so that transformers' GPT-2 fits)
device = "cpu"
dtype = "auto"  # profile: the step's autocast dtype; auto = config/gutenberg.py's (bf16 where it is fast)
profile_steps = 5  # profile: timed training steps per path, after 2 of warm-up
baseline = "859c13a"  # profile: the commit whose model.py is the old path
baseline_model = ""  # profile: the old path's model.py; "" = `git show {baseline}:model.py` (git history)
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.abspath(__file__))
rows: list[tuple[str, str, str, str]] = []  # (stage, what, figure, against the baseline)


def default_run() -> tuple[dict, dict]:
    """config/gutenberg.py's model_args (with its data's vocabulary of 8,192 tokens) and optimizer
    settings, read from the file: the figures follow the default when it changes."""
    settings: dict = {}
    with open(os.path.join(ROOT, "config", "gutenberg.py")) as f:
        exec(f.read(), settings)
    model_args = model_args_from({**settings, "vocab_size": 8192})
    return model_args, {"optimizer": settings.get("optimizer", "adamw"),
                        "embedding_lr": settings.get("embedding_lr", 0.0)}


DEFAULT_MODEL, DEFAULT_OPTIMIZER = default_run()


def report(stage: str, what: str, figure: str, vs: str = "") -> None:
    rows.append((stage, what, figure, vs))
    print(f"  {stage}: {what}: {figure}{'  (' + vs + ')' if vs else ''}", flush=True)


def run_train(*args: str) -> dict:
    """Runs train.py for a few iterations; returns its median tokens/s and MFU (the first logged
    interval, with its warm-up, left out), its seconds to the first iteration, and its peak RSS."""
    out = tempfile.mkdtemp(prefix="bench-")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--out_dir={out}",
           f"--max_iters={train_iters}", f"--eval_interval={10 * train_iters}", "--eval_iters=1",
           "--log_interval=2", f"--device={device}"]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, lines = None, []
    for line in p.stdout:
        lines.append(line)
        if first is None and line.startswith("iter "):
            first = time.time() - t0
    _, status, usage = os.wait4(p.pid, 0)  # this child's own peak memory
    shutil.rmtree(out, ignore_errors=True)
    if status != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{''.join(lines[-20:])}")
    logs = [line for line in lines if line.startswith("iter ")][1:]
    tok_s = [float(re.search(r"([\d,]+) tokens/s", s)[1].replace(",", "")) for s in logs]
    mfu = [float(re.search(r"MFU ([\d.]+)%", s)[1]) for s in logs]
    rss_gb = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
    return {"tok_s": float(np.median(tok_s)), "mfu": float(np.median(mfu)), "first_iter_s": first,
            "rss_gb": rss_gb}


def bytes_per_token(data_dir: str) -> float:
    with open(os.path.join(ROOT, data_dir, "meta.json")) as f:
        return json.load(f)["train"]["bytes_per_token"]


def need_data(tokenizer: str, data_dir: str) -> None:
    if not os.path.exists(os.path.join(ROOT, data_dir, "meta.json")):
        print(f"preparing {data_dir}...", flush=True)
        if subprocess.run([sys.executable, "prepare.py", f"--tokenizer={tokenizer}"], cwd=ROOT).returncode:
            raise SystemExit(f"error: python prepare.py --tokenizer={tokenizer} failed (above): bench.py "
                             f"needs {data_dir}")


# --- 1. the limit ------------------------------------------------------------------------------------
def side(dtype: torch.dtype) -> str:
    """The square matrices measure_peak_flops multiplies in dtype here: "2048x2048"."""
    n = peak_matmul_size(device, dtype)
    return f"{n}x{n}"


def bench_peak() -> float:
    fp32 = measure_peak_flops(device, torch.float32, seconds=1.0)
    report("peak", f"matmul fp32 ({side(torch.float32)})", f"{fp32 / 1e9:,.0f} GFLOP/s")
    bf16 = measure_peak_flops(device, torch.bfloat16, seconds=1.0)
    report("peak", f"matmul bf16 ({side(torch.bfloat16)})", f"{bf16 / 1e9:,.0f} GFLOP/s", f"{bf16 / fp32:.2f}x fp32")
    return fp32


# --- 2. training -------------------------------------------------------------------------------------
def bench_train() -> None:
    need_data("bpe", "data/gutenberg_bpe8192")
    need_data("gpt2", "data/gutenberg_gpt2")
    ours = run_train("config/gutenberg.py", "--compile=False")
    course = run_train("config/tp_seed.py", "--compile=False")
    b_ours, b_course = bytes_per_token("data/gutenberg_bpe8192"), bytes_per_token("data/gutenberg_gpt2")
    runs = (("config/gutenberg.py", ours, b_ours), ("config/tp_seed.py (course)", course, b_course))
    for name, r, b in runs:
        report("train", f"{name} tokens/s", f"{r['tok_s']:,.0f} ({r['tok_s'] * b / 1e3:,.1f} kB of text/s)")
        report("train", f"{name} MFU", f"{r['mfu']:.0f}% of the measured matmul peak in its dtype")
        report("train", f"{name} peak RSS", f"{r['rss_gb']:.2f} GB")
    ratio = ours["tok_s"] * b_ours / (course["tok_s"] * b_course)
    report("train", "text per second, ours / course", f"{ratio:.1f}x", "bytes of French read per second")
    report("train", "peak RSS, ours / course", f"{ours['rss_gb'] / course['rss_gb']:.2f}x")


# --- 3. generation -----------------------------------------------------------------------------------
def course_generate(model, idx, n: int, top_k: int):
    """The course's loop: the whole sequence goes through the model again for every new token."""
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size :])
        v, _ = torch.topk(logits[:, -1], top_k)
        logits = logits[:, -1].masked_fill(logits[:, -1] < v[:, [-1]], -float("inf"))
        idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), 1)), dim=1)
    return idx


def timed(fn) -> float:
    fn()  # warm-up (allocations, lazy initialisation)
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    check_ctrl_c()  # a Ctrl-C that a compiled call dropped
    return t


@torch.no_grad()
def bench_generate() -> None:
    path = os.path.join(ROOT, out_dir, "ckpt.pt")
    if os.path.exists(path):
        from plumbing import load_model

        model, _, _ = load_model(os.path.join(ROOT, out_dir), device)
        source = out_dir
    else:
        model = make_model(DEFAULT_MODEL).to(device).eval()
        source = "random weights, the default shape"
    n = min(new_tokens, model.config.block_size - 8)  # no positions past block_size (GPT-2, RoPE tables)
    x = torch.randint(model.config.vocab_size, (1, 8), device=device)
    what = f"batch 1, 8-token prompt, {n} new tokens, top-k 40 ({source})"
    kv = n / timed(lambda: list(model.generate(x, n, temperature=1.0, top_k=40)))
    course = n / timed(lambda: course_generate(model, x, n, 40))
    report("generate", f"KV cache, {what}", f"{kv:,.0f} tokens/s")
    report("generate", "the course's loop (recomputes everything)", f"{course:,.0f} tokens/s",
           f"KV cache {kv / course:.1f}x faster")
    xb = x.repeat(8, 1)
    batch = 8 * n / timed(lambda: list(model.generate(xb, n, temperature=1.0, top_k=40)))
    report("generate", "KV cache, 8 samples as one batch", f"{batch:,.0f} tokens/s",
           f"{batch / kv:.1f}x batch 1")
    try:
        import transformers

        from export import to_transformers
    except ImportError:
        report("generate", "transformers", "not installed (pip install -r requirements-dev.txt)")
        return
    hf = to_transformers(model).to(device).eval()
    eos = hf.config.eos_token_id
    hf_tok_s = n / timed(lambda: hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=40,
                                             use_cache=True, pad_token_id=eos))
    what = f"transformers {transformers.__version__} {type(hf).__name__}.generate(use_cache=True)"
    report("generate", what, f"{hf_tok_s:,.0f} tokens/s", f"ours {kv / hf_tok_s:.1f}x faster")


# --- 4. data -----------------------------------------------------------------------------------------
class CourseDataset:
    """The course's TextDataset: windows of seq_length at a stride of seq_length/2 in each document;
    item idx is found by scanning the documents' cumulative window counts from the first one."""

    def __init__(self, docs: list[list[int]], seq_length: int):
        self.docs, self.seq_length, self.stride = docs, seq_length, seq_length // 2
        self.cumulative, total = [], 0
        for d in docs:
            total += max(0, (len(d) - seq_length) // self.stride + 1)
            self.cumulative.append(total)

    def __len__(self) -> int:
        return self.cumulative[-1]

    def __getitem__(self, idx: int):
        i = 0
        while i < len(self.cumulative) and idx >= self.cumulative[i]:
            i += 1
        start = (idx - (self.cumulative[i - 1] if i else 0)) * self.stride
        ids = torch.tensor(self.docs[i][start : start + self.seq_length])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.cat([ids[1:], ids[:1]])}


def bench_data() -> None:
    t0 = time.time()
    p = subprocess.run([sys.executable, "prepare.py", "--name=bench_prepare", "--force"], cwd=ROOT,
                       capture_output=True, text=True)
    dt = time.time() - t0
    shutil.rmtree(os.path.join(ROOT, "data", "bench_prepare"), ignore_errors=True)
    if p.returncode:
        raise SystemExit(f"error: prepare.py failed:\n{p.stderr[-2000:]}")
    report("data", "prepare.py, the whole corpus, BPE 8k trained + encoded", f"{dt:.1f} s",
           f"{30 / dt:.1f}x under the 30 s goal")
    path = os.path.join(ROOT, "data", "gutenberg_bpe8192", "train.bin")
    need_data("bpe", "data/gutenberg_bpe8192")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    with open(os.path.join(ROOT, "data", "gutenberg_bpe8192", "meta.json")) as f:
        eot = load_tokenizer(os.path.join(ROOT, "data", "gutenberg_bpe8192"), json.load(f)).eot_id
    cuts = np.flatnonzero(data == eot)  # every document ends with <|endoftext|>
    docs = [d.tolist() for d in np.split(np.asarray(data), cuts + 1) if len(d) > 1]
    ds = CourseDataset(docs, 128)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)
    gen = torch.Generator().manual_seed(0)

    def course_batches(n=20):
        it = iter(loader)
        for _ in range(n):
            next(it)

    def our_batches(n=200):  # train.py's get_batch: random windows sliced from a fresh memmap
        for _ in range(n):
            mm = np.memmap(path, dtype=np.uint16, mode="r")
            ix = torch.randint(len(mm) - 128, (32,), generator=gen).tolist()
            x = torch.from_numpy(np.stack([mm[i : i + 128] for i in ix]).astype(np.int64))
            y = torch.from_numpy(np.stack([mm[i + 1 : i + 129] for i in ix]).astype(np.int64))
            x.to(device), y.to(device)

    course = 20 / timed(course_batches)
    ours = 200 / timed(our_batches)
    report("data", "random batches (32 x 128) from the memmap", f"{ours:,.0f} batches/s")
    report("data", "the course's Dataset + DataLoader (shuffle)", f"{course:,.1f} batches/s",
           f"memmap {ours / course:,.0f}x faster")


# --- 5. torch.compile --------------------------------------------------------------------------------
def bench_compile() -> None:
    eager = run_train("config/gutenberg.py", "--compile=False")
    compiled = run_train("config/gutenberg.py", "--compile=True")
    report("compile", "train, config/gutenberg.py, eager", f"{eager['tok_s']:,.0f} tokens/s")
    report("compile", "train, torch.compile", f"{compiled['tok_s']:,.0f} tokens/s",
           f"{compiled['tok_s'] / eager['tok_s']:.2f}x eager; first iteration after "
           f"{compiled['first_iter_s']:.0f} s against {eager['first_iter_s']:.0f} s")
    bench_compile_decode()


def best_times(paths: dict, rounds: int = 3) -> dict[str, float]:
    """Each path's best time of `rounds`, the paths taken in turn so that a busy machine slows
    them all alike."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            check_ctrl_c()  # a Ctrl-C that a compiled call dropped
    return {name: min(t) for name, t in times.items()}


@torch.no_grad()
def bench_compile_decode() -> None:
    """Decode (8-token prompt, n new tokens, top-k 40), at batch 1 and 32 (dpo.py's pair making):
    eager, the whole forward compiled with dynamic shapes (the cache grows: one graph for every
    length), and the decode step compiled over the static KV cache (generate(compile=True): one
    shape, compiled once, the draw included); in float32, with the bf16 copy of the weights that
    the scripts decode with on a CPU with bf16 units (Runtime.decoder), and under bf16 autocast
    (which casts every weight at every step: slower, so the scripts never decode under it on CPUs)."""
    n = 128
    x = torch.randint(8192, (1, 8))
    model = make_model(DEFAULT_MODEL).eval()
    dynamic = make_model(DEFAULT_MODEL).eval()
    dynamic.forward = torch.compile(dynamic.forward, dynamic=True)

    def decode(m, rows=1, autocast=False, **kw):
        def run():
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                return list(m.generate(x.repeat(rows, 1), n, temperature=1.0, top_k=40, **kw))
        return run

    paths = {"eager": decode(model), "dynamic": decode(dynamic), "static": decode(model, compile=True),
             "eager32": decode(model, 32), "static32": decode(model, 32, compile=True),
             "eager_autocast": decode(model, autocast=True)}
    if fast_bf16("cpu"):  # the scripts' bf16 copy of the weights, where bf16 is fast
        bf16 = Runtime("cpu", "cpu", torch.bfloat16, False, 0, 0, 1).decoder(model, compile=True)
        paths |= {"bf16": decode(bf16, compile=True), "bf16_32": decode(bf16, 32, compile=True)}
    compile_s = {}
    for name in ("dynamic", "static", "static32", "bf16", "bf16_32"):
        if name in paths:
            t0 = time.perf_counter()
            paths[name]()  # the first call compiles
            compile_s[name] = time.perf_counter() - t0
    hf = None
    try:
        from export import to_transformers

        hf = to_transformers(model).eval()
        eos = hf.config.eos_token_id
        paths["hf"] = lambda: hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=40,
                                          use_cache=True, pad_token_id=eos)
    except ImportError:
        pass
    tok_s = {name: (32 if "32" in name else 1) * n / t for name, t in best_times(paths).items()}
    eager, static = tok_s["eager"], tok_s["static"]
    report("compile", f"decode, batch 1, {n} tokens, eager (float32)", f"{eager:,.0f} tokens/s")
    report("compile", "decode, torch.compile(model.forward, dynamic=True)", f"{tok_s['dynamic']:,.0f} tokens/s",
           f"{tok_s['dynamic'] / eager:.2f}x eager, after {compile_s['dynamic']:.0f} s of compiling")
    report("compile", "decode, generate(compile=True): the step over a static KV cache (float32)",
           f"{static:,.0f} tokens/s", f"{static / eager:.2f}x eager, {static / tok_s['dynamic']:.2f}x "
           f"dynamic=True, after {compile_s['static']:.0f} s of compiling")
    best = static
    if "bf16" in tok_s:
        best = tok_s["bf16"]
        report("compile", "decode, the compiled step on a bf16 copy of the weights (as the scripts decode here)",
               f"{best:,.0f} tokens/s", f"{best / static:.2f}x float32, {best / eager:.2f}x eager")
    report("compile", "decode, batch 1 under bf16 autocast, eager", f"{tok_s['eager_autocast']:,.0f} tokens/s",
           f"float32 {eager / tok_s['eager_autocast']:.2f}x faster")
    report("compile", "decode, batch 32, eager", f"{tok_s['eager32']:,.0f} tokens/s")
    report("compile", "decode, batch 32, generate(compile=True)", f"{tok_s['static32']:,.0f} tokens/s",
           f"{tok_s['static32'] / tok_s['eager32']:.2f}x eager, after {compile_s['static32']:.0f} s of "
           "compiling for the new batch size")
    if "bf16_32" in tok_s:
        report("compile", "decode, batch 32, the compiled step on bf16 weights", f"{tok_s['bf16_32']:,.0f} tokens/s",
               f"{tok_s['bf16_32'] / tok_s['static32']:.2f}x float32")
    if hf is not None:
        report("compile", f"decode, batch 1, transformers {type(hf).__name__}.generate", f"{tok_s['hf']:,.0f} "
               "tokens/s", f"ours: eager {eager / tok_s['hf']:.2f}x, compiled {best / tok_s['hf']:.2f}x")


def bench_moe() -> None:
    moe = run_train("config/llama_moe.py", "--compile=False")
    dense = run_train("config/llama_moe.py", "--compile=False", "--moe_every=0", "--d_ff=1024")
    report("moe", "config/llama_moe.py (4 experts, top-1, + shared)", f"{moe['tok_s']:,.0f} tokens/s")
    report("moe", "dense Llama, same active weights (d_ff 1024)", f"{dense['tok_s']:,.0f} tokens/s",
           f"MoE at {moe['tok_s'] / dense['tok_s']:.2f}x the dense speed")
    # where the MoE's extra time goes: one MoE layer against the dense SwiGLU of the same FLOPs,
    # forward + backward on one batch of tokens, set against a whole training step of the model
    args = {"arch": "llama", "vocab_size": 8192, "block_size": 256, "n_layer": 4, "n_head": 4, "n_kv_head": 2,
            "n_embd": 256, "n_expert": 4, "n_expert_per_token": 1, "d_expert": 512, "moe_every": 1}
    model = make_model(args).train()
    moe_layer, dense_layer = MoE(model.config), SwiGLU(256, 1024)
    for p in moe_layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(16, 256, 256, requires_grad=True)
    idx = torch.randint(8192, (16, 256))
    t_step = timed(lambda: next_token_loss(model(idx), idx).backward())
    t_moe = timed(lambda: moe_layer(x).sum().backward())
    t_dense = timed(lambda: dense_layer(x).sum().backward())
    share = len(model.moe_layers) * max(0.0, t_moe - t_dense) / t_step
    report("moe", "routing + dispatch (MoE layer minus a dense SwiGLU of equal FLOPs)",
           f"{1000 * (t_moe - t_dense):.0f} ms per layer",
           f"{100 * share:.0f}% of a {1000 * t_step:.0f} ms forward+backward")


# --- 7. the training step, profiled ------------------------------------------------------------------
def old_model_module() -> types.ModuleType:
    """model.py as it was at the baseline commit, imported under another name."""
    if baseline_model:
        with open(baseline_model) as f:
            source = f.read()
    else:
        p = subprocess.run(["git", "show", f"{baseline}:model.py"], cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"error: git show {baseline}:model.py failed ({p.stderr.strip()[:200]}): run "
                             "bench.py in a git clone of the project, or pass --baseline_model=PATH")
        source = p.stdout
    module = types.ModuleType(f"model_{baseline}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"model.py@{baseline}", "exec"), module.__dict__)
    return module


compiled_loss = torch.compile(next_token_loss)  # as train.py compiles it beside a compiled model


def training_step(model, optimizer, x, y, phases: dict | None = None):
    """train.py's iteration (one micro-step): forward and loss under autocast, backward, gradient
    clipping, AdamW's step. phases, if given, adds the seconds of each part."""
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    plain = getattr(model, "_orig_mod", model)  # under torch.compile's wrapper
    t0 = time.perf_counter()
    with torch.profiler.record_function("phase: forward"), autocast:
        if type(plain).__module__.startswith("model_"):  # the baseline's forward(x, y) -> (logits, loss)
            loss = model(x, y)[1]
        else:  # today's forward returns the logits; the loss is compiled with a compiled model, as in train.py
            loss = (compiled_loss if plain is not model else next_token_loss)(model(x), y)
    t1 = time.perf_counter()
    with torch.profiler.record_function("phase: backward"):
        loss.backward()
    t2 = time.perf_counter()
    with torch.profiler.record_function("phase: optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if phases is not None:
        for k, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", time.perf_counter() - t2)):
            phases[k] = phases.get(k, 0.0) + dt
    check_ctrl_c()  # a Ctrl-C that a compiled call dropped (plumbing.on_ctrl_c)


def op_shares(model, optimizer, x, y, steps: int = 3) -> tuple[dict[str, float], float]:
    """torch.profiler over a few steps: each operator's share of the step (self CPU time, kernels
    Inductor generated counted as one), and the profiled ms per step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            training_step(model, optimizer, x, y)
    by_op: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith("phase: "):
            continue  # the phases' own ranges: their time is their operators'
        name = "Inductor's fused C++ kernels" if "CompiledFxGraph" in e.key else e.key  # compiled code
        by_op[name] = by_op.get(name, 0.0) + e.self_cpu_time_total
    total = sum(by_op.values())
    return {k: v / total for k, v in by_op.items()}, total / 1000 / steps


def bench_profile() -> None:
    peak = measure_peak_flops(device, getattr(torch, dtype), seconds=1.0)
    report("profile", f"matmul peak {dtype} ({side(getattr(torch, dtype))})", f"{peak / 1e9:,.0f} GFLOP/s",
           "MFU is relative to it")
    torch.manual_seed(0)
    old_model = old_model_module()  # given the default's settings that its config knows
    known = {"arch", *(f.name for f in dataclasses.fields(old_model.LlamaConfig))}
    old = old_model.make_model({k: v for k, v in DEFAULT_MODEL.items() if k in known}).train()
    new = make_model(DEFAULT_MODEL).train()
    settings = {**DEFAULT_OPTIMIZER, "optimizer": resolve_optimizer(DEFAULT_OPTIMIZER["optimizer"], device)}
    paths = {  # name: (model, optimizer)
        "old": (old, torch.optim.AdamW(old.parameters(), lr=1e-4, foreach=False)),  # its default on CPU
        "new": (new, configure_optimizer(new, 0.1, 1e-4, (0.9, 0.95), device, **settings)),
    }
    compile_s = None
    if resolve_compile(None, device.split(":")[0], log=lambda line: print("  " + line, flush=True)):
        model = make_model(DEFAULT_MODEL).train()
        opt = configure_optimizer(model, 0.1, 1e-4, (0.9, 0.95), device, **settings)
        paths["compiled"] = (torch.compile(model), opt)
    x, y = torch.randint(8192, (2, 16, 256), device=device)  # config/gutenberg.py's batch: 16 x 256 tokens
    phases: dict[str, dict] = {name: {} for name in paths}
    for name, (model, opt) in paths.items():
        t0 = time.perf_counter()
        training_step(model, opt, x, y)  # warm-up: allocations, and the compile
        if name == "compiled":
            compile_s = time.perf_counter() - t0
        training_step(model, opt, x, y)
    # where the time goes, operator by operator, in each path
    shares, ms = {}, {}
    for name, (model, opt) in paths.items():
        shares[name], ms[name] = op_shares(model, opt, x, y)
    top = sorted({op for s in shares.values() for op in sorted(s, key=s.get, reverse=True)[:8]},
                 key=lambda op: -max(s.get(op, 0.0) for s in shares.values()))
    for op in top:
        figure = " · ".join(f"{name} {100 * s.get(op, 0.0):.1f}%" for name, s in shares.items())
        report("profile", f"share of the step: {op}", figure)
    report("profile", "profiled step", " · ".join(f"{name} {t:,.0f} ms" for name, t in ms.items()),
           "the profiler's own overhead included")
    # the speed: the paths in turn, so that a busy machine slows them all alike
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(profile_steps):
        for name, (model, opt) in paths.items():
            t0 = time.perf_counter()
            training_step(model, opt, x, y, phases[name])
            times[name].append(time.perf_counter() - t0)
    tok_s = {name: x.numel() / float(np.median(t)) for name, t in times.items()}
    for name in paths:
        split = " + ".join(f"{k} {1000 * v / profile_steps:,.0f}" for k, v in phases[name].items())
        report("profile", f"step, {name} path: forward + backward + optimizer", f"{split} ms")
    labels = {"old": f"old path (model.py of {baseline}, AdamW's for-loop, eager)",
              "new": f"new path (the default's model and {settings['optimizer']}), eager",
              "compiled": "new path, torch.compile (the default where it works)"}
    for name in paths:
        mfu = new.flops_per_token() * tok_s[name] / peak
        vs = f"{tok_s[name] / tok_s['old']:.2f}x the old path" if name != "old" else ""
        if name == "compiled":
            vs += f"; its first step took {compile_s:.0f} s (compiling)"
        figure = f"{tok_s[name]:,.0f} tokens/s, MFU {100 * mfu:.0f}%"
        report("profile", f"default step, {labels[name]}", figure, vs)
    if settings["optimizer"] == "muon":
        bench_muon(new)


def bench_muon(model) -> None:
    """Muon's step over the default's 21 block matrices: torch.optim.Muon runs Newton-Schulz matrix by
    matrix, BatchedMuon (train.py's) one batched product per shape."""
    matrices = [torch.nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()
                if p.dim() == 2 and n.startswith("transformer.h.")]
    for p in matrices:
        p.grad = 1e-3 * torch.randn_like(p)
    ms = {}
    for _ in range(5):  # in turn, the best of each: a busy machine slows both alike
        for cls in (torch.optim.Muon, BatchedMuon):
            opt = cls(matrices, lr=1e-4, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
            ms[cls.__name__] = min(ms.get(cls.__name__, 1e9), 1000 * timed(opt.step))
    report("profile", f"Muon step, {len(matrices)} matrices: torch.optim.Muon / BatchedMuon",
           f"{ms['Muon']:.1f} / {ms['BatchedMuon']:.1f} ms", f"{ms['Muon'] / ms['BatchedMuon']:.2f}x")


SECTIONS = {"peak": bench_peak, "train": bench_train, "generate": bench_generate, "data": bench_data,
            "compile": bench_compile, "decode": bench_compile_decode, "moe": bench_moe,
            "profile": bench_profile}


def main(c: dict) -> None:
    chosen = [s.strip() for s in c["only"].split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: unknown section(s) {', '.join(unknown)}: choose among "
                         f"{', '.join(SECTIONS)}")
    torch.manual_seed(0)
    keep_freed_memory()  # as train.py: the training steps timed here are its steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}", flush=True)
    for s in chosen:
        print(f"[{s}]", flush=True)
        SECTIONS[s]()
    print("\n| stage | what | measured | against the baseline |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    config, given = resolve(globals())
    check_device(config["device"], config["dtype"])  # a device or dtype that is not there: one line, now
    if "out_dir" in given and not os.path.exists(os.path.join(ROOT, config["out_dir"], "ckpt.pt")):
        raise SystemExit(f"error: no checkpoint at {config['out_dir']}/ckpt.pt (relative to {ROOT}): pass "
                         "another --out_dir, or leave it out to time the default's shape with random weights")
    for k in ("train_iters", "new_tokens", "profile_steps"):
        if config[k] < 1:
            raise SystemExit(f"error: {k} must be positive, got {config[k]}")
    config["dtype"] = resolve_dtype(config["dtype"], config["device"])  # as train.py's
    globals().update(config)
    with ctrl_c_ends_quietly():  # one line, exit status 130
        main(config)
