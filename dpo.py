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

import codecs
import functools
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
from torch.nn import functional as F

from configurator import resolve
from model import completion_logps, fit_prompt, pack
from plumbing import (
    GENERATE_BATCH,
    Budget,
    check_config,
    check_ctrl_c,
    check_tokenizer,
    claim_out_dir,
    configure_optimizer,
    continue_prompts,
    curve,
    ddp_guard,
    decode_compile,
    decode_steps,
    draw_share,
    draw_windows,
    end_ddp,
    hold_data,
    keep_freed_memory,
    keep_metrics,
    keep_resumed,
    load_model,
    log_metrics,
    non_finite,
    on_ctrl_c,
    plot_curves,
    rank0_clock,
    read_metrics,
    restore_rng_state,
    rng_state,
    same_dir,
    save_checkpoint,
    setup_runtime,
    share_batch,
    unwrap,
    wrap_model,
)
from tokenizer import load as load_tokenizer
from tokenizer import load_meta

# -----------------------------------------------------------------------------
init_from = "out-gutenberg"  # the pretrained checkpoint: the starting policy and the frozen reference
out_dir = "out-gutenberg-dpo"
resume = False  # continue the run in out_dir (from its ckpt.pt), on the pairs it began with
overwrite = False  # let a fresh run replace a model already in out_dir
pairs = ""  # JSONL, JSON, parquet or a Hub dataset of prompt / chosen / rejected; or chat.py's feedback.jsonl
val_pairs = ""  # held-out pairs; "" = out_dir/pairs_val.jsonl when made here, else 10% of pairs held out
make_pairs = 0  # build this many self-play pairs (and a tenth as many held out, 100 at least), train on them
data_dir = ""  # self-play: the prepared data to draw passages from; "" = the data init_from was trained on
prompt_tokens = 32  # self-play: length of the prompt passage, in tokens
completion_tokens = 192  # self-play: the true and the sampled continuations; long ones hold more evidence per pair
beta = 0.03  # lower than TRL's 0.1: the policy may move further (docs/experiments.md has the sweep)
loss_type = "sigmoid"  # sigmoid (DPO) | ipo
label_smoothing = 0.0  # conservative DPO: the probability that a pair's labels are swapped
batch_size = 16  # pairs per micro-step (under DDP, lower if the global batch needs it to split evenly)
gradient_accumulation_steps = 1  # micro-steps per step (global, divided among DDP processes)
learning_rate = 3e-4
max_iters = 300
max_time = 0.0  # seconds of training (the steps that fit are counted early on, as in train.py); 0 = no limit
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 10
lr_decay_iters = 0  # 0 = the last step (max_iters, or fewer: what fits in max_time)
min_lr = 0.0  # 0 = learning_rate / 10
eval_interval = 50
log_interval = 10
device = "auto"
dtype = "auto"
compile = None  # None: the model compiled on CUDA only; the pairs' decode step as in sample.py (5,000+ steps)
backend = ""
ddp_timeout = 300.0
seed = 1337
# -----------------------------------------------------------------------------
COLUMNS = ("prompt", "chosen", "rejected")
FORMATS = (".jsonl", ".json", ".parquet")  # the pair files read (besides a Hub dataset's name)
# what a resumed run keeps from its checkpoint: the reference, the pairs, their split and their scoring
RUN_KEYS = ("init_from", "pairs", "val_pairs", "make_pairs", "prompt_tokens", "completion_tokens",
            "loss_type", "seed")


