"""
Measures a checkpoint on a text: cross-entropy per token, perplexity, and bits per byte.

    python eval.py --out_dir=out-gutenberg --text=book.txt   # any UTF-8 text file, all of it
    python eval.py --out_dir=out-gutenberg                   # the held-out books of its data_dir

Loss per token depends on the tokenizer (a GPT-2 token holds 2.7 bytes of French, one of our BPE
tokens 4): bits per byte = total bits / total UTF-8 bytes does not, so it compares any two models.
Every token is scored once, with at least block_size/2 tokens of context once the text is longer
than a window (overlapping windows, as in Hugging Face's perplexity guide).
"""

import json
import math
import os

import numpy as np
import torch
from torch.nn import functional as F

from common import load_model, setup_runtime
from configurator import configure

# -----------------------------------------------------------------------------
out_dir = "out-gutenberg"
text = ""  # a UTF-8 text file; "" = the val.bin of the data_dir the checkpoint was trained on
batch_size = 16  # windows per forward pass
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------


@torch.no_grad()
def score(model, tokens: np.ndarray, batch_size: int, rt) -> tuple[float, int]:
    """Sum of -log p(token | context) in nats over tokens[1:], and how many tokens that is.
    Windows of n = min(block_size, len - 1) tokens start every block_size/2 tokens, the last one
    ends at the text's end; each scores only the targets that no earlier window scored."""
    n = min(model.config.block_size, len(tokens) - 1)
    last = len(tokens) - 1 - n
    starts = sorted({*range(0, last, max(1, n // 2)), last})
    total, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        chunk = starts[b : b + batch_size]
        x = torch.from_numpy(np.stack([tokens[s : s + n] for s in chunk]).astype(np.int64)).to(rt.device)
        y = torch.from_numpy(np.stack([tokens[s + 1 : s + 1 + n] for s in chunk]).astype(np.int64)).to(rt.device)
        for i, s in enumerate(chunk):
            k = b + i
            if k > 0:  # targets up to the previous window's end are already scored
                y[i, : starts[k - 1] + n - s] = -1
        with rt.autocast():
            logits, _ = model(x, y)
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum")
        total += nll.item()
        count += int((y != -1).sum())
    return total, count


def main(c: dict) -> dict:
    rt = setup_runtime(c["device"], c["dtype"])
    model, tok, ckpt = load_model(c["out_dir"], rt.device)
    if c["text"]:
        try:
            with open(c["text"], encoding="utf-8") as f:
                content = tok.normalize(f.read())
        except FileNotFoundError:
            raise SystemExit(f"error: no such file: {c['text']}") from None
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: {c['text']} is not UTF-8 text (byte {e.start}): convert it first, e.g. with iconv") from None
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
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        # the bytes behind tokens[1:]: all of the split's bytes but those of its first token
        n_bytes = meta["val"]["bytes"] - len(tok.decode_bytes([int(tokens[0])]))
        source = f"{path} ({meta['val']['documents']} held-out documents)"
    if len(tokens) < 2:
        raise SystemExit("error: the text is too short to score (it needs at least one token)")
    nats, count = score(model, tokens, c["batch_size"], rt)
    res = {"tokens": count, "bytes": n_bytes, "loss": nats / count, "perplexity": math.exp(nats / count),
           "bits_per_byte": nats / math.log(2) / n_bytes}
    print(f"{source}: {count:,} tokens, {n_bytes:,} bytes")
    print(f"cross-entropy {res['loss']:.4f} nats/token, perplexity {res['perplexity']:.2f}, "
          f"{res['bits_per_byte']:.4f} bits per byte")
    return res


if __name__ == "__main__":
    main(configure(globals()))
