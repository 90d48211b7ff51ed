"""
Course part 3: training. Next-token prediction on random windows of the tokenized corpus.

    python train.py config/gutenberg.py                    # the default CPU run, under 10 minutes
    python train.py config/gutenberg.py --batch_size=8     # any setting can be overridden
    python train.py config/gutenberg.py --init_from=resume # continue from out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=4 train.py config/gutenberg_gpu.py   # DDP

Every eval_interval it measures train and val loss (and val bits per byte, comparable across
tokenizers), saves out_dir/ckpt.pt atomically and redraws out_dir/loss.png.
"""

import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch

from configurator import resolve
from model import make_model, model_args_from, model_settings, next_token_loss
from plumbing import (
    Budget,
    check_config,
    check_ctrl_c,
    check_micro_batch,
    check_token_files,
    claim_out_dir,
    configure_optimizer,
    curve,
    ddp_guard,
    draw_share,
    end_ddp,
    fast_bf16,
    hold_data,
    keep_freed_memory,
    keep_metrics,
    load_checkpoint,
    log_metrics,
    measure_peak_flops,
    on_ctrl_c,
    plot_curves,
    rank0_clock,
    read_metrics,
    resolve_compile,
    resolve_optimizer,
    restore_rng_state,
    resumed_config,
    rng_state,
    save_checkpoint,
    setup_runtime,
    share_batch,
    unwrap,
    wrap_model,
)
from tokenizer import load as load_tokenizer
from tokenizer import load_meta

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-gutenberg"
data_dir = "data/gutenberg_bpe8192"  # written by prepare.py
init_from = "scratch"  # scratch | resume (from out_dir/ckpt.pt)
overwrite = False  # let a fresh run (init_from=scratch) replace a model already in out_dir
eval_interval = 250  # iterations between evaluations and checkpoints
eval_iters = 20  # batches per split per evaluation
log_interval = 10
eval_only = False  # evaluate once and exit
# model: the architecture, and the fields of its config in model.py (GPTConfig or LlamaConfig), each declared
# there once with its default, range and comment; every one is a setting here too (--n_layer=4), and one of
# the other architecture's (GPT only, Llama only) is an error
arch = "gpt"  # gpt (the course's GPT-2) | llama (Llama-4-style: RMSNorm, RoPE, grouped-query attention, experts)
globals().update(model_settings())  # block_size, n_layer, n_head, n_embd, d_ff, dropout, bias, n_kv_head, ...
# optimization
batch_size = 16  # sequences per micro-step (under DDP, lower if the global batch needs it to split evenly)
gradient_accumulation_steps = 1  # micro-steps per iteration (global, divided among DDP processes)
learning_rate = 1e-3
max_iters = 5000
max_time = 0.0  # seconds the run may take (the iterations that fit are counted early on); 0 = no limit
optimizer = "adamw"  # adamw | muon (the blocks' matrices; AdamW the rest) | auto (muon where bf16 is fast)
embedding_lr = 0.0  # learning rate of an untied token embedding (AdamW); 0 = learning_rate
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm; 0 = off
warmup_iters = 100
lr_decay_iters = 0  # cosine decay ends here; 0 = the last iteration (max_iters, or what fits in max_time)
min_lr = 0.0  # learning rate at the end of the decay; 0 = learning_rate / 10
# system
device = "auto"  # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto (bf16 where the device computes it fast, else fp16 on CUDA, fp32) | float32 | ...
compile = None  # torch.compile the model; None = on for CUDA, and on CPU where a C++ compiler works
backend = ""  # DDP backend; "" = nccl on CUDA, gloo on CPU
ddp_timeout = 300.0  # seconds a DDP process waits for the others before it stops with an error
seed = 1337
# -----------------------------------------------------------------------------
config, given = resolve(globals())  # given: the keys a config file or a flag set
globals().update(config)
ckpt_path = os.path.join(out_dir, "ckpt.pt")