def read_rows(path: str) -> list[tuple[int, dict]]:
    """Rows of a JSONL/JSON/parquet file or a Hub dataset, each with its number (in a JSONL file, its
    line); errors name the file and the row."""
    if path.endswith(FORMATS) and not os.path.isfile(path):  # not a Hub dataset's name (owner/name)
        raise SystemExit(f"error: no such file: {path}")
    if os.path.isfile(path) and not path.endswith(FORMATS):
        raise SystemExit(f"error: {path}: pairs are read from {', '.join(FORMATS)} files or a Hub dataset, "
                         "not this format: convert it to JSONL, one object with "
                         f"{', '.join(COLUMNS)} per line")
    if path.endswith((".jsonl", ".json")) and os.path.exists(path):
        with open(path, "rb") as f:
            raw = f.read().removeprefix(codecs.BOM_UTF8)  # as utf-8-sig: some editors write a BOM first
        if path.endswith(".json") and raw.lstrip().startswith(b"["):
            try:
                lines = [json.dumps(r).encode() for r in json.loads(raw)]
            except ValueError as e:  # not JSON, or not UTF-8
                raise SystemExit(f"error: {path}: not JSON ({e}): a .json file holds one list of "
                                 "objects; a .jsonl file one object per line") from None
        else:
            lines = raw.splitlines()
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise SystemExit(f"error: {path}, row {i}: bytes that are not UTF-8 ({e.reason} at byte "
                                 f"{e.start})") from None
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}, row {i}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SystemExit(f"error: {path}, row {i}: not a JSON object")
            rows.append((i, row))
        return rows
    from datasets import load_dataset

    try:
        if path.endswith(".parquet"):
            return list(enumerate(load_dataset("parquet", data_files=path, split="train"), 1))
        return list(enumerate(load_dataset(path, split="train"), 1))
    except Exception as e:
        raise SystemExit(f"error: cannot read pairs from {path}: {str(e).splitlines()[0][:200]}") from None


def feedback_error(r: dict) -> str:
    """What is wrong with a row of chat.py's feedback log, or "" if nothing."""
    if "choice" in r:
        if r["choice"] in (None, "="):  # skipped, or a tie: no pair
            return ""
        if type(r["choice"]) is not int or r["choice"] not in (1, 2):  # not 1.0, not true: an index
            return f"choice {r['choice']!r} is not 1, 2, = or null"
        replies = r.get("replies")
        if not (isinstance(replies, list) and len(replies) == 2 and all(isinstance(t, str) for t in replies)):
            return "a choice needs 'replies', a list of the 2 replies' texts"
    elif "rating" in r:
        if r["rating"] is None:  # skipped
            return ""
        rating = r["rating"]
        if isinstance(rating, bool) or not isinstance(rating, int | float) or not math.isfinite(rating):
            return f"rating {rating!r} is not a number"
        if not isinstance(r.get("reply"), str):
            return "a rating needs 'reply', the reply's text"
    else:
        return "neither a 'choice' nor a 'rating'"
    return "" if isinstance(r.get("prompt"), str) else "no text 'prompt'"


def pairs_from_feedback(rows: list[tuple[int, dict]], path: str) -> list[tuple[int, dict]]:
    """chat.py's log as pairs: a pairwise choice is a pair; two rated replies to the same prompt
    with different ratings are a pair too (the better rated one chosen). A pair is numbered by the
    row of its chosen reply."""
    out, rated = [], {}
    for i, r in rows:
        if why := feedback_error(r):
            raise SystemExit(f"error: {path}, row {i}: not a row of chat.py's feedback log ({why}): "
                             "correct or delete it")
        if r.get("choice") in (1, 2):
            out.append((i, {"prompt": r["prompt"], "chosen": r["replies"][r["choice"] - 1],
                            "rejected": r["replies"][2 - r["choice"]]}))
        elif r.get("rating") is not None:
            rated.setdefault(r["prompt"], []).append((r["rating"], i, r["reply"]))
    for prompt, replies in rated.items():
        replies.sort(key=lambda t: -t[0])
        for k, (ri, i, a) in enumerate(replies):
            for rj, _, b in replies[k + 1 :]:
                if ri > rj:
                    out.append((i, {"prompt": prompt, "chosen": a, "rejected": b}))
    return out


