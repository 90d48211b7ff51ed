"""
Direct Preference Optimization (Rafailov et al., 2023): align a pretrained checkpoint with pairs of
a preferred (chosen) and a dispreferred (rejected) completion of the same prompt.

    python dpo.py config/dpo_gutenberg.py                      # self-play pairs, then DPO, under 10 minutes
    python dpo.py --pairs=prefs.jsonl --init_from=out-gutenberg  # your pairs: prompt / chosen / rejected
    python dpo.py --pairs=out-gutenberg-chat/feedback.jsonl     # the ratings and choices chat.py logged

The loss needs no reward model: with pi the model being tuned and ref the frozen starting one,
    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    loss = -log sigmoid(beta * h)
raises the chosen completion's probability relative to the rejected one, measured against where the
reference stood; beta sets how far the model may move from the reference. log p(y|x) is the sum
over the completion's tokens only: the prompt is context, never scored. The reference's log-probs
never change, so they are computed once per pair before training: no second model is kept.
Variants: loss_type=ipo (Azar et al., 2023: a squared loss that does not push h to infinity, on
per-token mean log-probs as in TRL) and label_smoothing (conservative DPO: the labels may be wrong).

Without pairs of your own, --make_pairs=N builds self-play pairs from the corpus (SPIN, Chen et
al., 2024): the prompt is a passage of a training book, chosen its true continuation, rejected
the starting model's own sampled continuation. They go to out_dir/pairs.jsonl, with a held-out
set from the validation books in out_dir/pairs_val.jsonl, for a person to read.

Dropout is off (TRL's disable_dropout): the reference's log-probs are computed without it, so the
policy starts equal to the reference (every reward is 0 before the first step). --resume=True
continues a run exactly, on the pairs it began with: their reference log-probs are in the checkpoint.
"""

import functools
import hashlib
import json
import os
import time

import numpy as np
import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (
    check_config,
    claim_out_dir,
    completion_logps,
    configure_optimizer,
    continue_prompts,
    curve,
    ddp_guard,
    draw_windows,
    fit_prompt,
    get_lr,
    iters_in_budget,
    keep_metrics,
    load_model,
    log_metrics,
    pack,
    plot_curves,
    rank0_clock,
    read_metrics,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    schedule_end,
    setup_runtime,
    unwrap,
)
from configurator import configure

# -----------------------------------------------------------------------------
init_from = "out-gutenberg"  # the pretrained checkpoint: the starting policy and the frozen reference
out_dir = "out-gutenberg-dpo"
resume = False  # continue the run in out_dir (from its ckpt.pt), on the pairs it began with
overwrite = False  # let a fresh run replace a model already in out_dir
pairs = ""  # JSONL, JSON, parquet or a Hub dataset with prompt / chosen / rejected, or chat.py's feedback.jsonl
val_pairs = ""  # held-out pairs; "" = out_dir/pairs_val.jsonl when made here, else 10% of pairs held out
make_pairs = 0  # build this many self-play pairs (and a tenth as many held out), write them, then train on them
prompt_tokens = 64  # self-play: length of the prompt passage, in tokens
completion_tokens = 48  # self-play: length of the true and the sampled continuations
beta = 0.1
loss_type = "sigmoid"  # sigmoid (DPO) | ipo
label_smoothing = 0.0  # conservative DPO: the probability that a pair's labels are swapped
batch_size = 8  # pairs per micro-step
gradient_accumulation_steps = 1
learning_rate = 1e-4
max_iters = 300
max_time = 0.0  # seconds of training: the steps that fit are counted early on, as in train.py; 0 = no limit
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 10
lr_decay_iters = 0  # 0 = max_iters
min_lr = 0.0  # 0 = learning_rate / 10
eval_interval = 50
log_interval = 10
device = "auto"
dtype = "auto"
compile = None  # None = on for CUDA
backend = ""
ddp_timeout = 300.0
seed = 1337
# -----------------------------------------------------------------------------
COLUMNS = ("prompt", "chosen", "rejected")
# what a resumed run keeps from its checkpoint: the reference, the pairs, their split and their scoring
RUN_KEYS = ("init_from", "pairs", "val_pairs", "make_pairs", "prompt_tokens", "completion_tokens", "loss_type", "seed")


