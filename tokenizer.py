"""
The tokenizer: text <-> integer ids, one module for every script.

Three kinds, all byte-level BPE run by tiktoken (fast, Rust, multi-threaded):
- "bpe":  a French BPE trained on the corpus with rustbpe (default 8,192 tokens). It packs about
          4 bytes of French per token, against 2.7 for GPT-2: a smaller output layer and more text
          per context window.
- "gpt2": the course's tokenizer (50,257 tokens), loaded offline from a ranks file.
- "char": one token per character of the corpus (the Llama-MoE notebook's tokenizer). It is a
          BPE too: the 256 bytes, plus one merged token for each multi-byte character seen in
          training (é, œ, —, ...). A character never seen falls back to its UTF-8 bytes, so any
          text still encodes and decodes back exactly (the policy of Llama's byte_fallback).

Whatever the kind, a tokenizer is a list of ranks (bytes -> id), a split pattern and the special
token <|endoftext|>, which separates documents. It is saved as a plain text file
(`base64(token) rank` per line, tiktoken's own format) plus a few fields in meta.json, and it
travels inside every checkpoint, so that a checkpoint is enough to sample from.
"""

import base64
import json
import math
import os
import unicodedata
from collections.abc import Iterable

import regex
import tiktoken
import tiktoken.load

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.tiktoken"
DEFAULT_GPT2_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tokenizers",
                                  "gpt2.tiktoken")