def load_pairs(path: str, log=print) -> list[dict]:
    """The pairs of a file, checked; those whose chosen equals rejected are dropped (and counted):
    they hold no preference, and their h is 0 whatever the model."""
    rows, feedback = read_rows(path), False
    if rows and "prompt" in rows[0][1] and ("choice" in rows[0][1] or "rating" in rows[0][1]):
        rows, feedback = pairs_from_feedback(rows, path), True
        log(f"{path}: chat.py's feedback log, {len(rows)} preference pairs")
    for i, r in rows:
        for col in COLUMNS:
            if not isinstance(r.get(col), str):
                raise SystemExit(f"error: {path}, row {i}: no text column '{col}' (a pair needs "
                                 f"{', '.join(COLUMNS)})")
        for col in ("chosen", "rejected"):
            if not r[col].strip():
                raise SystemExit(f"error: {path}, row {i}: the {col} completion is empty")
    kept = [r for _, r in rows if r["chosen"] != r["rejected"]]
    if len(kept) < len(rows):
        log(f"{path}: dropped {len(rows) - len(kept)} pair(s) whose chosen equals rejected")
    if not kept:
        why = " (every chosen equals its rejected)" if rows else ""
        if feedback and not rows:  # ratings of different prompts compare nothing
            why = (": a pair is a --pairwise choice, or two replies to the same prompt rated differently; "
                   "rate with chat.py --pairwise, or ask a prompt again and rate its new reply")
        raise SystemExit(f"error: {path} holds no preference pairs{why}")
    return kept


def digest(rows: list[dict]) -> str:
    """A fingerprint of the pairs' text: a resumed run checks that its files still hold the same pairs."""
    text = json.dumps([[r[k] for k in COLUMNS] for r in rows], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def self_play_pairs(model, tok, data_dir: str, split: str, n: int, prompt_tokens: int, completion_tokens: int,
                    seed: int, rt, compile: bool = False) -> list[dict]:
    """n pairs from random passages of data_dir/<split>.bin (inside one document each): the passage's
    start, its true continuation, and the model's own continuation of that start (sampled as it is,
    at temperature 1, no top-k)."""
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    windows = draw_windows(data, n, prompt_tokens + completion_tokens, tok.eot_id, seed + (split == "val"))
    sampled = continue_prompts(model, [w[:prompt_tokens] for w in windows], completion_tokens, tok.eot_id, rt,
                               seed, log=lambda msg: print(f"  {split}: {msg}", flush=True), compile=compile,
                               temperature=1.0)
    out = [{"prompt": tok.decode(w[:prompt_tokens]), "chosen": tok.decode(w[prompt_tokens:]),
            "rejected": tok.decode(s)} for w, s in zip(windows, sampled, strict=True)]
    return [pair for pair in out if pair["rejected"].strip()]


def tokenize(rows: list[dict], tok, block_size: int) -> tuple[list[tuple], int]:
    """(prompt, chosen, rejected) token ids per pair, cut to fit block_size the same way every
    time: the prompt loses its oldest tokens first (to fit the longer completion), then the
    completions their last ones. Returns the pairs and how many were cut."""
    out, cut = [], 0
    for r in rows:
        # a prompt is read as the start of a document, after <|endoftext|>, as chat.py's are. Self-play
        # prompts are passages from mid-book, sampled without it: the prefix shifts their log-probs a
        # little, but policy and reference score the same tokens (DPO needs no on-policy samples)
        p = [tok.eot_id, *tok.encode(r["prompt"])]
        cw, cl = tok.encode(r["chosen"]), tok.encode(r["rejected"])
        kept = fit_prompt(p, min(block_size, max(len(cw), len(cl))), block_size)
        cut += len(kept) < len(p) or max(len(cw), len(cl)) > block_size
        out.append((kept, cw[:block_size], cl[:block_size]))
    return out, cut


def batch_logps(model, batch: list[tuple], block_size: int, device, mean: bool):
    """log pi(chosen|prompt) and log pi(rejected|prompt) for a batch of pairs, (B,) each, in one
    forward pass over 2B rows (chosen rows first), padded to a multiple of 32 tokens (see the
    training loop). mean=True: per-token means (IPO)."""
    prompts = [p for p, _, _ in batch] * 2
    completions = [cw for _, cw, _ in batch] + [cl for _, _, cl in batch]
    x, y = pack(prompts, completions, block_size, device, multiple=32)
    logits = model(x)
    logps = completion_logps(logits, y)
    if mean:
        logps = logps / (y != -1).sum(-1)
    return logps.chunk(2)


@torch.no_grad()
def all_logps(model, data: list[tuple], block_size: int, rt, mean: bool) -> list[torch.Tensor]:
    """log p(chosen|prompt) and log p(rejected|prompt) of every pair, 32 pairs at a time, in the
    training's precision (the reference and the held-out evaluations compare like with like)."""
    with rt.autocast():
        chunks = [batch_logps(model, data[i : i + 32], block_size, rt.device, mean)
                  for i in range(0, len(data), 32)]
    return [torch.cat(t) for t in zip(*chunks, strict=True)]


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float, loss_type: str, label_smoothing: float):
    """The loss (mean over pairs) and the metrics TRL logs, under TRL's names."""
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # regresses h to 1/(2 beta) instead of pushing it up forever
    else:
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    r_c, r_r = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()  # the implicit rewards
    metrics = {"loss": losses.mean().item(), "rewards/chosen": r_c.mean().item(),
               "rewards/rejected": r_r.mean().item(), "rewards/accuracies": (r_c > r_r).float().mean().item(),
               "rewards/margins": (r_c - r_r).mean().item(), "logps/chosen": pi_c.detach().mean().item(),
               "logps/rejected": pi_r.detach().mean().item()}
    return losses.mean(), metrics