def interrupted(signum, frame):
    """Ctrl-C, in the start-up (data checks, model, compile check, peak measurement) as in the training
    loop: one line saying what is kept instead of a traceback, and 130, an interrupted program's status."""
    if "saved_iter" not in globals():  # set as the loop starts: no checkpoint is written before it
        where, kept = "during start-up", None if init_from == "scratch" else f"{ckpt_path} is as it was"
    else:
        where = f"at iteration {iter_num}"
        kept = None if saved_iter is None else f"{ckpt_path} keeps iteration {saved_iter}"
    if kept:
        kept += " (continue with --init_from=resume)"
    elif os.path.exists(ckpt_path):  # --overwrite=True's earlier run: replaced at the first save
        kept = f"no checkpoint was written; {ckpt_path} and its metrics.jsonl are the earlier run's, as they were"
    else:
        kept = "no checkpoint was written"
    print(f"interrupted {where}: {kept}", file=sys.stderr, flush=True)
    raise SystemExit(130)


on_ctrl_c(interrupted)  # from here on; during the imports above, Python's traceback
check_config(config, given)  # impossible values fail here, before any data is read
if init_from not in ("scratch", "resume"):
    raise SystemExit(f"error: init_from must be scratch or resume, got {init_from!r}")
min_lr = min_lr or learning_rate / 10

# --- setup: device, processes, out_dir ------------------------------------------------------------
rt = setup_runtime(device, dtype, seed, backend, ddp_timeout)
if rt.device_type == "cpu":  # every step allocates the same large tensors: reuse them, without page faults
    keep_freed_memory()
log = functools.partial(print, flush=True) if rt.master else (lambda *a, **k: None)
# the same global batch whatever the number of processes: gradient_accumulation_steps becomes the
# micro-steps of each process, of micro_batch sequences (batch_size unless it does not divide evenly)
gradient_accumulation_steps, micro_batch = share_batch(batch_size, gradient_accumulation_steps, rt.world_size, log)
if rt.master and not eval_only:  # one run per out_dir, and a fresh run never replaces a trained model
    lock = claim_out_dir(out_dir, init_from == "scratch", overwrite, "continue it with --init_from=resume")
if eval_only and init_from == "scratch":
    log(f"note: eval_only evaluates a new, untrained model (about ln(vocab_size) nats); --init_from=resume "
        f"evaluates {out_dir}'s")

# --- data: random windows of the memory-mapped token files ---------------------------------------
data_lock = hold_data(data_dir)  # prepare.py cannot replace the files while this run reads them
meta = load_meta(data_dir)  # what prepare.py wrote: tokenizer, vocabulary, tokens and bytes per split
check_token_files(data_dir, meta)  # a missing, truncated or foreign .bin is an error now, not a crash later
tok = load_tokenizer(data_dir, meta)
bytes_per_token = meta["val"]["bytes_per_token"]


def get_batch(split: str, gen: torch.Generator, starts: torch.Tensor | None = None):
    """batch_size random windows of split.bin (or the windows at starts): inputs x and targets y, the
    same windows shifted by one token, (batch, block_size) each. A window may cross the <|endoftext|>
    between two books, unmasked (as nanoGPT and GPT-3 train): the model learns that a new, unrelated
    text begins after it, and every window is full, with no padding."""
    # a fresh memmap per batch: numpy keeps the pages an open one has read, and it would keep growing
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    if starts is None:
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    ix = starts.tolist()
    x = torch.from_numpy(np.stack([data[i : i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + block_size] for i in ix]).astype(np.int64))
    if rt.device_type == "cuda":  # pinned memory: the copy to the GPU runs alongside compute
        return x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
    return x.to(rt.device), y.to(rt.device)


# batches come from their own generator, so that a resumed run draws the same batches as an
# uninterrupted one (its state is saved in the checkpoint). Every process draws the whole global
# batch of an iteration from the same generator and keeps its own share: the global batch, and so
# the run, is the same with 1 process or 8.
batch_gen = torch.Generator().manual_seed(seed)



# --- model: a new one, or the checkpoint's to resume ---------------------------------------------
# model_args: the config keys that are fields of the architecture's config dataclass go to the
# model and into the checkpoint (a key that is no field of it, such as bias for the Llama, does not)
model_args = model_args_from({**config, "vocab_size": tok.vocab_size})
if init_from == "resume":  # the checkpoint decides the model; the run's state is restored below
    ckpt = load_checkpoint(ckpt_path)
    # settings given with other values than the checkpoint's are refused; those not given take its values
    config = resumed_config(ckpt, ckpt_path, config, given, model_args, tok, data_dir)
    optimizer, embedding_lr = config["optimizer"], config["embedding_lr"]
    model_args = {**ckpt["model_args"], "dropout": config["dropout"]}