def read_rows(path: str) -> list[dict]:
    """Rows of a JSONL/JSON/parquet file or a Hub dataset; errors name the file and the row."""
    if path.endswith((".jsonl", ".json")) and os.path.exists(path):
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".json") and raw.lstrip().startswith(b"["):
            lines = [json.dumps(r).encode() for r in json.loads(raw)]
        else:
            lines = raw.splitlines()
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except UnicodeDecodeError as e:
                raise SystemExit(f"error: {path}, row {i}: bytes that are not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}, row {i}: not JSON ({e.msg})") from None
            if not isinstance(rows[-1], dict):
                raise SystemExit(f"error: {path}, row {i}: not a JSON object")
        return rows
    from datasets import load_dataset

    try:
        if path.endswith(".parquet"):
            return list(load_dataset("parquet", data_files=path, split="train"))
        return list(load_dataset(path, split="train"))
    except Exception as e:
        raise SystemExit(f"error: cannot read pairs from {path}: {str(e).splitlines()[0][:200]}") from None


def pairs_from_feedback(rows: list[dict]) -> list[dict]:
    """chat.py's log as pairs: a pairwise choice is a pair; two rated replies to the same prompt
    with different ratings are a pair too (the better rated one chosen)."""
    out, rated = [], {}
    for r in rows:
        if r.get("choice") in (1, 2):
            out.append({"prompt": r["prompt"], "chosen": r["replies"][r["choice"] - 1],
                        "rejected": r["replies"][2 - r["choice"]]})
        elif r.get("rating") is not None:
            rated.setdefault(r["prompt"], []).append((r["rating"], r["reply"]))
    for prompt, replies in rated.items():
        replies.sort(key=lambda t: -t[0])
        for i, (ri, a) in enumerate(replies):
            for rj, b in replies[i + 1 :]:
                if ri > rj:
                    out.append({"prompt": prompt, "chosen": a, "rejected": b})
    return out


def load_pairs(path: str, log=print) -> list[dict]:
    """The pairs of a file, checked; those whose chosen equals rejected are dropped (and counted):
    they hold no preference, and their h is 0 whatever the model."""
    rows = read_rows(path)
    if rows and "prompt" in rows[0] and ("choice" in rows[0] or "rating" in rows[0]):
        rows = pairs_from_feedback(rows)
        log(f"{path}: chat.py's feedback log, {len(rows)} preference pairs")
    for i, r in enumerate(rows, 1):
        for col in COLUMNS:
            if not isinstance(r.get(col), str):
                raise SystemExit(f"error: {path}, row {i}: no text column '{col}' (a pair needs {', '.join(COLUMNS)})")
        for col in ("chosen", "rejected"):
            if not r[col].strip():
                raise SystemExit(f"error: {path}, row {i}: the {col} completion is empty")
    kept = [r for r in rows if r["chosen"] != r["rejected"]]
    if len(kept) < len(rows):
        log(f"{path}: dropped {len(rows) - len(kept)} pair(s) whose chosen equals rejected")
    if not kept:
        raise SystemExit(f"error: {path} holds no preference pairs" + (" (every chosen equals its rejected)" if rows else ""))
    return kept


def digest(rows: list[dict]) -> str:
    """A fingerprint of the pairs' text: a resumed run checks that its files still hold the same pairs."""
    return hashlib.sha256(json.dumps([[r[k] for k in COLUMNS] for r in rows], ensure_ascii=False).encode()).hexdigest()


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def self_play_pairs(model, tok, data_dir: str, split: str, n: int, c: dict, rt) -> list[dict]:
    """n pairs from random passages of data_dir/<split>.bin (inside one document each): the passage's
    start, its true continuation, and the model's own continuation of that start."""
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    p = c["prompt_tokens"]
    windows = draw_windows(data, n, p + c["completion_tokens"], tok.eot_id, c["seed"] + (split == "val"))
    sampled = continue_prompts(model, [w[:p] for w in windows], c["completion_tokens"], 1.0, None, tok.eot_id, rt,
                               c["seed"], log=lambda msg: print(f"  {split}: {msg}", flush=True))
    out = [{"prompt": tok.decode(w[:p]), "chosen": tok.decode(w[p:]), "rejected": tok.decode(s)}
           for w, s in zip(windows, sampled, strict=True)]
    return [pair for pair in out if pair["rejected"].strip()]


