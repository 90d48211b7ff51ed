"""
Course part 1: text -> tokenizer -> token ids in two flat binary files.

    python prepare.py                          # the French novels, French BPE of 8,192 tokens
    python prepare.py --tokenizer=gpt2         # the course's GPT-2 tokenizer
    python prepare.py --tokenizer=char         # one token per character
    python prepare.py --dataset="my_books/*.txt" --name=mine

Writes data/<name>/: train.bin and val.bin (uint16 token ids, every document followed by
<|endoftext|>), tokenizer.tiktoken and meta.json. train.py then reads random windows of the .bin
files through np.memmap: the corpus is tokenized once, never held in memory, and any window is a
valid training example (the course's Dataset instead rebuilt its examples document by document).

The validation split is made of whole books that training never sees, chosen deterministically,
so the val loss measures what a reader cares about: how well the model writes text it has not read.
"""

import glob
import json
import os
import socket
import threading
import time
import urllib.parse

import numpy as np
from tqdm import tqdm

import tokenizer as tok
from configurator import configure

HUB_DATASET = "rayml/french_gutenberg"
LOCAL_MIRROR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "french_gutenberg"))
LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}

# -----------------------------------------------------------------------------
dataset = ""  # "" = the Hub's rayml/french_gutenberg (local mirror when offline); or a Hub name, folder or glob
text_column = "content"  # the column that holds each document's text (.txt files: one document per file)
tokenizer = "bpe"  # bpe | gpt2 | char
vocab_size = 8192  # for bpe, <|endoftext|> included
gpt2_ranks = tok.DEFAULT_GPT2_RANKS  # the GPT-2 ranks file, for --tokenizer=gpt2 offline
name = ""  # output folder data/<name>; default: gutenberg_bpe8192, gutenberg_gpt2, gutenberg_char
val_fraction = 0.05  # share of documents (whole books) held out for validation, at least one
seed = 1337  # which documents go to validation
force = False  # rebuild even if data/<name> already holds the same preparation
num_threads = os.cpu_count() or 1
# -----------------------------------------------------------------------------


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub, given up after `timeout` seconds (instead of minutes of
    retries inside datasets). HF_HUB_OFFLINE=1 answers no at once."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    ok = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # a daemon: a hung DNS lookup cannot block exit
    t.start()
    t.join(timeout)
    return bool(ok)


def local_files(spec: str) -> list[str]:
    """The data files a folder or a glob names, all of one supported kind, or []."""
    if os.path.isdir(spec):
        files = [f for ext in LOADERS for f in glob.glob(os.path.join(spec, "**", "*" + ext), recursive=True)]
    else:
        files = glob.glob(spec, recursive=True)
    return sorted(f for f in files if os.path.isfile(f))


def load_documents(spec: str, column: str) -> tuple[list[str], str]:
    """Returns (documents, a description of the source). Raises SystemExit with one line on failure."""
    from datasets import load_dataset

    if spec == "":
        if hub_reachable():
            return load_documents(HUB_DATASET, column)
        if not local_files(LOCAL_MIRROR):
            raise SystemExit(f"error: the Hub is unreachable and there is no local mirror at {LOCAL_MIRROR}: "
                             "pass --dataset=FOLDER_OR_GLOB of .parquet, .jsonl or .txt files")
        print(f"the Hub is unreachable: using the local mirror {os.path.normpath(LOCAL_MIRROR)}")
        spec = LOCAL_MIRROR
    files = local_files(spec)
    if files:
        kinds = {LOADERS.get(os.path.splitext(f)[1]) for f in files}
        if None in kinds or len(kinds) > 1:
            raise SystemExit(f"error: --dataset={spec} must name files of one kind among {', '.join(LOADERS)}, got "
                             + ", ".join(sorted({os.path.splitext(f)[1] or f for f in files})))
        kind = kinds.pop()
        extra = {"sample_by": "document"} if kind == "text" else {}
        if kind in ("text", "json"):
            extra["encoding_errors"] = "replace"  # bytes that are not UTF-8 become U+FFFD, and are counted below
        try:
            ds = load_dataset(kind, data_files=files, split="train", **extra)
        except Exception as e:  # the loaders raise many kinds of errors on malformed files
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise SystemExit(f"error: cannot read --dataset={spec} as {kind} files: {msg}") from None
        if kind == "text":
            column = "text"  # the text loader names its column "text"
        source = f"{len(files)} {kind} file(s) from {spec}"
    elif os.path.exists(spec) or any(c in spec for c in "*?[") or "/" not in spec:
        raise SystemExit(f"error: --dataset={spec} names no .parquet, .jsonl, .json or .txt file")
    else:  # a Hub dataset name such as rayml/french_gutenberg
        try:
            ds = load_dataset(spec, split="train")
        except Exception as e:
            raise SystemExit(f"error: cannot load --dataset={spec} from the Hub ({type(e).__name__}): "
                             "check the name and your connection, or pass a local folder or glob") from None
        source = f"the Hub dataset {spec}"
    if column not in ds.column_names:
        raise SystemExit(f"error: {source} has no column '{column}' (columns: {', '.join(ds.column_names)}): "
                         "pass --text_column=NAME")
    docs = [d for d in ds[column] if isinstance(d, str) and d.strip()]
    if len(docs) < len(ds):
        print(f"skipped {len(ds) - len(docs)} empty or missing documents")
    if n_bad := sum("\ufffd" in d for d in docs):
        print(f"{n_bad} documents hold bytes that are not UTF-8 (or U+FFFD itself): kept, those bytes read as U+FFFD")
    return docs, source


