"""
Measures a checkpoint on a text: cross-entropy per token, perplexity, and bits per byte.

    python eval.py --out_dir=out-gutenberg --text=book.txt   # any UTF-8 text file, all of it
    python eval.py --out_dir=out-gutenberg                   # the held-out books of its data_dir
    python eval.py --out_dir=out-gutenberg --num_samples=50  # and the quality of 50 generated texts
    python eval.py --out_dir=out-gutenberg --pairs=pairs.jsonl  # grammar: minimal pairs in BLiMP's format

Loss per token depends on the tokenizer (a GPT-2 token holds 2.7 bytes of French, one of our BPE
tokens 4): bits per byte = total bits / total UTF-8 bytes does not, so it compares any two models.
Every token is scored once, with at least block_size/2 tokens of context once the text is longer
than a window (overlapping windows, as in Hugging Face's perplexity guide); --stride=block_size
gives disjoint windows instead, as lm-evaluation-harness scores a text (loglikelihood_rolling).

A low loss does not guarantee good samples (a model can loop, or say the same thing every time), so
--num_samples=N also continues N prompts taken from the same text and measures what was written:
repeated 4-grams, distinct-2 and the share with dialogue (see text_stats).

--pairs=FILE scores minimal pairs instead (BLiMP, Warstadt et al., 2020): JSONL rows holding a
grammatical sentence_good and a sentence_bad that differs from it in one point; the model knows
the point when it gives sentence_good the higher total log-probability.
"""

import json
import math
import os

import numpy as np
import torch
from torch.nn import functional as F

from configurator import configure
from model import SAMPLING, completion_logps, pack, sampling
from plumbing import (
    check_config,
    check_tokenizer,
    continue_prompts,
    ctrl_c_ends_quietly,
    decode_compile,
    decode_steps,
    draw_windows,
    has_dialogue,
    load_model,
    setup_runtime,
)
from tokenizer import load as load_tokenizer
from tokenizer import load_meta

# -----------------------------------------------------------------------------
out_dir = "out-gutenberg"
text = ""  # a UTF-8 text file; "" = the val.bin of the data_dir the checkpoint was trained on
pairs = ""  # a JSONL file of minimal pairs (sentence_good, sentence_bad): score those instead of a text
batch_size = 16  # windows (or sentences) per forward pass
stride = 0  # tokens between the starts of two windows; 0 = block_size // 2; block_size = disjoint windows
device = "auto"
dtype = "auto"
num_samples = 0  # > 0: also continue this many prompts drawn from the text, and measure the samples
prompt_tokens = 16  # length of each prompt
max_new_tokens = 128
globals().update(SAMPLING)  # model.SamplingConfig's settings and defaults, as in sample.py
compile = None  # the samples' decode step compiled; None: as in sample.py (at least 5,000 decode steps)
seed = 1337  # the same prompts and random draws every time: before/after comparisons are paired
# -----------------------------------------------------------------------------