# GPT-4's split pattern, taught French: elisions (l', d', qu', jusqu'...) become their own piece,
# so " l'homme" splits as " l'" + "homme" and the BPE learns one token for " l'" instead of
# gluing the apostrophe to the next word. \p{L} already covers accented letters (é, à, œ).
FRENCH_PATTERN = (
    r"""[ ]?(?i:[cdjlmnst]|qu|jusqu|lorsqu|puisqu|quoiqu)['’]"""
    r"""|[^\r\n\p{L}\p{N}]?+\p{L}+"""
    r"""|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHAR_PATTERN = r"""(?s:.)"""  # every character is its own piece: at most one token per character


class Tokenizer:
    """A tiktoken Encoding plus what it takes to save and rebuild it (its state)."""

    def __init__(self, kind: str, ranks: dict[bytes, int], pattern: str, nfc: bool):
        self.kind, self.ranks, self.pattern, self.nfc = kind, ranks, pattern, nfc
        self.eot_id = len(ranks)  # the special token comes right after the ranks
        self.vocab_size = len(ranks) + 1
        self.enc = tiktoken.Encoding(kind, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens={EOT: self.eot_id})

    def normalize(self, text: str) -> str:
        # NFC: "é" typed as e + combining accent becomes the single character the model knows
        return unicodedata.normalize("NFC", text) if self.nfc else text

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; a literal "<|endoftext|>" in the text is just text, never the special token."""
        return self.enc.encode_ordinary(self.normalize(text))

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch([self.normalize(t) for t in texts], num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))  # bytes that are not (yet) valid UTF-8 become U+FFFD

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    # --- saving and loading: a plain text file, never a pickle ---------------------------------
    def state(self) -> dict:
        """Everything needed to rebuild the tokenizer, as plain strings (goes into checkpoints)."""
        ranks = "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in self.ranks.items())
        return {"kind": self.kind, "pattern": self.pattern, "nfc": self.nfc, "ranks": ranks}

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        return cls(state["kind"], parse_ranks(state["ranks"]), state["pattern"], state["nfc"])

    def save(self, data_dir: str) -> dict:
        """Writes data_dir/tokenizer.tiktoken (loadable with tiktoken.load.load_tiktoken_bpe);
        returns the fields that go into meta.json."""
        path = os.path.join(data_dir, TOKENIZER_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(self.state()["ranks"])
        os.replace(path + ".tmp", path)
        return {"kind": self.kind, "file": TOKENIZER_FILE, "pattern": self.pattern, "nfc": self.nfc,
                "vocab_size": self.vocab_size, "eot_id": self.eot_id}


def read_meta(path: str) -> dict:
    """A meta.json, parsed and checked; ValueError (one line, naming the field) when it is unreadable,
    lacks a field the scripts read, or holds a value prepare.py never writes (a hand edit)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON (a truncated file), not UTF-8
        raise ValueError(f"is unreadable ({e})") from None
    count = (int, lambda v: v > 0, "a positive integer")
    fields = {"vocab_size": (int, lambda v: 1 < v <= 65536, "an integer from 2 to 65536 (uint16 ids)"),
              "tokenizer.kind": (str, lambda v: v in ("bpe", "gpt2", "char"), "bpe, gpt2 or char"),
              "tokenizer.file": (str, lambda v: v and os.path.basename(v) == v, "a file name in its folder"),
              "tokenizer.pattern": (str, splits_text, "a regular expression that splits any text"),
              "tokenizer.nfc": (bool, bool, "true or false"), "tokenizer.vocab_size": count,
              **{f"{split}.{k}": count for split in ("train", "val")
                 for k in ("documents", "tokens", "bytes")},
              **{f"{split}.bytes_per_token": (float, lambda v: 0 < v < math.inf, "a positive number")
                 for split in ("train", "val")}}
    for field, (kind, ok, what) in fields.items():
        value = meta
        for k in field.split("."):
            value = value.get(k) if isinstance(value, dict) else None
        if value is None:
            raise ValueError(f"is incomplete ({field}: missing)")
        # a float field takes an integer too (4 bytes per token); True is an int to Python, not here
        typed = isinstance(value, (int, float) if kind is float else kind)
        if not (typed and (kind is bool) == isinstance(value, bool) and ok(value)):
            raise ValueError(f"has a bad {field} ({json.dumps(value)[:60]}: must be {what})")
    if meta["vocab_size"] != meta["tokenizer"]["vocab_size"]:
        raise ValueError(f"has a bad vocab_size ({meta['vocab_size']}: tokenizer.vocab_size says "
                         f"{meta['tokenizer']['vocab_size']})")
    return meta


# a text with a piece of each kind the patterns split: letters, elisions, digits, punctuation, spaces
PATTERN_SAMPLE = "Il était une fois, l'homme de 1842 — « Où ? »\n\n  Fin.\t\r\n"


def splits_text(pattern: str) -> bool:
    """Whether tiktoken compiles pattern and its pieces cover a text, none empty (tiktoken drops the
    text no piece matches, and panics on an empty piece)."""
    try:
        tiktoken.Encoding("check", pat_str=pattern, mergeable_ranks={bytes([b]): b for b in range(256)},
                          special_tokens={})
        pieces = regex.findall(pattern, PATTERN_SAMPLE)
    except (ValueError, regex.error):
        return False
    return all(pieces) and "".join(pieces) == PATTERN_SAMPLE


def load_meta(data_dir: str) -> dict:
    """data_dir/meta.json, checked: a missing, truncated or incomplete file is a one-line error."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise SystemExit(no_data(data_dir))
    try:
        return read_meta(path)
    except ValueError as e:
        raise SystemExit(f"error: {path} {e}: {_rerun(data_dir)}") from None


def no_data(data_dir: str) -> str:
    """The error for a data_dir without meta.json. A relative one is looked for from the working
    directory, as prepare.py writes data/ there: a script started from another folder says where it
    looked, and where the data is if it lies beside the scripts."""
    if os.path.isabs(data_dir):
        return f"error: no prepared data in {data_dir}: run {prepare_command(data_dir)} first (or pass --data_dir=DIR)"
    looked = (f"error: no prepared data in {data_dir} (looked in {os.path.abspath(data_dir)}: data_dir is "
              f"relative to the working directory {os.getcwd()})")
    project = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(project, data_dir, "meta.json")):
        return f"{looked}: run from {project}, or pass --data_dir={os.path.join(project, data_dir)}"
    return (f"{looked}: run {prepare_command(data_dir)} first, from the folder you train in (it writes data/ "
            "there), or pass --data_dir=DIR")


