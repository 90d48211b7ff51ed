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
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.parse

import numpy as np
from tqdm import tqdm

from configurator import configure
from tokenizer import (
    DEFAULT_GPT2_RANKS,
    TOKENIZER_FILE,
    Tokenizer,
    gpt2,
    lock_data_dir,
    read_meta,
    train_bpe,
    train_char,
)

HUB_DATASET = "rayml/french_gutenberg"
LOCAL_MIRROR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared",
                                            "french_gutenberg"))
LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}

# -----------------------------------------------------------------------------
# "" = the Hub's rayml/french_gutenberg (local mirror when offline); or a Hub name, folder or glob
dataset = ""
text_column = "content"  # the column that holds each document's text (.txt files: one document per file)
tokenizer = "bpe"  # bpe | gpt2 | char
vocab_size = 8192  # for bpe, <|endoftext|> included
gpt2_ranks = DEFAULT_GPT2_RANKS  # the GPT-2 ranks file, for --tokenizer=gpt2 offline
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


def resolve_dataset(spec: str) -> str:
    """What --dataset names: "" is the Hub's dataset, or its local mirror when the Hub is unreachable."""
    if spec != "":
        return spec
    if hub_reachable():
        return HUB_DATASET
    if not local_files(LOCAL_MIRROR):
        raise SystemExit(f"error: the Hub is unreachable and there is no local mirror at {LOCAL_MIRROR}: "
                         "pass --dataset=FOLDER_OR_GLOB of .parquet, .jsonl or .txt files")
    print(f"the Hub is unreachable: using the local mirror {os.path.normpath(LOCAL_MIRROR)}")
    return LOCAL_MIRROR


def is_hub_name(spec: str) -> bool:
    """owner/name, and no file or pattern here: a dataset on the Hub, such as rayml/french_gutenberg.
    A path (/data/books, ./books/x, books/2024/x) is no Hub name, even when nothing is there."""
    return (spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not os.path.exists(spec)
            and not any(c in spec for c in "*?["))


def fingerprint(spec: str) -> dict | None:
    """What the reuse check compares: the SHA-256 of every local file (a book added, removed, renamed
    or edited changes it; reading them costs a fraction of preparing them), or the Hub dataset's
    current revision. None when it cannot be known (the Hub is unreachable): then nothing is reused."""
    files = local_files(spec)
    if files:
        hashes = {}
        for path in files:
            with open(path, "rb") as f:
                hashes[path] = hashlib.file_digest(f, "sha256").hexdigest()
        return {"files": hashes}
    if is_hub_name(spec) and hub_reachable():
        from huggingface_hub import HfApi

        try:
            return {"hub": spec, "revision": HfApi().dataset_info(spec, timeout=10).sha}
        except Exception:  # a wrong name or a network failure: load_documents says which
            return None
    return None


def load_documents(spec: str, column: str, revision: str | None = None) -> tuple[list[str], str]:
    """Returns (documents, a description of the source). Raises SystemExit with one line on failure."""
    from datasets import load_dataset

    files = local_files(spec)
    if files:
        kinds = {LOADERS.get(os.path.splitext(f)[1]) for f in files}
        if None in kinds or len(kinds) > 1:
            raise SystemExit(f"error: --dataset={spec} must name files of one kind among "
                             f"{', '.join(LOADERS)}, got "
                             + ", ".join(sorted({os.path.splitext(f)[1] or f for f in files})))
        kind = kinds.pop()
        extra = {"sample_by": "document"} if kind == "text" else {}
        if kind in ("text", "json"):
            # bytes that are not UTF-8 become U+FFFD, and are counted below
            extra["encoding_errors"] = "replace"
        try:
            # download_mode: datasets caches local files by their modification time only; the reuse check
            # (fingerprint) reads their content, so that cache must not answer with an older version
            ds = load_dataset(kind, data_files=files, split="train", download_mode="force_redownload",
                              **extra)
        except Exception as e:  # the loaders raise many kinds of errors on malformed files
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise SystemExit(f"error: cannot read --dataset={spec} as {kind} files: {msg}") from None
        if kind == "text":
            column = "text"  # the text loader names its column "text"
        source = f"{len(files)} {kind} file(s) from {spec}"
    elif not is_hub_name(spec):
        raise SystemExit(f"error: --dataset={spec} names no .parquet, .jsonl, .json or .txt file")
    else:  # a Hub dataset name such as rayml/french_gutenberg
        try:
            ds = load_dataset(spec, split="train", revision=revision)  # the revision fingerprinted
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
        print(f"{n_bad} documents hold bytes that are not UTF-8 (or U+FFFD itself): "
              "kept, those bytes read as U+FFFD")
    return docs, source


def write_bin(path: str, token_lists: list[list[int]], eot: int) -> int:
    """Concatenates the documents, each followed by <|endoftext|>, into a uint16 file. Returns the
    number of tokens."""
    n = sum(len(t) + 1 for t in token_lists)
    arr = np.memmap(path, dtype=np.uint16, mode="w+", shape=(n,))
    i = 0
    for t in token_lists:
        arr[i : i + len(t)] = t
        arr[i + len(t)] = eot
        i += len(t) + 1
    arr.flush()
    del arr
    return n


