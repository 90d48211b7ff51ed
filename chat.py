"""
Course part 6: talk with the model, rate its replies, and watch it learn from each rating.

    python chat.py --out_dir=out-gutenberg           # type a prompt, read the reply, rate it from -1 to +1
    python chat.py --pairwise                        # two replies per prompt: pick the better one (1, 2 or =)
    python chat.py --script=session.txt              # the same lines, read from a file, not the keyboard
    python chat.py --auto_rate=dialogue < prompts.txt  # a rule rates instead of a person: +1 for dialogue

Each rating is one step of REINFORCE (Williams, 1992), the policy gradient at the heart of RLHF:
    loss = -(rating - baseline) * mean_t log p(reply_t | prompt, reply_<t) + kl_coef * mean_t KL(p || p_ref)
- The log-probabilities are those of the reply's tokens given the prompt and the reply so far: the
  model predicted them there.
- The baseline is a running mean of the ratings: a reply better than usual is reinforced, a worse
  one discouraged, which lowers the variance of the gradient.
- The KL term keeps the model close to the frozen starting model at the reply's positions, so that
  a few ratings cannot wreck its French.

Every exchange is appended at once to <chat_dir>/feedback.jsonl (prompt, replies, rating or choice,
time, update count), which dpo.py can read as preference pairs. The tuned model goes to
<chat_dir>/ckpt.pt every save_every updates and at the end (end of input, q, or Ctrl-C); the
starting checkpoint is never written. rewards.png plots the ratings and their running mean.
"""

import codecs
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time

import torch
from torch.nn import functional as F

from configurator import configure
from model import SAMPLING, sampling
from plumbing import (
    check_config,
    claim_out_dir,
    completion_logits,
    curve,
    decode_compile,
    has_dialogue,
    keep_metrics,
    load_model,
    log_metrics,
    on_ctrl_c,
    plot_curves,
    read_metrics,
    same_dir,
    save_checkpoint,
    setup_runtime,
    stream,
)

# -----------------------------------------------------------------------------
out_dir = "out-gutenberg"  # the starting model: read, never written
chat_dir = ""  # tuned model, feedback.jsonl, rewards.png; "" = <out_dir>-chat. An existing one is continued
fresh = False  # start again from out_dir even if chat_dir holds a tuned model (its log is kept, appended to)
overwrite = False  # let --fresh replace the tuned model already in chat_dir
script = ""  # read the prompt and rating lines from this file instead of standard input
pairwise = False  # two replies per prompt, and the choice of the better one
auto_rate = ""  # "dialogue": a rule rates instead of a person (+1 if the reply has dialogue, -1 otherwise)
max_new_tokens = 60
globals().update(SAMPLING)  # model.SamplingConfig's settings and defaults, as in sample.py
compile = None  # the replies' decode step compiled; None: as in sample.py, so eager for replies this short
learning_rate = 5e-3  # plain SGD: the step stays proportional to the advantage (Adam would normalise it)
kl_coef = 0.1  # weight of the KL penalty to the starting model
baseline_decay = 0.9  # running mean of the ratings: baseline = decay * baseline + (1 - decay) * rating
grad_clip = 5.0  # a guard against a rare huge gradient; typical ones are well below
save_every = 10  # updates between saves of the tuned model
seed = 1337
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------
config = configure(globals())
globals().update(config)

check_config(config)  # the sampling settings, max_new_tokens, learning_rate, save_every...
if auto_rate not in ("", "dialogue"):
    raise SystemExit(f"error: --auto_rate={auto_rate} is not a known rule: use dialogue (or leave it empty)")
if auto_rate and pairwise:
    raise SystemExit("error: --auto_rate rates single replies: drop --pairwise")
if kl_coef < 0 or not 0 <= baseline_decay < 1:
    raise SystemExit("error: need kl_coef >= 0 and 0 <= baseline_decay < 1")
if not chat_dir:  # beside out_dir; for out_dir "." (or ".."), beside the folder it names
    base = os.path.normpath(out_dir)
    chat_dir = (os.path.abspath(base) if os.path.basename(base) in (".", "..") else base) + "-chat"
if same_dir(chat_dir, out_dir):  # by real path: a symlink to out_dir is out_dir
    raise SystemExit("error: chat_dir must differ from out_dir: the starting checkpoint is never overwritten")