block_size = model_args["block_size"]  # a resumed run's is its checkpoint's
tokens_per_iter = gradient_accumulation_steps * rt.world_size * micro_batch * block_size
log(f"tokens per iteration: {tokens_per_iter:,} ({rt.world_size} process(es) x {gradient_accumulation_steps} "
    f"micro-steps x {micro_batch} sequences x {block_size} tokens)")
check_micro_batch(model_args, micro_batch, meta, data_dir, rt)  # windows fit the data, a batch the memory
model = make_model(model_args).to(rt.device)
config["optimizer"] = resolve_optimizer(optimizer, rt.device)  # auto: Muon where bf16 is fast, else AdamW
optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), rt.device_type,
                                config["optimizer"], embedding_lr)
# GradScaler: fp16 gradients underflow without loss scaling; a no-op for other dtypes
scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.ptdtype == torch.float16)
iter_num, best_val_loss, elapsed, fitted = 0, float("inf"), 0.0, None
if init_from == "resume":  # all the run's state, random states included: nothing below draws from them
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    elapsed = ckpt.get("elapsed", 0.0)  # the time already spent counts toward max_time
    fitted = ckpt.get("budget")  # the iterations that fit in max_time: it stops where the first run would have
    batch_gen.set_state(ckpt["rng"]["batch"])  # the same batches, and below the same dropout masks
    restore_rng_state(ckpt["rng"].get("ranks") or [ckpt["rng"]], rt, log)  # (older checkpoints: one state)
    log(f"resuming from {ckpt_path} at iteration {iter_num}")
    del ckpt
raw_model = model
moe = bool(getattr(raw_model, "moe_layers", None))  # its training loss adds the routers' losses
use_compile = resolve_compile(compile, rt.device_type, log)  # after the inputs' checks: it takes seconds
log(f"model: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(embedding=False) / 1e6:.2f}M "
    f"without embeddings), {model.flops_per_token() / 1e6:.1f} MFLOPs per token; device {rt.device}, "
    f"{rt.ptdtype}, optimizer {config['optimizer']}, compile {use_compile}")
tied = raw_model.transformer.wte.weight is raw_model.lm_head.weight
groups = [(type(o).__name__, g) for o in getattr(optimizer, "optimizers", [optimizer])  # Muon + AdamW
          for g in o.param_groups]
log(f"output layer: {'tied to' if tied else 'untied from'} the token table; parameter groups: " + "; ".join(
    f"{name} {sum(p.numel() for p in g['params']):,} params at lr {learning_rate * g.get('lr_scale', 1):.0e} "
    f"(peak), weight decay {g['weight_decay']}" for name, g in groups if g["params"]))
model = wrap_model(model, rt, use_compile)
# the loss, compiled too: Inductor fuses the float32 cast, the log-softmax over the vocabulary and their
# backward, which eager PyTorch runs as separate passes over the (B, T, V) logits (a quarter of a step)
loss_fn = torch.compile(next_token_loss) if use_compile else next_token_loss
peak_flops = measure_peak_flops(rt.device, rt.ptdtype)
log(f"measured matmul peak of this device: {peak_flops / 1e9:.0f} GFLOP/s ({rt.ptdtype}); MFU is relative "
    "to it, or to a higher one measured again at an evaluation (a shared machine's speed varies)")
# bf16 autocast on a CPU without bf16 units: emulated, slowly (Muon orthogonalises in float32 there)
if rt.device_type == "cpu" and not fast_bf16(rt.device) and rt.ptdtype != torch.float32:
    log("warning: this CPU emulates bf16 matmuls (100x slower than float32), which bf16 autocast uses: "
        "--dtype=auto chooses float32 here, and trains faster")