def write_bin(path: str, token_lists: list[list[int]], eot: int) -> int:
    """Concatenates the documents, each followed by <|endoftext|>, into a uint16 file. Returns the
    number of tokens. Written to a temporary file, then renamed: never a half-written .bin."""
    n = sum(len(t) + 1 for t in token_lists)
    arr = np.memmap(path + ".tmp", dtype=np.uint16, mode="w+", shape=(n,))
    i = 0
    for t in token_lists:
        arr[i : i + len(t)] = t
        arr[i + len(t)] = eot
        i += len(t) + 1
    arr.flush()
    del arr
    os.replace(path + ".tmp", path)
    return n


def main(config: dict) -> str:
    c = config
    if c["tokenizer"] not in ("bpe", "gpt2", "char"):
        raise SystemExit(f"error: --tokenizer={c['tokenizer']} is not one of bpe, gpt2, char")
    if c["tokenizer"] == "bpe" and c["vocab_size"] > 65536:  # ids 0..65535 fit in uint16
        raise SystemExit(f"error: --vocab_size={c['vocab_size']} does not fit the uint16 .bin files "
                         "(token ids up to 65,535): use at most 65536")
    if not 0.0 < c["val_fraction"] < 1.0:
        raise SystemExit(f"error: --val_fraction={c['val_fraction']} must be between 0 and 1 (exclusive)")
    name = c["name"] or "gutenberg_" + (f"bpe{c['vocab_size']}" if c["tokenizer"] == "bpe" else c["tokenizer"])
    data_dir = os.path.join("data", name)
    # what defines this preparation: if meta.json records the same, the files can be reused
    recipe = {k: c[k] for k in ("dataset", "text_column", "tokenizer", "val_fraction", "seed")}
    if c["tokenizer"] == "bpe":
        recipe["vocab_size"] = c["vocab_size"]
    meta_path = os.path.join(data_dir, "meta.json")
    if not c["force"] and os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("recipe") == recipe and all(os.path.exists(os.path.join(data_dir, f)) for f in ("train.bin", "val.bin", tok.TOKENIZER_FILE)):
            print(f"{data_dir} already holds this preparation: reusing it (--force rebuilds)")
            return data_dir
    if c["tokenizer"] == "gpt2":
        enc = tok.gpt2(c["gpt2_ranks"])  # checked before the slow part: a missing file fails at once

    t0 = time.time()
    docs, source = load_documents(c["dataset"], c["text_column"])
    if len(docs) < 2:
        raise SystemExit(f"error: {source} holds {len(docs)} non-empty document(s); whole documents are held out "
                         "for validation, so at least 2 are needed")
    # whole documents to validation: a seeded permutation, so the split is the same on every machine
    n_val = max(1, round(len(docs) * c["val_fraction"]))
    val_ids = set(np.random.default_rng(c["seed"]).permutation(len(docs))[:n_val].tolist())
    splits = {"train": [d for i, d in enumerate(docs) if i not in val_ids],
              "val": [d for i, d in enumerate(docs) if i in val_ids]}
    print(f"loaded {len(docs)} documents from {source} in {time.time() - t0:.1f}s: "
          f"{len(splits['train'])} for training, {n_val} held out for validation")

    t1 = time.time()
    if c["tokenizer"] == "bpe":
        print(f"training a byte-level BPE of {c['vocab_size']} tokens on the training split...")
        enc = tok.train_bpe(splits["train"], c["vocab_size"])
    elif c["tokenizer"] == "char":
        enc = tok.train_char(splits["train"])
        if enc.vocab_size > 65536:
            raise SystemExit(f"error: {enc.vocab_size} distinct characters do not fit uint16 token ids")
    print(f"tokenizer {enc.kind}: {enc.vocab_size} tokens ({time.time() - t1:.1f}s)")

    os.makedirs(data_dir, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # until the new meta.json is written, the folder reads as incomplete
    meta = {"recipe": recipe, "source": source, "tokenizer": enc.save(data_dir), "vocab_size": enc.vocab_size}
    batch = 8  # documents per encode_batch call: large enough for the threads, small enough for the bar
    for split, texts in splits.items():
        ids = []
        with tqdm(total=len(texts), desc=f"encoding {split}", unit="doc") as bar:
            for i in range(0, len(texts), batch):
                ids += enc.encode_batch(texts[i : i + batch], num_threads=c["num_threads"])
                bar.update(len(ids) - bar.n)
        n_tokens = write_bin(os.path.join(data_dir, f"{split}.bin"), ids, enc.eot_id)
        n_bytes = sum(len(enc.normalize(t).encode("utf-8")) for t in texts)
        meta[split] = {"documents": len(texts), "tokens": n_tokens, "bytes": n_bytes,
                       "bytes_per_token": n_bytes / n_tokens}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    os.replace(meta_path + ".tmp", meta_path)  # meta.json last: its presence means the folder is complete
    print(f"wrote {data_dir}: train {meta['train']['tokens']:,} tokens, val {meta['val']['tokens']:,} tokens, "
          f"{meta['train']['bytes_per_token']:.2f} bytes/token, in {time.time() - t0:.1f}s")
    return data_dir


if __name__ == "__main__":
    main(configure(globals()))