# --- input: the lines of the keyboard, a pipe or a script --------------------------------------------
HELP = """Type a prompt; the model continues it. Then rate the reply:
  a number from -1 (bad) to 1 (good)   the model takes one step toward or away from that reply
  s                                    skip: no rating, no update
  q                                    save and quit (end of input and Ctrl-C do the same)
  ?                                    this help
With --pairwise, answer 1 or 2 for the better reply, = when neither is."""


def read_lines(source, echo: bool):
    """The lines of source (standard input's bytes, or a script's lines), as bytes: ask() decodes them.
    A helper thread reads them while the main thread waits for each in short steps. Waiting so, the
    main thread notices Ctrl-C: the kernel may hand SIGINT to any thread (one of torch's workers, say),
    and a main thread blocked in read() would never hear of it. echo: print each line, so that a
    scripted session reads like a typed one."""
    q: queue.Queue = queue.Queue()

    def reader() -> None:
        for line in source:
            q.put(line)
        q.put(None)  # the end of the input

    threading.Thread(target=reader, daemon=True).start()
    while True:
        try:
            line = q.get(timeout=0.1)
        except queue.Empty:
            continue  # back in Python for a moment: a pending Ctrl-C is raised here, as KeyboardInterrupt
        if line is None:
            return
        line = line.rstrip(b"\r\n")
        if echo:
            print(line.decode("utf-8", errors="replace"))
        yield line


def ask(lines, prompt: str) -> str:
    """The next input line (from the keyboard, a pipe or the script); EOFError at the end. A line that
    is not UTF-8 text (Latin-1 typed in another terminal's encoding, say) is refused in one line, and
    the question asked again: no such text reaches the model, the tokenizer or feedback.jsonl."""
    while True:
        print(prompt, end="", flush=True)
        line = next(lines, None)
        if line is None:
            raise EOFError
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as e:
            print(f"that line is not UTF-8 text (byte {line[e.start]:#04x} at position {e.start}): type it "
                  "again in UTF-8 (set your terminal's encoding to UTF-8)")


def ask_rating(lines, pairwise: bool):
    """A rating in [-1, 1] (or 1, 2, "=" with --pairwise), "s" or "q"; asks again, saying why, otherwise."""
    while True:
        question = "choice [1, 2, =, s, q, ?]> " if pairwise else "rating [-1..1, s, q, ?]> "
        answer = ask(lines, question).strip()
        if answer in ("s", "q"):
            return answer
        if answer == "?":
            print(HELP)
            continue
        if pairwise:
            if answer in ("1", "2", "="):
                return answer
            print(f"'{answer}' is not a choice: answer 1 or 2 for the better reply, = for a tie, s to skip, "
                  "q to quit")
            continue
        try:
            rating = float(answer)
        except ValueError:
            print(f"'{answer}' is not a number: rate from -1 (bad) to 1 (good), s to skip, q to quit")
            continue
        if -1.0 <= rating <= 1.0:
            return rating
        print(f"{rating} is outside [-1, 1]: rate from -1 (bad) to 1 (good)")


interactive = not script and sys.stdin.isatty()  # a person at the keyboard
if script:
    try:
        with open(script, "rb") as f:  # less the byte-order mark some editors write first (Windows Notepad)
            lines = read_lines(f.read().removeprefix(codecs.BOM_UTF8).splitlines(), echo=True)
    except OSError as e:
        raise SystemExit(f"error: cannot read the script {script}: {e}") from None
else:
    # bytes, so that a line that is not UTF-8 is asked again; unbuffered (raw): a buffered reader's lock,
    # held by the reading thread while it waits, would abort the interpreter's shutdown
    lines = read_lines(sys.stdin.buffer.raw, echo=not interactive)

# --- setup: device, the frozen reference, chat_dir -------------------------------------------------
rt = setup_runtime(device, dtype, seed)
compile = decode_compile(compile, rt.device_type, max_new_tokens)  # a reply at a time: counted per reply
ref_model, tok, ref_ckpt = load_model(out_dir, rt.device)
for p in ref_model.parameters():
    p.requires_grad_(False)  # the reference is frozen: no gradient, no change