@torch.no_grad()
def estimate_loss() -> dict[str, float]:
    """Mean loss over eval_iters batches per split, the same batches at every evaluation."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1)  # fixed: comparable from one evaluation to the next
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = get_batch(split, gen)
            with rt.autocast():
                logits = model(x)
            losses[k] = loss_fn(logits, y).item()
        out[split] = losses.mean().item()
    model.train()
    return out


def check_finite(loss: float, what: str) -> None:
    """A NaN or inf loss means the weights are ruined: stop, and keep the last good checkpoint."""
    if not math.isfinite(loss):
        raise SystemExit(f"error: the {what} is {loss} at iteration {iter_num}: stopping; the last good "
                         f"checkpoint {ckpt_path} is kept (resume from it with a lower --learning_rate or "
                         "--grad_clip)")


# --- training loop ---------------------------------------------------------------------------------
metrics_path = os.path.join(out_dir, "metrics.jsonl")  # every logged step and evaluation, one JSON line each
if rt.master and not eval_only:
    log("config: " + json.dumps(config))
    if init_from == "resume":
        keep_metrics(metrics_path, iter_num)  # the steps after the checkpoint's are done again
# max_time as iterations: how many fit is counted at the warmup's end (at least 10 iterations after the
# first, which compiles), from the speed of its second half; until then the run plans max_iters. The
# warmup's learning rates do not depend on where the schedule ends: fitting it then changes no step taken.
# Then counted again every 3x that many iterations (at 200, 350, ... for the default), from the speed since:
# a shared machine slow at the start would leave minutes unused, one slow later would cut the schedule
# short. Each count moves the cosine's end a little; fewer and fewer as the timed stretch grows.
# An evaluation costs 2 x eval_iters batches, forward only (a third of the work of a training batch).
time_from = max(iter_num + 1, warmup_iters // 2)
first_count = max(warmup_iters // 2 + 10, warmup_iters)  # a fresh run's first count (50 for the default)
budget = Budget(max_time, max_iters, eval_interval, eval_cost=2 * eval_iters / (3 * gradient_accumulation_steps),
                time_from=time_from, fit_at=max(time_from + 10, warmup_iters), refit_every=3 * first_count,
                saved=fitted, log=log)
if iter_num >= budget.last and not eval_only:
    raise SystemExit(f"{ckpt_path} is at iteration {iter_num}: its run has ended (raise --max_iters to train "
                     "on)")


def get_lr(it: int) -> float:
    """Linear warmup for warmup_iters, then cosine decay down to min_lr at lr_decay_iters, or at the
    run's last iteration (max_iters, or what fits in max_time: budget.last)."""
    decay_end = lr_decay_iters or budget.last
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_end:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_end - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