@torch.no_grad()
def score(model, tokens: np.ndarray, batch_size: int, rt, stride: int = 0) -> tuple[float, int]:
    """Sum of -log p(token | context) in nats over tokens[1:], and how many tokens that is.
    Windows of n = min(block_size, len - 1) tokens start every stride tokens (block_size/2 by
    default), the last one ends at the text's end; each scores only the targets that no earlier
    window scored."""
    n = min(model.config.block_size, len(tokens) - 1)
    last = len(tokens) - 1 - n
    starts = sorted({*range(0, last, max(1, min(stride or n // 2, n))), last})
    total, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        chunk = starts[b : b + batch_size]
        x = torch.from_numpy(np.stack([tokens[s : s + n] for s in chunk]).astype(np.int64)).to(rt.device)
        y = torch.from_numpy(
            np.stack([tokens[s + 1 : s + 1 + n] for s in chunk]).astype(np.int64)).to(rt.device)
        for i, s in enumerate(chunk):
            k = b + i
            if k > 0:  # targets up to the previous window's end are already scored
                y[i, : starts[k - 1] + n - s] = -1
        with rt.autocast():
            logits = model(x)
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1,
                              reduction="sum")
        total += nll.item()
        count += int((y != -1).sum())
    return total, count


def text_stats(texts: list[str]) -> dict:
    """Repetition and diversity of generated texts, on words (split at white space, so that models
    with different tokenizers compare):
    rep-4: the share of a text's 4-grams that repeat an earlier one in the same text (Welleck et
      al., 2019), averaged over texts; a model stuck in a loop scores high.
    distinct-2: distinct word pairs / all word pairs, over all texts (Li et al., 2016); low when
      the samples keep saying the same things.
    dialogue: the share of texts with a dialogue mark."""
    reps, pairs = [], []
    for t in texts:
        w = t.split()
        grams = [tuple(w[i : i + 4]) for i in range(len(w) - 3)]
        if grams:
            reps.append(1 - len(set(grams)) / len(grams))
        pairs += [tuple(w[i : i + 2]) for i in range(len(w) - 1)]
    return {"rep_4": sum(reps) / max(1, len(reps)), "distinct_2": len(set(pairs)) / max(1, len(pairs)),
            "dialogue": sum(map(has_dialogue, texts)) / max(1, len(texts))}


def sample_stats(model, tok, tokens: np.ndarray, c: dict, rt) -> dict:
    """Continues num_samples prompts of prompt_tokens drawn from tokens (never across a document's
    end), in batches of up to 256 (one batch for the counts the figures in docs/ were measured with),
    and measures the continuations with text_stats."""
    prompts = draw_windows(tokens, c["num_samples"], c["prompt_tokens"], tok.eot_id, c["seed"])
    batch = min(c["num_samples"], 256)
    compile = decode_compile(c["compile"], rt.device_type, decode_steps(c["num_samples"], batch, c["max_new_tokens"]))
    rows = continue_prompts(model, prompts, c["max_new_tokens"], tok.eot_id, rt, c["seed"], batch_size=batch,
                            log=print if batch < c["num_samples"] else None, compile=compile, **sampling(c))
    return text_stats([tok.decode(r) for r in rows])


def read_text(path: str) -> str:
    """A whole UTF-8 text file, or a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise SystemExit(f"error: no such file: {path}") from None
    except IsADirectoryError:
        raise SystemExit(f"error: {path} is a folder: pass one text file "
                         f"(cat {path}/*.txt > all.txt joins them)") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start}): "
                         "convert it first, e.g. with iconv") from None
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror}") from None


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(sentence_good, sentence_bad) of every row of a JSONL file, or a one-line error."""
    rows = []
    text = read_text(path).removeprefix("\ufeff")  # as utf-8-sig: some editors write a BOM first
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((row["sentence_good"], row["sentence_bad"]))
        except (ValueError, TypeError, KeyError):
            raise SystemExit(f"error: {path}, line {i}: "
                             "not a JSON object with sentence_good and sentence_bad") from None
        if not all(isinstance(x, str) and x for x in rows[-1]):
            raise SystemExit(f"error: {path}, line {i}: "
                             "sentence_good and sentence_bad must be non-empty strings")
    if not rows:
        raise SystemExit(f"error: {path} holds no pairs")
    return rows


@torch.no_grad()
def sentence_logps(model, tok, sentences: list[str], batch_size: int, rt) -> list[float]:
    """log p(sentence) in nats: the sum of log p(token | <|endoftext|>, the tokens before) over its
    tokens, the sentence read as the start of a document (lm-evaluation-harness scores BLiMP so)."""
    ids = [tok.encode(s) for s in sentences]
    block_size = model.config.block_size
    if too_long := [s for s, t in zip(sentences, ids, strict=True) if len(t) > block_size]:
        raise SystemExit(f"error: {len(too_long)} sentence(s) hold more than the model's "
                         f"{block_size} tokens of context, e.g. {too_long[0][:60]!r}: shorten them")
    out = []
    for b in range(0, len(ids), batch_size):
        chunk = ids[b : b + batch_size]
        x, y = pack([[tok.eot_id]] * len(chunk), chunk, block_size, rt.device)  # y: -1 but on the sentence
        with rt.autocast():
            logits = model(x)
        out += completion_logps(logits, y).tolist()
    return out


def score_pairs(model, tok, path: str, rows: list[tuple[str, str]], batch_size: int, rt) -> dict:
    logps = sentence_logps(model, tok, [g for g, _ in rows] + [b for _, b in rows], batch_size, rt)
    good, bad = logps[: len(rows)], logps[len(rows) :]
    correct = sum(g > b for g, b in zip(good, bad, strict=True))  # a tie counts as a miss
    print(f"{path}: sentence_good has the higher log-probability in {correct} of {len(rows)} minimal pairs: "
          f"accuracy {100 * correct / len(rows):.1f}%")
    return {"pairs": len(rows), "correct": correct, "accuracy": correct / len(rows), "logp_good": good,
            "logp_bad": bad}


def main(c: dict) -> dict:
    # the inputs first: a bad setting or path is an error before the model is loaded
    check_config(c)  # batch_size, prompt_tokens, the sampling settings... in range
    if c["pairs"] and c["text"]:
        raise SystemExit("error: --pairs and --text each name what to score: pass one of them")
    rows = read_pairs(c["pairs"]) if c["pairs"] else None
    raw = read_text(c["text"]) if c["text"] else None
    rt = setup_runtime(c["device"], c["dtype"])
    model, tok, ckpt = load_model(c["out_dir"], rt.device)
    if not 0 <= c["stride"] <= model.config.block_size:
        raise SystemExit(f"error: --stride={c['stride']} must lie between 0 and "
                         f"block_size={model.config.block_size}")
    if c["num_samples"] and c["prompt_tokens"] >= model.config.block_size:  # no room left for the samples
        raise SystemExit(f"error: --prompt_tokens={c['prompt_tokens']} leaves no room in the model's "
                         f"block_size={model.config.block_size}: pass fewer")
    if rows:
        return score_pairs(model, tok, c["pairs"], rows, c["batch_size"], rt)
    if raw is not None:
        content = tok.normalize(raw)
        if not content:
            raise SystemExit(f"error: {c['text']} is empty")
        # <|endoftext|> first, as at the start of every training document: the first token is scored too
        tokens = np.array([tok.eot_id, *tok.encode(content)], dtype=np.int64)
        n_bytes, source = len(content.encode("utf-8")), c["text"]
    else:
        data_dir = ckpt["data_dir"]
        path = os.path.join(data_dir, "val.bin")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} not found (the checkpoint's data_dir): pass --text=FILE")
        meta = load_meta(data_dir)
        check_tokenizer(ckpt, os.path.join(c["out_dir"], "ckpt.pt"), load_tokenizer(data_dir, meta), data_dir,
                        "its ids would be read as other strings; pass --text=FILE (tokenized with the "
                        "checkpoint's tokenizer)")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        # the bytes behind tokens[1:]: all of the split's bytes but those of its first token
        n_bytes = meta["val"]["bytes"] - len(tok.decode_bytes([int(tokens[0])]))
        source = f"{path} ({meta['val']['documents']} held-out documents)"
    if len(tokens) < 2:
        raise SystemExit("error: the text is too short to score (it needs at least one token)")
    if c["num_samples"] > len(tokens) // c["prompt_tokens"]:  # more prompts than the text holds: a typo
        raise SystemExit(f"error: --num_samples={c['num_samples']}: the text holds "
                         f"{len(tokens) // c['prompt_tokens']:,} prompts of prompt_tokens={c['prompt_tokens']} "
                         "at most: pass fewer")
    nats, count = score(model, tokens, c["batch_size"], rt, c["stride"])
    res = {"tokens": count, "bytes": n_bytes, "loss": nats / count, "perplexity": math.exp(nats / count),
           "bits_per_byte": nats / math.log(2) / n_bytes}
    print(f"{source}: {count:,} tokens, {n_bytes:,} bytes")
    print(f"cross-entropy {res['loss']:.4f} nats/token, perplexity {res['perplexity']:.2f}, "
          f"{res['bits_per_byte']:.4f} bits per byte")
    if c["num_samples"] > 0:
        res |= sample_stats(model, tok, tokens, c, rt)
        print(f"{c['num_samples']} samples of {c['max_new_tokens']} tokens after "
              f"{c['prompt_tokens']}-token prompts ({', '.join(f'{k} {v}' for k, v in sampling(c).items())}, "
              f"seed {c['seed']}): repeated 4-grams {100 * res['rep_4']:.1f}%, "
              f"distinct-2 {res['distinct_2']:.3f}, with dialogue {100 * res['dialogue']:.0f}%")
    return res


if __name__ == "__main__":
    with ctrl_c_ends_quietly():  # one line, exit status 130
        main(configure(globals()))