def tokenize(rows: list[dict], tok, block_size: int) -> tuple[list[tuple], int]:
    """(prompt, chosen, rejected) token ids per pair, cut to fit block_size the same way every
    time: the prompt loses its oldest tokens first (to fit the longer completion), then the
    completions their last ones. Returns the pairs and how many were cut."""
    out, cut = [], 0
    for r in rows:
        p = [tok.eot_id, *tok.encode(r["prompt"])]  # a prompt starts like a document
        cw, cl = tok.encode(r["chosen"]), tok.encode(r["rejected"])
        kept = fit_prompt(p, min(block_size, max(len(cw), len(cl))), block_size)
        cut += len(kept) < len(p) or max(len(cw), len(cl)) > block_size
        out.append((kept, cw[:block_size], cl[:block_size]))
    return out, cut


def batch_logps(model, batch: list[tuple], block_size: int, device, mean: bool):
    """log pi(chosen|prompt) and log pi(rejected|prompt) for a batch of pairs, (B,) each, in one
    forward pass over 2B rows (chosen rows first). mean=True: per-token means (IPO)."""
    prompts = [p for p, _, _ in batch] * 2
    completions = [cw for _, cw, _ in batch] + [cl for _, _, cl in batch]
    x, y = pack(prompts, completions, block_size, device)
    logits, _ = model(x, y)
    logps = completion_logps(logits, y)
    if mean:
        logps = logps / (y != -1).sum(-1)
    return logps.chunk(2)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float, loss_type: str, label_smoothing: float):
    """The loss (mean over pairs) and the metrics TRL logs, under TRL's names."""
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # regresses h to 1/(2 beta) instead of pushing it up forever
    else:
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    r_c, r_r = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()  # the implicit rewards
    metrics = {"loss": losses.mean().item(), "rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
               "rewards/accuracies": (r_c > r_r).float().mean().item(), "rewards/margins": (r_c - r_r).mean().item(),
               "logps/chosen": pi_c.detach().mean().item(), "logps/rejected": pi_r.detach().mean().item()}
    return losses.mean(), metrics


def resumed_config(c: dict, saved: dict) -> dict:
    """A resumed run keeps RUN_KEYS from its checkpoint: one set to another value is an error, one
    left at its default takes the checkpoint's value (so the first run's command, or a shorter one,
    resumes it)."""
    defaults = {k: globals()[k] for k in RUN_KEYS}
    differ = [f"{k}={c[k]!r} (checkpoint: {saved[k]!r})" for k in RUN_KEYS if c[k] != saved[k] and c[k] != defaults[k]]
    if differ:
        raise SystemExit(f"error: resuming keeps the reference and the pairs the run began with, but you set "
                         f"{', '.join(differ)}: drop these settings, or start a fresh run in another --out_dir")
    return {**c, **{k: saved[k] for k in RUN_KEYS}}