# one session per chat_dir, and --fresh never replaces a tuned model unless asked
lock = claim_out_dir(chat_dir, fresh, overwrite, "continue it without --fresh", "--chat_dir")


# --- model: the policy (the tuned model of an earlier session, or out_dir's) and its update ---------
def reinforce_step(policy, ref_model, optimizer, prompt, replies, advantages, kl_coef: float,
                   grad_clip: float) -> dict:
    """One policy-gradient step on one or more replies to a prompt, each with its advantage."""
    policy.train()
    loss, kl_total = 0.0, 0.0
    for reply, adv in zip(replies, advantages, strict=True):
        logits, targets = completion_logits(policy, prompt, reply)  # (T, V), (T,)
        logp = F.log_softmax(logits.float(), dim=-1)
        with torch.no_grad():
            ref_logp = F.log_softmax(completion_logits(ref_model, prompt, reply)[0].float(), dim=-1)
        token_logp = logp.gather(1, targets[:, None]).squeeze(1)  # log p(reply_t | context), (T,)
        kl = (logp.exp() * (logp - ref_logp)).sum(-1).mean()  # exact KL over the vocabulary, mean over T
        loss = loss - adv * token_logp.mean() + kl_coef * kl
        kl_total += kl.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    optimizer.step()
    policy.eval()
    return {"loss": loss.item(), "kl": kl_total / len(replies), "grad_norm": grad_norm.item()}


def save(policy, state: dict, ref_ckpt: dict, config: dict, chat_dir: str, metrics_path: str) -> None:
    """The tuned model to chat_dir/ckpt.pt (with the reference's model_args and tokenizer), and the
    plot of the ratings beside it, drawn from metrics.jsonl."""
    save_checkpoint({**{k: ref_ckpt[k] for k in ("model_args", "tokenizer", "data_dir", "bytes_per_token")},
                     "model": policy.state_dict(), "config": config, "chat": state,
                     "iter_num": ref_ckpt.get("iter_num", 0)}, os.path.join(chat_dir, "ckpt.pt"))
    if not state["ratings"]:  # pairwise choices only, or nothing rated yet: no curve to draw
        return
    rows = read_metrics(metrics_path)  # the plot is drawn from the same file a user reads
    plot_curves(os.path.join(chat_dir, "rewards.png"), {"rating": curve(rows, "rating", "update"),
                "running mean (the baseline)": curve(rows, "baseline", "update")},
                "update", "rating", f"ratings of {chat_dir}")


continued = not fresh and os.path.exists(os.path.join(chat_dir, "ckpt.pt"))  # an earlier session's model
policy_dir = chat_dir if continued else out_dir
policy, _, policy_ckpt = load_model(policy_dir, rt.device, dropout=0.0)  # as the reference it is held to
if continued and "chat" not in policy_ckpt:  # train.py's or dpo.py's model: the session would replace it
    raise SystemExit(f"error: {chat_dir}/ckpt.pt is not a model that chat.py tuned (train.py or dpo.py wrote "
                     "it), and a session saves its own there: pass another --chat_dir")