def lock_data_dir(data_dir: str, exclusive: bool) -> int | None:
    """A lock on a data folder, the folder itself (no lock file to leave behind): exclusive for prepare.py,
    which replaces its files, shared for the runs that read them. Returns the descriptor to keep open
    (the kernel drops the lock when the process ends, even by kill -9), or None where there is no lock
    to take (not POSIX, no such folder, a file system without locks: some network mounts). Raises
    BlockingIOError while another process holds it the other way (or exclusively)."""
    try:
        import fcntl

        fd = os.open(data_dir, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise
        return None
    return fd


def prepare_command(data_dir: str) -> str:
    """The prepare.py command that writes data_dir, where it is a folder of the novels that prepare.py
    names itself (data/gutenberg_<tokenizer>); else the command's shape."""
    parent, name = os.path.split(os.path.normpath(data_dir))
    kind = name.removeprefix("gutenberg_")
    if parent == "data" and kind in ("gpt2", "char"):
        return f"python prepare.py --tokenizer={kind}"
    if parent == "data" and kind.startswith("bpe") and kind[3:].isdigit():
        return f"python prepare.py --vocab_size={kind[3:]}"
    return f"python prepare.py --dataset=YOUR_TEXT --name={name}"


def _rerun(data_dir: str) -> str:
    return f"rerun python prepare.py --force with the arguments that prepared {data_dir}"


def parse_ranks(text: str) -> dict[bytes, int]:
    """`base64(token) rank` lines to {token: rank}. ValueError unless they are distinct tokens of ranks
    0, 1, ..., n-1 (tiktoken would otherwise panic, or give two tokens one id)."""
    ranks, lines = {}, text.splitlines()
    for i, line in enumerate(lines, 1):
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"line {i} is not `base64(token) rank`") from None
    if len(ranks) != len(lines) or sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("its ranks are not 0 to n-1 for n distinct tokens")
    return ranks


def load(data_dir: str, meta: dict) -> Tokenizer:
    """The tokenizer that prepare.py saved in data_dir (meta is data_dir/meta.json, from load_meta).
    Read directly, not with tiktoken.load.load_tiktoken_bpe: that one caches every file it reads by its
    path (in the temp folder), so a tokenizer rebuilt at the same path would come back as the old one."""
    t = meta["tokenizer"]
    path = os.path.join(data_dir, t["file"])
    try:
        with open(path, encoding="ascii") as f:  # base64 and digits only
            ranks = parse_ranks(f.read())
    except FileNotFoundError:
        raise SystemExit(f"error: {path} is missing: {_rerun(data_dir)}") from None
    except (OSError, ValueError) as e:  # ValueError: not ASCII, not `base64 rank` lines
        raise SystemExit(f"error: {path} is unreadable ({e}): {_rerun(data_dir)}") from None
    if len(ranks) + 1 != t["vocab_size"]:
        raise SystemExit(f"error: {path} holds {len(ranks) + 1} tokens where meta.json says "
                         f"{t['vocab_size']}: {_rerun(data_dir)}")
    return Tokenizer(t["kind"], ranks, t["pattern"], t["nfc"])


# --- building each kind ---------------------------------------------------------------------------
def gpt2(ranks_path: str = DEFAULT_GPT2_RANKS) -> Tokenizer:
    """GPT-2's BPE, identical to tiktoken.get_encoding("gpt2") but read from a local file, offline."""
    if not os.path.exists(ranks_path):
        raise SystemExit(f"error: GPT-2 ranks not found at {ranks_path}: "
                         "pass --gpt2_ranks=PATH to a gpt2.tiktoken file")
    return Tokenizer("gpt2", tiktoken.load.load_tiktoken_bpe(ranks_path), GPT2_PATTERN, nfc=False)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained with rustbpe on texts; vocab_size counts <|endoftext|>."""
    import rustbpe

    if vocab_size < 257:
        raise SystemExit(f"error: --vocab_size={vocab_size} is too small for a byte-level BPE: "
                         "use at least 257")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator((unicodedata.normalize("NFC", t) for t in texts), vocab_size - 1,
                            pattern=FRENCH_PATTERN)
    ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
    return Tokenizer("bpe", ranks, bpe.get_pattern(), nfc=True)


def train_char(texts: Iterable[str]) -> Tokenizer:
    """The 256 bytes, then every multi-byte character of the texts by frequency (with the prefixes
    BPE needs to merge its bytes step by step: b"\\xe2\\x80" before "—" = b"\\xe2\\x80\\x94")."""
    from collections import Counter

    counts = Counter()
    for t in texts:
        counts.update(unicodedata.normalize("NFC", t))
    ranks = {bytes([b]): b for b in range(256)}
    for ch, _ in counts.most_common():
        b = ch.encode("utf-8")
        for i in range(2, len(b) + 1):
            ranks.setdefault(b[:i], len(ranks))
    return Tokenizer("char", ranks, CHAR_PATTERN, nfc=True)