def main(c: dict) -> None:
    check_config(c)
    if c["loss_type"] not in ("sigmoid", "ipo"):
        raise SystemExit(f"error: loss_type must be sigmoid or ipo, got {c['loss_type']!r}")
    if c["beta"] <= 0 or not 0 <= c["label_smoothing"] < 0.5:
        raise SystemExit("error: need beta > 0 and 0 <= label_smoothing < 0.5")
    if c["loss_type"] == "ipo" and c["label_smoothing"]:
        raise SystemExit("error: label_smoothing applies to loss_type=sigmoid only: IPO's squared loss has no labels to smooth")
    if os.path.abspath(c["out_dir"]) == os.path.abspath(c["init_from"]):
        raise SystemExit("error: out_dir must differ from init_from: the starting checkpoint is never overwritten")
    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
    if c["resume"] and not os.path.exists(ckpt_path):
        raise SystemExit(f"error: no checkpoint at {ckpt_path} to resume: start the run without --resume=True, "
                         "or pass the --out_dir it wrote to")
    rt = setup_runtime(c["device"], c["dtype"], c["seed"], c["backend"], c["ddp_timeout"])
    log = functools.partial(print, flush=True) if rt.master else (lambda *a, **k: None)
    # dropout off, as TRL does by default (disable_dropout): the reference is computed without it, and
    # with it the policy would differ from the reference before the first step (rewards not 0)
    if c["resume"]:  # the model so far, and all the run needs to go on as if it had never stopped
        model, tok, start = load_model(c["out_dir"], rt.device, dropout=0.0)
        run = start.get("dpo")
        if run is None:
            raise SystemExit(f"error: {ckpt_path} holds no DPO run to resume (written by another script or an older "
                             "dpo.py): start a fresh run in another --out_dir")
        c = resumed_config(c, start["config"])
        budget = run["budget"] if run["budget"] and run["budget"]["max_time"] == c["max_time"] else None
        if start["iter_num"] >= schedule_end(c["max_iters"], c["lr_decay_iters"], budget)[0] or 0 < c["max_time"] <= run["elapsed"]:
            raise SystemExit(f"{ckpt_path} is at step {start['iter_num']}: its run has ended (raise --max_iters or "
                             "--max_time to train on)")
    else:
        model, tok, start = load_model(c["init_from"], rt.device, "--init_from", dropout=0.0)
        budget = None  # {"max_time", "iters"}: how many steps fit in max_time, fixed once (see iters_in_budget)
    if rt.master:  # one run per out_dir, and a fresh run never replaces a tuned model; held until main returns
        _lock = claim_out_dir(c["out_dir"], not c["resume"], c["overwrite"], "continue it with --resume=True")
    block_size = model.config.block_size

    # --- the pairs ---------------------------------------------------------------------------------
    train_path, val_path = c["pairs"], c["val_pairs"]
    if c["resume"]:  # the files the run began with, never made again
        train_path, val_path = run["pairs"]["train"][0], run["pairs"]["val"][0]
    elif c["make_pairs"]:
        t0 = time.time()
        log(f"making {c['make_pairs']} self-play pairs from {start['data_dir']} with {c['init_from']}...")
        train_path, val_path = (os.path.join(c["out_dir"], f) for f in ("pairs.jsonl", "pairs_val.jsonl"))
        if rt.master:
            write_jsonl(train_path, self_play_pairs(model, tok, start["data_dir"], "train", c["make_pairs"], c, rt))
            write_jsonl(val_path, self_play_pairs(model, tok, start["data_dir"], "val", max(10, c["make_pairs"] // 10), c, rt))
        if rt.ddp:
            torch.distributed.barrier()
        log(f"wrote {train_path} and {val_path} in {time.time() - t0:.0f}s")
    if not train_path:  # the pairs an earlier --make_pairs run wrote
        train_path = os.path.join(c["out_dir"], "pairs.jsonl")
        if not os.path.exists(train_path):
            raise SystemExit("error: no pairs: pass --pairs=FILE (prompt, chosen, rejected) or --make_pairs=N")
        if not val_path and os.path.exists(os.path.join(c["out_dir"], "pairs_val.jsonl")):
            val_path = os.path.join(c["out_dir"], "pairs_val.jsonl")
    rows = load_pairs(train_path, log)
    val_rows = load_pairs(val_path, log) if val_path else []
    # the files and a fingerprint of their pairs: a resumed run must train on the same ones
    sources = {"train": [train_path, digest(rows)], "val": [val_path, digest(val_rows)]}
    for split, (path, fingerprint) in sources.items():
        if c["resume"] and fingerprint != run["pairs"][split][1]:
            raise SystemExit(f"error: the pairs of {path} changed since the run in {c['out_dir']} began (its reference "
                             "log-probs are theirs): restore the file, or start a fresh run in another --out_dir")
    if not val_path:  # hold out a tenth, the same every time
        n_val = max(1, len(rows) // 10)
        if len(rows) <= n_val:
            raise SystemExit(f"error: {train_path} holds {len(rows)} usable pair(s): too few to hold out a tenth and "
                             "train on the rest; add pairs, or pass --val_pairs=FILE")
        order = np.random.default_rng(c["seed"]).permutation(len(rows))
        val_rows, rows = [rows[i] for i in order[:n_val]], [rows[i] for i in order[n_val:]]
    train, cut = tokenize(rows, tok, block_size)
    val, val_cut = tokenize(val_rows, tok, block_size)
    log(f"{len(train)} training pairs ({cut} cut to fit block_size={block_size}), {len(val)} held-out ({val_cut} cut)")

    # --- the reference: its log-probs once per pair, then it is no longer needed -------------------
    mean = c["loss_type"] == "ipo"

    @torch.no_grad()
    def all_logps(model, data: list[tuple]) -> list[torch.Tensor]:
        """log p(chosen|prompt) and log p(rejected|prompt) of every pair, 32 pairs at a time, in the
        training's precision (the reference and the held-out evaluations must compare like with like)."""
        with rt.autocast():
            chunks = [batch_logps(model, data[i : i + 32], block_size, rt.device, mean) for i in range(0, len(data), 32)]
        return [torch.cat(t) for t in zip(*chunks, strict=True)]

    if c["resume"]:  # saved by the run's start: the same numbers, and no pass to repeat
        ref = run["ref"]
    else:
        t0 = time.time()
        log(f"the reference's log-probabilities of {len(train) + len(val)} pairs...")
        ref = {"train": all_logps(model, train), "val": all_logps(model, val)}
        log(f"  done in {time.time() - t0:.0f}s")

    optimizer = configure_optimizer(model, c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.ptdtype == torch.float16)
    # every process draws the global batch from one generator and keeps its share: one state to save
    gen = torch.Generator().manual_seed(c["seed"])
    iter_num, elapsed = 0, 0.0
    if c["resume"]:  # everything but the random states, restored last (see below)
        optimizer.load_state_dict(start["optimizer"])
        scaler.load_state_dict(run["scaler"])
        iter_num, elapsed = start["iter_num"], run["elapsed"]
        log(f"resuming {ckpt_path} at step {iter_num}")
    raw = model
    if rt.device_type == "cuda" if c["compile"] is None else c["compile"]:
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    min_lr = c["min_lr"] or c["learning_rate"] / 10
    last_iter, lr_decay_iters = schedule_end(c["max_iters"], c["lr_decay_iters"], budget)

    metrics_path = os.path.join(c["out_dir"], "metrics.jsonl")  # every logged step and evaluation, one JSON line
    if rt.master:
        keep_metrics(metrics_path, iter_num if c["resume"] else -1)  # the steps after the checkpoint are redone

    def record(prefix: str, it: int, metrics: dict) -> None:
        if rt.master:
            log_metrics(metrics_path, {"iter": it, **{prefix + k: v for k, v in metrics.items()}})

    @torch.no_grad()
    def evaluate(it: int) -> dict:
        model.eval()
        pi = all_logps(model, val)
        model.train()
        _, m = dpo_loss(pi[0], pi[1], ref["val"][0], ref["val"][1], c["beta"], c["loss_type"], c["label_smoothing"])
        # the rewards are 0 at step 0 (the policy is the reference): this says where the model itself stands
        m["logps/accuracies"] = (pi[0] > pi[1]).float().mean().item()
        record("eval/", it, m)
        log(f"eval at step {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        return m

    def save(it: int) -> None:
        rng = rng_state(rt)  # every process's (under DDP, all of them take part)
        if not rt.master:
            return
        save_checkpoint({**{k: start[k] for k in ("model_args", "tokenizer", "data_dir", "bytes_per_token")},
                         "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "iter_num": it,
                         "config": c, "init_from": c["init_from"],
                         # the run's own state, for --resume=True (train.py refuses a checkpoint without "rng")
                         "dpo": {"scaler": scaler.state_dict(), "elapsed": elapsed, "budget": budget, "ref": ref,
                                 "pairs": sources, "gen": gen.get_state(), "rng": rng}},
                        ckpt_path)
        rows = read_metrics(metrics_path)  # the plots are drawn from the same file a user reads
        for name in ("loss", "rewards/accuracies", "rewards/margins"):
            key = name.replace("/", "_")
            plot_curves(os.path.join(c["out_dir"], f"dpo_{key}.png"),
                        {"train": curve(rows, name), "held-out": curve(rows, "eval/" + name)},
                        "step", name, f"DPO on {c['init_from']}: {name}")

    t_start = time.time() - elapsed  # max_time counts from here: the pairs and the reference are not training
    eval_seconds = 0.0  # how long an evaluation and a save take: the budget counts those to come
    if c["resume"]:  # restored last, so that nothing above draws from them
        gen.set_state(run["gen"])
        restore_rng_state(run["rng"], rt, log)
    else:
        evaluate(0)
        eval_seconds = rank0_clock(t_start, rt)  # under DDP rank 0's clock decides for everyone
    model.train()
    t0 = time.time()
    last_saved = iter_num if c["resume"] else 0  # the step of the last checkpoint (0: none yet)
    timed_from = (iter_num + 1, 0.0)  # the speed is measured from the end of the first step (warm-up)
    with ddp_guard(rt):
        for it in range(iter_num + 1, c["max_iters"] + 1):
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it - 1, c["learning_rate"], c["warmup_iters"], lr_decay_iters, min_lr)
            for micro in range(c["gradient_accumulation_steps"]):
                if rt.ddp:
                    model.require_backward_grad_sync = micro == c["gradient_accumulation_steps"] - 1
                idx = torch.randint(len(train), (rt.world_size, c["batch_size"]), generator=gen)[rt.rank]
                with rt.autocast():
                    pi_c, pi_r = batch_logps(model, [train[i] for i in idx], block_size, rt.device, mean)
                    loss, metrics = dpo_loss(pi_c, pi_r, ref["train"][0][idx], ref["train"][1][idx], c["beta"],
                                             c["loss_type"], c["label_smoothing"])
                    if getattr(raw, "moe_layers", None):  # MoE: keep the routers balanced, as in pretraining
                        loss = loss + raw.router_loss()
                if not torch.isfinite(loss):  # stop before the bad step touches the weights
                    kept = (f"{ckpt_path} keeps step {last_saved}" if last_saved
                            else f"nothing was saved, {c['init_from']} is unchanged")
                    raise SystemExit(f"error: the loss is {loss.item()} at step {it}: stopped; {kept} (try a lower learning_rate)")
                scaler.scale(loss / c["gradient_accumulation_steps"]).backward()
            if c["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if it % c["log_interval"] == 0:
                record("", it, metrics)
                dt = (time.time() - t0) / c["log_interval"]
                t0 = time.time()
                log(f"step {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f", {dt * 1000:.0f} ms/step")
            elapsed = rank0_clock(t_start, rt)
            if it == timed_from[0]:
                timed_from = (it, elapsed)
            if budget is None and c["max_time"] > 0 and it == timed_from[0] + 10:  # fixed once, then saved
                n = iters_in_budget(it, elapsed, timed_from, c["max_time"], c["eval_interval"], eval_seconds)
                budget = {"max_time": c["max_time"], "iters": n}
                last_iter, lr_decay_iters = schedule_end(c["max_iters"], c["lr_decay_iters"], budget)
                if n < c["max_iters"]:
                    log(f"max_time={c['max_time']:.0f}s: {n} of the max_iters={c['max_iters']} steps fit; the schedule "
                        "ends there")
            out_of_time = c["max_time"] > 0 and elapsed >= c["max_time"]  # a safety net for a machine that slowed down
            if it % c["eval_interval"] == 0 or it >= last_iter or out_of_time:
                t = rank0_clock(t_start, rt)
                evaluate(it)
                save(it)
                last_saved, eval_seconds = it, rank0_clock(t_start, rt) - t
            if it >= last_iter or out_of_time:
                if it < last_iter:
                    log(f"max_time={c['max_time']:.0f}s reached at step {it}, before the {last_iter} planned")
                break
    log(f"done in {(time.time() - t_start) / 60:.1f} min: {ckpt_path} (works with sample.py and eval.py), "
        f"curves {c['out_dir']}/dpo_*.png")
    if rt.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(configure(globals()))