model.train()
t_start = time.time() - elapsed  # elapsed: seconds of this run so far, by rank 0's clock
t0, n_timed = time.time(), 0
iter_start, saved_iter = iter_num, (iter_num if init_from == "resume" else None)
elapsed_at_start = elapsed
with ddp_guard(rt):  # under DDP, a process that dies makes the others stop with one clear line
    while True:
        check_ctrl_c()  # a Ctrl-C that a compiled call dropped stops here (plumbing.on_ctrl_c)
        done = budget.done(iter_num, elapsed, iter_start)  # at the last iteration that fits, or out of time
        # evaluate and save: every eval_interval iterations (not again at the one resumed from), at the end
        due = iter_num % eval_interval == 0 and (iter_num > iter_start or init_from == "scratch")
        if due or done or eval_only:
            losses = estimate_loss()
            val_bpb = losses["val"] / math.log(2) / bytes_per_token  # nats/token -> bits/byte
            log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                f"val {val_bpb:.3f} bits/byte")
            if eval_only:
                break
            check_finite(losses["val"], "val loss")  # never overwrite a good checkpoint with a broken model
            best_val_loss = min(best_val_loss, losses["val"])
            rng = {"batch": batch_gen.get_state(), "ranks": rng_state(rt)}  # each process's dropout state
            if rt.master:
                save_checkpoint({
                    "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "model_args": model_args, "iter_num": iter_num,
                    "val_loss": losses["val"], "best_val_loss": best_val_loss, "elapsed": elapsed,
                    "budget": budget.fitted, "config": config, "tokenizer": tok.state(), "data_dir": data_dir,
                    "bytes_per_token": bytes_per_token, "rng": rng}, ckpt_path)
                if saved_iter is None and init_from == "scratch":  # the model they describe is replaced now
                    keep_metrics(metrics_path, -1)  # an earlier run's rows (--overwrite=True): none kept
                log_metrics(metrics_path, {"iter": iter_num, "train_loss": losses["train"],
                                           "val_loss": losses["val"], "val_bpb": val_bpb, "elapsed": elapsed})
                rows = read_metrics(metrics_path)  # the plot is drawn from the same file a user reads
                # per iteration, a MoE model's training loss is the cross-entropy plus the router losses
                # (balancing and z-loss); the evaluations measure the cross-entropy alone
                curves = {"train (per iteration)": curve(rows, "loss"),
                          "train (eval)": curve(rows, "train_loss"),
                          "val (held-out books)": curve(rows, "val_loss")}
                ylabel = "cross-entropy (nats/token)" + (", training: + router losses" if moe else "")
                plot_curves(os.path.join(out_dir, "loss.png"), curves, "iteration", ylabel,
                            f"training curves of {out_dir}")
            saved_iter = iter_num
            if rt.master:  # the peak again (0.1 s): a shared machine measured at a slow moment logs MFUs over 100 %
                peak_flops = max(peak_flops, measure_peak_flops(rt.device, rt.ptdtype, seconds=0.1))
            t0, n_timed = time.time(), 0  # evaluation time is not training time
        if done:
            log(f"done: {iter_num} iterations in {(time.time() - t_start) / 60:.1f} min; checkpoint "
                f"{ckpt_path}, loss curve {os.path.join(out_dir, 'loss.png')}")
            break

        # one iteration: gradient_accumulation_steps micro-batches, one optimizer step
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: an untied token table's own rate
        # where this process's windows of the iteration start, (micro-steps, micro_batch)
        n_windows = meta["train"]["tokens"] - block_size  # block_size: a resume takes its checkpoint's
        windows = draw_share(n_windows, gradient_accumulation_steps, micro_batch, batch_gen, rt)
        loss_sum = torch.zeros((), device=rt.device)
        for micro_step in range(gradient_accumulation_steps):
            if rt.ddp:
                # all-reduce the gradients on the last micro-step only: syncing on every one would send
                # the whole gradient (4 bytes per parameter) gradient_accumulation_steps times per iteration
                model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
            x, y = get_batch("train", batch_gen, windows[micro_step])
            with rt.autocast():
                logits = model(x)  # (B, T, V)
                loss = loss_fn(logits, y)  # the mean cross-entropy (model.next_token_loss), in float32
                if moe:  # + the routers' load-balancing and z-losses of this forward pass
                    loss = loss + raw_model.router_loss()
                loss = loss / gradient_accumulation_steps  # the gradient of the mean over micro-batches
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if grad_clip > 0:
            scaler.unscale_(optimizer)  # fp16: clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)  # skipped if fp16 gradients overflowed (the scale then shrinks)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        iter_num += 1
        n_timed += 1
        elapsed = rank0_clock(t_start, rt)  # under DDP rank 0's clock decides for everyone
        if iter_num == iter_start + 1 and use_compile:  # the first iteration: a compiled model compiles in it
            log(f"first iteration done {elapsed - elapsed_at_start:.1f} s after the start, the model's "
                "compile included (it counts in max_time)")
        budget.tick(iter_num, elapsed)  # times the iterations, and counts how many fit
        if iter_num % log_interval == 0 and rt.ddp:  # the mean over the global batch, as 1 process logs it
            torch.distributed.all_reduce(loss_sum)  # a sum (gloo has no average)
            loss_sum /= rt.world_size
        if iter_num % log_interval == 0 and rt.master:
            lossf = loss_sum.item()  # the mean over the micro-batches (.item() waits for the GPU: only here)
            check_finite(lossf, "training loss")
            dt = (time.time() - t0) / n_timed
            t0, n_timed = time.time(), 0
            tok_s = tokens_per_iter / dt
            mfu = raw_model.flops_per_token() * tok_s / rt.world_size / peak_flops
            left = (budget.last - iter_num) * dt
            if max_time > 0:  # until the budget is counted, budget.last is max_iters: max_time bounds it
                left = min(left, max_time - elapsed)
            log_metrics(metrics_path, {"iter": iter_num, "loss": lossf, "lr": lr, "ms_per_iter": dt * 1000,
                                       "tokens_per_s": tok_s, "mfu": mfu, "elapsed": elapsed})
            log(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, {tok_s:,.0f} "
                f"tokens/s, MFU {mfu * 100:.1f}%, ETA {left / 60:.1f} min")
            if moe:  # is the router spreading the tokens?
                log("  tokens per expert (%): " + " | ".join(
                    " ".join(f"{100 * x:.0f}" for x in layer) for layer in raw_model.expert_shares()))

model = None  # drops the DDP wrapper: end_ddp frees it before the process group ends
end_ddp(rt)