def reusable(data_dir: str, recipe: dict) -> bool:
    """Whether data_dir holds a complete preparation to reuse: of this recipe, or of the same arguments
    on data that changed since (a model may have been trained on it: a new preparation retrains the BPE,
    and would leave that model without its data), which a note names. Says why not, when there is
    something there; other arguments are refused."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        return False
    try:
        old = read_meta(meta_path)
    except ValueError as e:
        print(f"{meta_path} {e}: rebuilding {data_dir}")
        return False
    paths = {f: os.path.join(data_dir, f) for f in ("train.bin", "val.bin", TOKENIZER_FILE)}
    if not all(os.path.isfile(p) for p in paths.values()) or any(
            os.path.getsize(paths[f"{split}.bin"]) != 2 * old[split]["tokens"] for split in ("train", "val")):
        print(f"{data_dir} is incomplete (a file is missing or truncated): rebuilding it")
        return False
    if old.get("recipe") == recipe:
        return True
    before = old["recipe"] if isinstance(old.get("recipe"), dict) else {}
    same_arguments = {**before, "data": 0} == {**recipe, "data": 0}
    if same_arguments and recipe["data"] is None:
        print(f"note: cannot tell whether {recipe['dataset']} changed (the Hub is unreachable)")
        return True
    if same_arguments and isinstance(before.get("data"), dict):
        a, b, counts = before["data"].get("files"), recipe["data"].get("files"), ""
        if a is not None and b is not None:  # files before and now: which ones
            counts = (f" ({len(b.keys() - a.keys())} file(s) added, {len(a.keys() - b.keys())} removed, "
                      f"{sum(a[f] != b[f] for f in a.keys() & b.keys())} changed)")
        print(f"note: the data changed since {data_dir} was prepared{counts}: --name=NEW prepares it beside, "
              "--force replaces this one (a model trained on it would lose its data)")
        return True
    # other arguments: a preparation a model may have been trained on is replaced only when asked
    changed = [f"{k}={before.get(k)!r}" for k in recipe if k != "data" and before.get(k) != recipe[k]]
    raise SystemExit(f"error: {data_dir} holds a preparation with other arguments ({', '.join(changed)}): "
                     "pass another --name to keep both, or --force to replace it")


def lock_folder(data_dir: str) -> int | None:
    """An exclusive lock on data_dir (tokenizer.lock_data_dir), or a one-line error if another
    prepare.py writes it or a run reads it."""
    try:
        return lock_data_dir(data_dir, exclusive=True)
    except BlockingIOError:
        raise SystemExit(f"error: {data_dir} is in use (another prepare.py writes it, or train.py or dpo.py "
                         "reads it): wait for it to end, or pass another --name") from None


def publish(staging: str, data_dir: str) -> None:
    """Moves the complete new files from staging over data_dir's, meta.json last: its absence marks
    the folder incomplete for the instant the renames take, and Ctrl-C waits for them."""
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if os.path.exists(os.path.join(data_dir, "meta.json")):
            os.remove(os.path.join(data_dir, "meta.json"))
        for f in (TOKENIZER_FILE, "train.bin", "val.bin", "meta.json"):
            os.replace(os.path.join(staging, f), os.path.join(data_dir, f))
    finally:
        signal.signal(signal.SIGINT, handler)


def build(c: dict, spec: str, recipe: dict, tok: Tokenizer | None, staging: str) -> dict:
    """Loads the documents, splits them, trains the tokenizer and writes every file into staging.
    Returns meta.json's content."""
    t0 = time.time()
    docs, source = load_documents(spec, c["text_column"], (recipe["data"] or {}).get("revision"))
    if len(docs) < 2:
        raise SystemExit(f"error: {source} holds {len(docs)} non-empty document(s); "
                         "whole documents are held out for validation, so at least 2 are needed")
    # whole books to validation, drawn by a seeded permutation (the same split on every machine): the
    # val loss then measures books the model never read, from across the corpus. The tail of the
    # token stream would hold a few books only, and one of them cut in two, half of it trained on
    n_val = max(1, round(len(docs) * c["val_fraction"]))
    if n_val >= len(docs):  # training needs a document too
        most = math.floor(100 * (len(docs) - 1) / len(docs)) / 100
        raise SystemExit(f"error: --val_fraction={c['val_fraction']} of {len(docs)} documents holds out "
                         f"{n_val} for validation and leaves none for training: pass --val_fraction={most} "
                         "or less, or more documents")
    val_ids = set(np.random.default_rng(c["seed"]).permutation(len(docs))[:n_val].tolist())
    splits = {"train": [d for i, d in enumerate(docs) if i not in val_ids],
              "val": [d for i, d in enumerate(docs) if i in val_ids]}
    print(f"loaded {len(docs)} documents from {source} in {time.time() - t0:.1f}s: "
          f"{len(splits['train'])} for training, {n_val} held out for validation", flush=True)

    t1 = time.time()
    if c["tokenizer"] == "bpe":
        print(f"training a byte-level BPE of {c['vocab_size']} tokens on the training split...", flush=True)
        tok = train_bpe(splits["train"], c["vocab_size"])
    elif c["tokenizer"] == "char":
        tok = train_char(splits["train"])
        if tok.vocab_size > 65536:
            raise SystemExit(f"error: {tok.vocab_size} distinct characters do not fit uint16 token ids")
    print(f"tokenizer {tok.kind}: {tok.vocab_size} tokens ({time.time() - t1:.1f}s)", flush=True)

    hub = HUB_DATASET if c["dataset"] == "" else spec if source.startswith("the Hub dataset") else None
    meta = {"recipe": recipe, "source": source, "hub_dataset": hub,  # the Hub's name for it, for model cards
            "tokenizer": tok.save(staging), "vocab_size": tok.vocab_size}
    batch = 8  # documents per encode_batch call: large enough for the threads, small enough for the bar
    for split, texts in splits.items():
        ids = []
        with tqdm(total=len(texts), desc=f"encoding {split}", unit="doc") as bar:
            for i in range(0, len(texts), batch):
                ids += tok.encode_batch(texts[i : i + batch], num_threads=c["num_threads"])
                bar.update(len(ids) - bar.n)
        n_tokens = write_bin(os.path.join(staging, f"{split}.bin"), ids, tok.eot_id)
        n_bytes = sum(len(tok.normalize(t).encode("utf-8")) for t in texts)
        meta[split] = {"documents": len(texts), "tokens": n_tokens, "bytes": n_bytes,
                       "bytes_per_token": n_bytes / n_tokens}
    with open(os.path.join(staging, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    return meta


def main(config: dict) -> str:
    c = config
    if c["tokenizer"] not in ("bpe", "gpt2", "char"):
        raise SystemExit(f"error: --tokenizer={c['tokenizer']} is not one of bpe, gpt2, char")
    # 256 bytes + <|endoftext|>; uint16 ids
    if c["tokenizer"] == "bpe" and not 257 <= c["vocab_size"] <= 65536:
        raise SystemExit(f"error: --vocab_size={c['vocab_size']} must be between 257 (the 256 bytes and "
                         "<|endoftext|>) and 65536 (token ids of the uint16 .bin files)")
    if not 0.0 < c["val_fraction"] < 1.0:
        raise SystemExit(f"error: --val_fraction={c['val_fraction']} must be between 0 and 1 (exclusive)")
    if c["num_threads"] < 1:
        raise SystemExit(f"error: --num_threads={c['num_threads']} must be at least 1")
    if c["seed"] < 0:
        raise SystemExit(f"error: --seed={c['seed']} must be zero or positive")
    name = c["name"] or "gutenberg_" + (f"bpe{c['vocab_size']}" if c["tokenizer"] == "bpe"
                                        else c["tokenizer"])
    data_dir = os.path.join("data", name)
    tok = gpt2(c["gpt2_ranks"]) if c["tokenizer"] == "gpt2" else None  # a missing file fails at once

    # what defines this preparation: if meta.json records the same, the files can be reused
    spec = resolve_dataset(c["dataset"])
    recipe = {k: c[k] for k in ("dataset", "text_column", "tokenizer", "val_fraction", "seed")}
    if c["tokenizer"] == "bpe":
        recipe["vocab_size"] = c["vocab_size"]
    recipe["data"] = fingerprint(spec)
    if not c["force"] and reusable(data_dir, recipe):
        print(f"reusing {data_dir} (--force rebuilds it)")
        return data_dir

    # everything is written into a staging folder, then moved over the old files: an error or
    # Ctrl-C at any point leaves data_dir as it was, never a mix of old and new files
    t0 = time.time()
    staging = os.path.join(data_dir, ".incomplete")
    created = not os.path.isdir(data_dir)
    try:
        os.makedirs(data_dir, exist_ok=True)
        lock = lock_folder(data_dir)  # until the files are published: two runs would share the staging
        shutil.rmtree(staging, ignore_errors=True)  # what a killed run left
        os.makedirs(staging)
    except OSError as e:  # data/<name> is a file, or a folder we may not write in
        raise SystemExit(f"error: cannot write in {data_dir}: {e.strerror}: pass another --name") from None
    try:
        meta = build(c, spec, recipe, tok, staging)
        publish(staging, data_dir)
    except KeyboardInterrupt:
        kept = f"{data_dir} was not created" if created else f"{data_dir} is as it was before this run"
        print(f"interrupted: {kept}, nothing half-written is left", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(data_dir):
            os.rmdir(data_dir)
        if lock is not None:
            os.close(lock)
    print(f"wrote {data_dir}: train {meta['train']['tokens']:,} tokens, "
          f"val {meta['val']['tokens']:,} tokens, {meta['train']['bytes_per_token']:.2f} bytes/token, "
          f"in {time.time() - t0:.1f}s")
    return data_dir


if __name__ == "__main__":
    try:
        main(configure(globals()))
    except KeyboardInterrupt:  # before any file was written: main handles Ctrl-C while it writes
        print("interrupted: nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