state = policy_ckpt.get("chat", {"updates": 0, "baseline": 0.0, "ratings": []})
# a session goes on against the reference it started from: with another (another tokenizer or block_size,
# other weights) it would tune these weights with the wrong tokenizer, and save a checkpoint pairing them
with open(os.path.join(out_dir, "ckpt.pt"), "rb") as f:
    reference = {"out_dir": out_dir, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
started = state.get("reference")  # None: a session of an older chat.py, known by its tokenizer and shape
other_weights = started is not None and started["sha256"] != reference["sha256"]
if continued and (other_weights or any(policy_ckpt[k] != ref_ckpt[k] for k in ("tokenizer", "model_args"))):
    was = f" ({started['out_dir']}/ckpt.pt as it was then)" if started else ""
    raise SystemExit(f"error: {chat_dir} was tuned from another model than {out_dir}/ckpt.pt{was}: pass the "
                     "--out_dir its sessions started from, another --chat_dir, or --fresh --overwrite=True "
                     f"to start again from {out_dir}")
state["reference"] = reference
del policy_ckpt
print(f"policy from {policy_dir}/ckpt.pt ({state['updates']} updates so far), reference {out_dir}/ckpt.pt; "
      f"tuned model, feedback.jsonl and rewards.png go to {chat_dir}/")
optimizer = torch.optim.SGD(policy.parameters(), lr=learning_rate)
log_path = os.path.join(chat_dir, "feedback.jsonl")  # every exchange, kept across sessions (dpo.py reads it)
metrics_path = os.path.join(chat_dir, "metrics.jsonl")  # every update of this tuned model, one JSON line
keep_metrics(metrics_path, state["updates"], key="update")  # those the saved model has seen
gen = torch.Generator(device=rt.device).manual_seed(seed)

# --- the loop: a prompt, the reply (or two), a rating, one update ------------------------------------
if interactive:
    print(HELP)
on_ctrl_c()  # Ctrl-C raises KeyboardInterrupt, which ends the loop; counted, so a compiled step cannot drop it
try:  # the session ends by q, end of input, Ctrl-C or an error: its updates are saved in every case
    while True:
        text = ask(lines, "\nprompt> ")
        if not text.strip():  # an empty line asks again: in a script, it would take the next line for a rating
            continue
        if text.strip() == "q":
            break
        if text.strip() == "?":
            print(HELP)
            continue
        prompt = [tok.eot_id, *tok.encode(text)]  # as at the start of a document
        replies = []
        for k in range(2 if pairwise else 1):
            print(f"[{k + 1}] " if pairwise else "", end="")
            print(text, end="", flush=True)
            x = torch.tensor([prompt], dtype=torch.long, device=rt.device)
            with torch.no_grad(), rt.autocast(decode=True):  # the reply streams as it is written
                steps = rt.decoder(policy, compile).generate(x, max_new_tokens, **sampling(config),
                                                             eot_id=tok.eot_id, generator=gen, compile=compile)
                replies.append(stream(steps, tok))
        texts = [tok.decode(r) for r in replies]
        if auto_rate:
            answer = 1.0 if has_dialogue(texts[0]) else -1.0
            print(f"rating (rule {auto_rate}): {answer:+.0f}")
        else:
            answer = ask_rating(lines, pairwise)
        if answer == "q":
            break
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "prompt": text}
        if pairwise:
            choice = None if answer == "s" else answer if answer == "=" else int(answer)
            entry.update(replies=texts, choice=choice)
        else:
            entry.update(reply=texts[0], rating=None if answer == "s" else answer)
        stats = None
        if answer not in ("s", "=") and all(replies):
            if pairwise:  # the chosen reply up, the other down, by the same amount
                advantages = [0.5, -0.5] if answer == "1" else [-0.5, 0.5]
            else:
                advantages = [answer - state["baseline"]]
                state["baseline"] = baseline_decay * state["baseline"] + (1 - baseline_decay) * answer
                state["ratings"].append(answer)
            with rt.autocast():
                stats = reinforce_step(policy, ref_model, optimizer, prompt, replies, advantages, kl_coef,
                                       grad_clip)
            state["updates"] += 1
        entry["update"] = state["updates"]
        try:
            with open(log_path, "a", encoding="utf-8") as f:  # one whole line per exchange, on disk at once
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            saved = f"the updates so far are saved in {chat_dir}/ckpt.pt"
            raise SystemExit(f"error: cannot write {log_path} ({e.strerror}): free some space, or pass "
                             f"another --chat_dir ({saved})") from None
        if stats:
            rated = {"choice": int(answer)} if pairwise else {"rating": answer, "baseline": state["baseline"]}
            log_metrics(metrics_path, {"update": state["updates"], **rated, "advantage": advantages[0],
                                       "kl": stats["kl"]})
            print(f"update {state['updates']}: advantage {advantages[0]:+.2f}, KL to the start "
                  f"{stats['kl']:.4f}")
            if state["updates"] % save_every == 0:
                save(policy, state, ref_ckpt, config, chat_dir, metrics_path)
except (EOFError, KeyboardInterrupt):
    print()
finally:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would cut this last save short
    save(policy, state, ref_ckpt, config, chat_dir, metrics_path)
    logged = f"; feedback in {log_path}" if os.path.isfile(log_path) else "; no feedback logged"
    plot = f", ratings plot {chat_dir}/rewards.png" if state["ratings"] else ""
    print(f"saved {chat_dir}/ckpt.pt after {state['updates']} updates{logged}{plot}")