# -----------------------------------------------------------------------------
# The run. Under this guard so that the tests can import the functions above without running it.
if __name__ == "__main__":
    config, given = resolve(globals())  # given: the keys a config file or a flag set
    globals().update(config)

    check_config(config)  # impossible values fail here, before any model is loaded
    if loss_type not in ("sigmoid", "ipo"):
        raise SystemExit(f"error: loss_type must be sigmoid or ipo, got {loss_type!r}")
    if beta <= 0 or not 0 <= label_smoothing < 0.5:
        raise SystemExit("error: need beta > 0 and 0 <= label_smoothing < 0.5")
    if loss_type == "ipo" and label_smoothing:
        raise SystemExit("error: label_smoothing applies to loss_type=sigmoid only: IPO's squared loss has "
                         "no labels to smooth")
    if same_dir(out_dir, init_from):  # by real path: a symlink to init_from is init_from
        raise SystemExit("error: out_dir must differ from init_from: the starting checkpoint is never "
                         "overwritten")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    # what the run leaves when it stops early: the step its checkpoint keeps (None: nothing saved yet)
    iter_num, saved_iter = None, None
    earlier = not resume and os.path.exists(ckpt_path)  # --overwrite=True replaces an earlier run

    def kept() -> str:
        if saved_iter is not None:
            return f"{ckpt_path} keeps step {saved_iter}"
        if earlier:  # its model is kept until the first save; its metrics (and made pairs) are this run's
            return (f"nothing was saved, {init_from} is unchanged; {ckpt_path} is the earlier run's model, "
                    "but its log and pairs may be this run's: it cannot be resumed")
        return f"{ckpt_path} is unchanged" if resume else f"nothing was saved, {init_from} is unchanged"

    def interrupted(signum, frame):
        """Ctrl-C, anywhere: one line saying what is kept, instead of a traceback."""
        at = "" if iter_num is None else f" at step {iter_num}"
        hint = " (continue with --resume=True)" if saved_iter is not None else ""
        raise SystemExit(f"interrupted{at}: {kept()}{hint}")

    on_ctrl_c(interrupted)
    if resume and not os.path.exists(ckpt_path):
        raise SystemExit(f"error: no checkpoint at {ckpt_path} to resume: start the run without "
                         "--resume=True, or pass the --out_dir it wrote to")
    if make_pairs and not resume:
        if pairs or val_pairs:
            raise SystemExit("error: --make_pairs makes the pairs, and --pairs or --val_pairs names others: "
                             "drop them, or pass --make_pairs=0 (a config file may set it)")
        # pairs that a run left, or a person put there, without a model (that case is claim_out_dir's, below)
        made = [os.path.join(out_dir, f) for f in ("pairs.jsonl", "pairs_val.jsonl")]
        if any(map(os.path.exists, made)) and not os.path.exists(ckpt_path) and not overwrite:
            raise SystemExit(f"error: {next(filter(os.path.exists, made))} exists, and --make_pairs would "
                             "replace it: train on those pairs with --make_pairs=0, pass another --out_dir, "
                             "or --overwrite=True")
    min_lr = min_lr or learning_rate / 10

    # --- setup: device, the starting model (or the run's, to resume), out_dir ---------------------
    rt = setup_runtime(device, dtype, seed, backend, ddp_timeout)
    log = functools.partial(print, flush=True) if rt.master else (lambda *a, **k: None)
    # the same global batch whatever the number of processes, as in train.py: gradient_accumulation_steps
    # becomes each process's micro-steps, of micro_batch pairs (batch_size unless it does not divide evenly)
    gradient_accumulation_steps, micro_batch = share_batch(batch_size, gradient_accumulation_steps, rt.world_size,
                                                           log, unit="pairs")
    fitted = None  # how many steps fit in max_time, counted once (see plumbing.Budget)
    # dropout off, as TRL does by default (disable_dropout): the reference is computed without it, and
    # with it the policy would differ from the reference before the first step (rewards not 0)
    if resume:  # the model so far; the run's state is restored below
        model, tok, ckpt = load_model(out_dir, rt.device, dropout=0.0)
        run = ckpt.get("dpo")
        if run is None:
            raise SystemExit(f"error: {ckpt_path} holds no DPO run to resume (written by another script or "
                             "an older dpo.py): start a fresh run in another --out_dir")
        config = keep_resumed(config, given, ckpt["config"], RUN_KEYS,
                              "the reference and the pairs the run began with")
        globals().update({k: config[k] for k in RUN_KEYS})
        fitted = run["budget"]
        fits = fitted["iters"] if fitted and fitted["max_time"] == max_time else max_iters
        if ckpt["iter_num"] >= min(max_iters, fits) or 0 < max_time <= run["elapsed"]:
            raise SystemExit(f"{ckpt_path} is at step {ckpt['iter_num']}: its run has ended (raise "
                             "--max_iters or --max_time to train on)")
        saved_iter = ckpt["iter_num"]
    else:
        model, tok, ckpt = load_model(init_from, rt.device, "--init_from", dropout=0.0)
        if make_pairs:  # self-play draws its passages from the data the checkpoint was trained on, or data_dir
            if prompt_tokens + completion_tokens > model.config.block_size:  # every pair would be cut
                raise SystemExit(f"error: prompt_tokens + completion_tokens = {prompt_tokens + completion_tokens} "
                                 f"is longer than {init_from}'s block_size={model.config.block_size}: pass "
                                 f"--prompt_tokens and --completion_tokens that add up to at most "
                                 f"{model.config.block_size}")
            whose = "the data_dir given" if data_dir else f"the data {init_from} was trained on"
            data_dir = data_dir or ckpt["data_dir"]
            missing = [f for f in ("train.bin", "val.bin") if not os.path.exists(os.path.join(data_dir, f))]
            if missing:
                where = "" if os.path.isabs(data_dir) else f" (relative to the working folder {os.getcwd()})"
                path = os.path.join(data_dir, missing[0])
                raise SystemExit(f"error: --make_pairs draws passages from {whose}, but {path} is not "
                                 f"there{where}: run dpo.py from the folder train.py ran in, pass "
                                 "--data_dir=DIR, or --pairs=FILE instead")
            data_lock = hold_data(data_dir)  # prepare.py cannot replace the files while pairs are drawn
            # the passages are token ids: the data's tokenizer must be the checkpoint's
            check_tokenizer(ckpt, init_from, load_tokenizer(data_dir, load_meta(data_dir)), data_dir,
                            f"pass the --data_dir {init_from} was trained on")
    if rt.master:  # one run per out_dir, and a fresh run never replaces a tuned model
        lock = claim_out_dir(out_dir, not resume, overwrite, "continue it with --resume=True")
    block_size = model.config.block_size

    # --- data: the pairs --------------------------------------------------------------------------
    train_path, val_path = pairs, val_pairs
    if resume:  # the files the run began with, never made again
        train_path, val_path = run["pairs"]["train"][0], run["pairs"]["val"][0]
    elif make_pairs:
        t0 = time.time()
        log(f"making {make_pairs} self-play pairs from {data_dir} with {init_from}...")
        train_path, val_path = (os.path.join(out_dir, f) for f in ("pairs.jsonl", "pairs_val.jsonl"))
        if rt.master:
            n_val = max(100, make_pairs // 10)  # at least 100: one pair is then at most 1 % of the accuracy
            n_steps = sum(decode_steps(n, GENERATE_BATCH, completion_tokens) for n in (make_pairs, n_val))
            decode = decode_compile(compile, rt.device_type, n_steps, log)
            for path, split, n in ((train_path, "train", make_pairs), (val_path, "val", n_val)):
                write_jsonl(path, self_play_pairs(model, tok, data_dir, split, n, prompt_tokens,
                                                  completion_tokens, seed, rt, decode))
        if rt.ddp:
            torch.distributed.barrier()
        if data_lock is not None:  # the passages are drawn: prepare.py may replace the data now
            os.close(data_lock)
        log(f"wrote {train_path} and {val_path} in {time.time() - t0:.0f}s")
    if not train_path:  # the pairs an earlier --make_pairs run wrote
        train_path = os.path.join(out_dir, "pairs.jsonl")
        if not os.path.exists(train_path):
            raise SystemExit("error: no pairs: pass --pairs=FILE (prompt, chosen, rejected) or "
                             "--make_pairs=N")
        if not val_path and os.path.exists(os.path.join(out_dir, "pairs_val.jsonl")):
            val_path = os.path.join(out_dir, "pairs_val.jsonl")
    train_rows = load_pairs(train_path, log)
    val_rows = load_pairs(val_path, log) if val_path else []
    if val_path and os.path.abspath(val_path) == os.path.abspath(train_path):
        log("note: --val_pairs is --pairs: the held-out figures are measured on the training pairs (leave "
            "--val_pairs out to hold out a tenth of them)")
    # the files and a fingerprint of their pairs: a resumed run must train on the same ones
    sources = {"train": [train_path, digest(train_rows)], "val": [val_path, digest(val_rows)]}
    for split, (path, fingerprint) in sources.items():
        if resume and fingerprint != run["pairs"][split][1]:
            raise SystemExit(f"error: the pairs of {path} changed since the run in {out_dir} began (its "
                             "reference log-probs are theirs): restore the file, or start a fresh run in "
                             "another --out_dir")
    if not val_path:  # hold out a tenth, the same every time
        n_val = max(1, len(train_rows) // 10)
        if len(train_rows) <= n_val:
            raise SystemExit(f"error: {train_path} holds {len(train_rows)} usable pair(s): too few to hold "
                             "out a tenth and train on the rest; add pairs, or pass --val_pairs=FILE")
        order = np.random.default_rng(seed).permutation(len(train_rows))
        val_rows, train_rows = [train_rows[i] for i in order[:n_val]], [train_rows[i] for i in order[n_val:]]
    train_data, cut = tokenize(train_rows, tok, block_size)
    val_data, val_cut = tokenize(val_rows, tok, block_size)
    log(f"{len(train_data)} training pairs ({cut} cut to fit block_size={block_size}), {len(val_data)} "
        f"held-out ({val_cut} cut)")

    # --- the reference: its log-probs once per pair, then it is no longer needed -------------------
    mean = loss_type == "ipo"
    if resume:  # saved by the run's start: the same numbers, and no pass to repeat
        ref_logps = run["ref"]
    else:
        t0 = time.time()
        log(f"the reference's log-probabilities of {len(train_data) + len(val_data)} pairs...")
        ref_logps = {"train": all_logps(model, train_data, block_size, rt, mean),
                     "val": all_logps(model, val_data, block_size, rt, mean)}
        log(f"  done in {time.time() - t0:.0f}s")

    # --- model: the policy, its optimizer and the run's state -------------------------------------
    optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.ptdtype == torch.float16)
    # every process draws the global batch from one generator and keeps its share: one state to save
    batch_gen = torch.Generator().manual_seed(seed)
    iter_num, elapsed = 0, 0.0
    if resume:  # all the run's state, random states included: nothing below draws from them
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(run["scaler"])
        iter_num, elapsed = ckpt["iter_num"], run["elapsed"]
        batch_gen.set_state(run["gen"])
        restore_rng_state(run["rng"], rt, log)
        log(f"resuming {ckpt_path} at step {iter_num}")
    ckpt_meta = {k: ckpt[k] for k in ("model_args", "tokenizer", "data_dir", "bytes_per_token")}  # to save
    del ckpt
    raw_model = model
    # compiled on CUDA only by default: the batches change length every step, which recompiles on CPU
    model = wrap_model(model, rt, rt.device_type == "cuda" if compile is None else compile)

    # --- training loop ----------------------------------------------------------------------------
    metrics_path = os.path.join(out_dir, "metrics.jsonl")  # every logged step and evaluation, one JSON line
    if rt.master:
        keep_metrics(metrics_path, iter_num if resume else -1)  # the steps after the checkpoint are redone
    # the steps that fit in max_time: timed from the end of the first step (which may compile), counted 10
    # steps later (train.py waits for its warmup's end, which is longer), then again every 30 steps from
    # the speed since (as train.py: batches of a few lengths, on a machine whose speed moves). An
    # evaluation scores every held-out pair, forward only (a third of the work of a training pair), in
    # steps of this process's gradient_accumulation_steps x micro_batch pairs
    eval_cost = len(val_data) / (3 * gradient_accumulation_steps * micro_batch)
    budget = Budget(max_time, max_iters, eval_interval, eval_cost, time_from=iter_num + 1, fit_at=iter_num + 11,
                    refit_every=30, saved=fitted, log=log)

    def get_lr(it: int) -> float:
        """train.py's schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters, or the last step."""
        decay_end = lr_decay_iters or budget.last
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it >= decay_end:
            return min_lr
        ratio = (it - warmup_iters) / max(1, decay_end - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    # from here on the batches come in a few sizes (batch_logps pads them to a multiple of 32 tokens):
    # keeping freed memory, as train.py does, then saves refaulting their pages at every step. Not
    # earlier: sampling and the reference's pass allocate sizes of their own, and the heap would fragment
    if rt.device_type == "cpu":
        keep_freed_memory()
    model.train()
    t_start = time.time() - elapsed  # max_time counts from here: the pairs and the reference are not training
    t0, n_timed = time.time(), 0
    iter_start = iter_num
    with ddp_guard(rt):
        while True:
            check_ctrl_c()  # a Ctrl-C that a compiled call dropped stops here (plumbing.on_ctrl_c)
            done = budget.done(iter_num, elapsed, iter_start)  # at the last step that fits, or out of time

            # evaluate on the held-out pairs (at step 0 too), every eval_interval steps and at the end,
            # and save after each but step 0's (the model is then init_from's)
            if done or (iter_num % eval_interval == 0 and (iter_num > iter_start or not resume)):
                model.eval()
                pi_c, pi_r = all_logps(model, val_data, block_size, rt, mean)
                model.train()
                _, m = dpo_loss(pi_c, pi_r, *ref_logps["val"], beta, loss_type, label_smoothing)
                # the rewards are 0 at step 0 (the policy is the reference): this says where the model stands
                m["logps/accuracies"] = (pi_c > pi_r).float().mean().item()
                if rt.master:
                    log_metrics(metrics_path, {"iter": iter_num, **{"eval/" + k: v for k, v in m.items()}})
                log(f"eval at step {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
                if iter_num > 0:
                    # a diverged model is never saved: the checkpoint keeps the last good step, as in train.py
                    if not math.isfinite(m["loss"]) or non_finite(unwrap(model).state_dict()):
                        what = (f"held-out loss is {m['loss']}" if not math.isfinite(m["loss"])
                                else "model's weights are not finite")
                        raise SystemExit(f"error: the {what} at step {iter_num}: stopped; {kept()} (try a "
                                         "lower learning_rate)")
                    # the run's own state, for --resume=True (train.py refuses a checkpoint without "rng")
                    run = {"scaler": scaler.state_dict(), "elapsed": elapsed, "budget": budget.fitted,
                           "ref": ref_logps, "pairs": sources, "gen": batch_gen.get_state(),
                           "rng": rng_state(rt)}  # every process's random state: all ranks take part
                    if rt.master:
                        save_checkpoint({**ckpt_meta, "model": unwrap(model).state_dict(),
                                         "optimizer": optimizer.state_dict(), "iter_num": iter_num,
                                         "config": config, "init_from": init_from, "dpo": run}, ckpt_path)
                    saved_iter = iter_num  # at once: a Ctrl-C while the plots are drawn says so
                    if rt.master:
                        rows = read_metrics(metrics_path)  # the plots are drawn from the file a user reads
                        for name in ("loss", "rewards/accuracies", "rewards/margins"):
                            plot_curves(os.path.join(out_dir, f"dpo_{name.replace('/', '_')}.png"),
                                        {"train": curve(rows, name), "held-out": curve(rows, "eval/" + name)},
                                        "step", name, f"DPO on {init_from}: {name}")
                t0, n_timed = time.time(), 0  # evaluation time is not training time
            if done:
                break

            # one step: gradient_accumulation_steps micro-batches of micro_batch pairs, one optimizer step
            lr = get_lr(iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # this process's share of the step's pairs, (micro-steps, micro_batch): the same pairs with 1 process or 8
            step_idx = draw_share(len(train_data), gradient_accumulation_steps, micro_batch, batch_gen, rt)
            for micro_step in range(gradient_accumulation_steps):
                if rt.ddp:  # all-reduce the gradients on the last micro-step only (see train.py)
                    model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
                idx = step_idx[micro_step]
                with rt.autocast():
                    pi_c, pi_r = batch_logps(model, [train_data[i] for i in idx], block_size, rt.device, mean)
                    ref_c, ref_r = ref_logps["train"][0][idx], ref_logps["train"][1][idx]
                    loss, metrics = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type, label_smoothing)
                    if getattr(raw_model, "moe_layers", None):  # MoE: balanced routers, as in pretraining
                        loss = loss + raw_model.router_loss()
                if not torch.isfinite(loss):  # stop before the bad step touches the weights
                    raise SystemExit(f"error: the loss is {loss.item()} at step {iter_num + 1}: stopped; "
                                     f"{kept()} (try a lower learning_rate)")
                scaler.scale(loss / gradient_accumulation_steps).backward()
            if grad_clip > 0:  # the optimizer step, as in train.py
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            iter_num += 1
            n_timed += 1
            elapsed = rank0_clock(t_start, rt)  # under DDP rank 0's clock decides for everyone
            budget.tick(iter_num, elapsed)
            if iter_num % log_interval == 0:  # the metrics of rank 0's last micro-batch
                dt = (time.time() - t0) / n_timed
                t0, n_timed = time.time(), 0
                if rt.master:
                    log_metrics(metrics_path, {"iter": iter_num, **metrics})
                log(f"step {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    + f", {dt * 1000:.0f} ms/step")
    log(f"done in {(time.time() - t_start) / 60:.1f} min: {ckpt_path} (works with sample.py and eval.py), "
        f"curves {out_dir}/dpo_*.png")
    del model  # the DDP wrapper: end_ddp frees it before the process group ends
    end_ddp(rt)
