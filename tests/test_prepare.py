import json
import os
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run

import prepare
import tokenizer as tok
from configurator import configure


def config(**overrides) -> dict:
    return configure(vars(prepare), [f"--{k}={v}" for k, v in overrides.items()])


def test_bins_decode_back_to_the_documents(workdir, books):
    d = os.path.join(workdir, "data", "tiny")
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    t = tok.load(d, meta)
    docs = []
    for split in ("train", "val"):
        ids = np.fromfile(os.path.join(d, f"{split}.bin"), dtype=np.uint16)
        assert len(ids) == meta[split]["tokens"]
        assert ids[-1] == t.eot_id  # every document ends with <|endoftext|>
        parts = t.decode(ids.tolist()).split(tok.EOT)
        assert parts[-1] == ""
        split_docs = parts[:-1]
        assert len(split_docs) == meta[split]["documents"] == int((ids == t.eot_id).sum())
        assert meta[split]["bytes"] == sum(len(x.encode()) for x in split_docs)
        docs += split_docs
    # whole documents on one side or the other: none cut, none lost
    assert sorted(docs) == sorted(unicodedata.normalize("NFC", b) for b in books)
    assert meta["val"]["documents"] == 1 and meta["train"]["documents"] == 5
    assert meta["vocab_size"] == 512 and meta["tokenizer"]["kind"] == "bpe"


def test_same_arguments_reuse_force_rebuilds(workdir, txt_dir):
    d = os.path.join(workdir, "data", "tiny")
    before = os.path.getmtime(os.path.join(d, "train.bin"))
    p = run("prepare.py", f"--dataset={txt_dir}", "--vocab_size=512", "--name=tiny", "--val_fraction=0.2", cwd=workdir)
    assert "reusing" in p.stdout and os.path.getmtime(os.path.join(d, "train.bin")) == before


def test_split_is_deterministic_and_by_document(tmp_path, txt_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prepare.main(config(dataset=txt_dir, tokenizer="char", name="a", val_fraction=0.34))
    prepare.main(config(dataset=txt_dir, tokenizer="char", name="b", val_fraction=0.34))
    a, b = (np.fromfile(tmp_path / "data" / n / "val.bin", dtype=np.uint16) for n in "ab")
    assert np.array_equal(a, b) and len(a) > 0
    with open(tmp_path / "data" / "a" / "meta.json") as f:
        assert json.load(f)["val"]["documents"] == 2


def test_parquet_and_jsonl_with_text_column(tmp_path, books, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"id": [str(i) for i in range(4)], "content": books[:4]}), tmp_path / "b.parquet")
    prepare.main(config(dataset=str(tmp_path / "b.parquet"), tokenizer="char", name="pq"))
    with open(tmp_path / "b.jsonl", "w") as f:
        for b in books[:4]:
            f.write(json.dumps({"body": b, "n": 1}, ensure_ascii=False) + "\n")
    prepare.main(config(dataset=str(tmp_path / "b.jsonl"), tokenizer="char", name="js", text_column="body"))
    for n in ("pq", "js"):
        with open(tmp_path / "data" / n / "meta.json") as f:
            assert json.load(f)["train"]["documents"] + 1 == 4
    with pytest.raises(SystemExit, match=r"no column 'content'.*body.*--text_column"):
        prepare.main(config(dataset=str(tmp_path / "b.jsonl"), tokenizer="char", name="js2"))


def test_uint16_guard_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="uint16"):
        prepare.main(config(dataset="/nonexistent", vocab_size=70000))
    assert not os.path.exists(tmp_path / "data")


def test_offline_falls_back_to_the_local_mirror(tmp_path, books, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mirror = tmp_path / "mirror" / "data"
    mirror.mkdir(parents=True)
    pq.write_table(pa.table({"content": books[:3]}), mirror / "train-00000-of-00001.parquet")
    monkeypatch.setattr(prepare, "hub_reachable", lambda: False)
    monkeypatch.setattr(prepare, "LOCAL_MIRROR", str(tmp_path / "mirror"))
    prepare.main(config(tokenizer="char"))
    out = capsys.readouterr().out
    assert "the Hub is unreachable: using the local mirror" in out
    assert os.path.exists(tmp_path / "data" / "gutenberg_char" / "train.bin")
    monkeypatch.setattr(prepare, "LOCAL_MIRROR", str(tmp_path / "nothing"))
    with pytest.raises(SystemExit, match="--dataset"):
        prepare.main(config(tokenizer="char", force=True))


def test_hub_probe_respects_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prepare.hub_reachable() is False


def test_bad_dataset_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"names no \.parquet"):
        prepare.main(config(dataset=str(tmp_path / "empty*.txt")))
    for path in (str(tmp_path / "no" / "such"), "./books/nope", "books/2024/nope"):  # a mistyped folder, not a Hub name
        assert not prepare.is_hub_name(path)
        with pytest.raises(SystemExit, match=r"names no \.parquet"):
            prepare.main(config(dataset=path))
    assert prepare.is_hub_name("rayml/french_gutenberg")
    with pytest.raises(SystemExit, match="bpe, gpt2, char"):
        prepare.main(config(tokenizer="wordpiece"))
    (tmp_path / "one.txt").write_text("un seul livre")
    with pytest.raises(SystemExit, match="at least 2"):
        prepare.main(config(dataset=str(tmp_path / "one.txt"), tokenizer="char"))


def test_bad_bytes_and_empty_documents_are_counted(tmp_path, books, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_bytes(books[0].encode() + b" \xff\xfe latin-1: \xe9t\xe9")
    (tmp_path / "b.txt").write_text(books[1], encoding="utf-8")
    (tmp_path / "c.txt").write_text(books[2], encoding="utf-8")
    (tmp_path / "d.txt").write_text("   \n", encoding="utf-8")
    prepare.main(config(dataset=str(tmp_path / "*.txt"), tokenizer="char", name="u"))
    out = capsys.readouterr().out
    assert "skipped 1 empty" in out and "1 documents hold bytes that are not UTF-8" in out
    with open(tmp_path / "data" / "u" / "meta.json") as f:
        meta = json.load(f)
    assert meta["train"]["documents"] + meta["val"]["documents"] == 3


def test_malformed_jsonl_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"content": "un"}\n{"content": "deux"\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"cannot read --dataset=.*x\.jsonl as json files"):
        prepare.main(config(dataset=str(tmp_path / "x.jsonl"), tokenizer="char"))


def documents(name: str) -> int:
    with open(os.path.join("data", name, "meta.json")) as f:
        meta = json.load(f)
    return meta["train"]["documents"] + meta["val"]["documents"]


@pytest.mark.parametrize("spec", ["books/*.txt", "books"])
def test_reuse_sees_a_book_added_or_edited(tmp_path, books, monkeypatch, capsys, spec):
    """Changed files are seen, and named in a note, but the data is reused: a model may have been
    trained on it (a new preparation retrains the BPE); --force rebuilds it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "books").mkdir()
    for i in range(3):
        (tmp_path / "books" / f"b{i}.txt").write_text(books[i][:5000], encoding="utf-8")
    prepare.main(config(dataset=spec, tokenizer="char", name="mine"))
    assert documents("mine") == 3
    (tmp_path / "books" / "b3.txt").write_text(books[3][:5000], encoding="utf-8")
    files = {f: (tmp_path / "data" / "mine" / f).read_bytes() for f in os.listdir(tmp_path / "data" / "mine")}
    prepare.main(config(dataset=spec, tokenizer="char", name="mine"))
    assert ("note: the data changed since data/mine was prepared (1 file(s) added, 0 removed, 0 changed): "
            "--name=NEW prepares it beside, --force replaces this one") in capsys.readouterr().out
    assert {f: (tmp_path / "data" / "mine" / f).read_bytes() for f in files} == files
    prepare.main(config(dataset=spec, tokenizer="char", name="mine", force=True))
    assert documents("mine") == 4
    # edited in place, same size and same modification time: only the content tells
    book = tmp_path / "books" / "b0.txt"
    stat, before = os.stat(book), [np.fromfile(tmp_path / "data" / "mine" / f"{s}.bin", dtype=np.uint16)
                                   for s in ("train", "val")]
    book.write_text(books[0][:5000][::-1], encoding="utf-8")
    os.utime(book, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    prepare.main(config(dataset=spec, tokenizer="char", name="mine"))
    assert "(0 file(s) added, 0 removed, 1 changed)" in capsys.readouterr().out
    prepare.main(config(dataset=spec, tokenizer="char", name="mine", force=True))
    after = [np.fromfile(tmp_path / "data" / "mine" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")]
    assert not all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    prepare.main(config(dataset=spec, tokenizer="char", name="mine"))
    assert "reusing data/mine (--force rebuilds it)" in capsys.readouterr().out


def test_reuse_sees_a_new_local_mirror(tmp_path, books, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mirror").mkdir()
    monkeypatch.setattr(prepare, "hub_reachable", lambda: False)
    monkeypatch.setattr(prepare, "LOCAL_MIRROR", str(tmp_path / "mirror"))
    pq.write_table(pa.table({"content": books[:3]}), tmp_path / "mirror" / "train.parquet")
    prepare.main(config(tokenizer="char"))
    pq.write_table(pa.table({"content": books[:5]}), tmp_path / "mirror" / "train.parquet")
    prepare.main(config(tokenizer="char"))
    assert "1 changed): --name=NEW prepares it beside" in capsys.readouterr().out and documents("gutenberg_char") == 3
    prepare.main(config(tokenizer="char", force=True))
    assert documents("gutenberg_char") == 5


def test_hub_dataset_reuse_follows_its_revision(tmp_path, books, monkeypatch, capsys):
    """A Hub name: its current revision is asked of the Hub, and that revision is what gets loaded."""
    import datasets
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    revisions = {"abc": books[:3], "def": books[:4], None: books[:4]}  # None: the latest one in the cache
    latest, loaded = ["abc"], []

    def load_dataset(name, split, revision=None):
        loaded.append(revision)
        return datasets.Dataset.from_dict({"content": revisions[revision]})

    monkeypatch.setattr(prepare, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name, timeout: type("I", (), {"sha": latest[0]}))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for rev in ("abc", "abc"):
        latest[0] = rev
        prepare.main(config(dataset="someone/books", tokenizer="char", name="hub"))
    latest[0] = "def"  # a new revision: named, the data reused, then rebuilt when asked
    prepare.main(config(dataset="someone/books", tokenizer="char", name="hub"))
    assert "note: the data changed since data/hub was prepared" in capsys.readouterr().out and loaded == ["abc"]
    prepare.main(config(dataset="someone/books", tokenizer="char", name="hub", force=True))
    assert loaded == ["abc", "def"] and documents("hub") == 4  # the second run reused the first
    monkeypatch.setattr(prepare, "hub_reachable", lambda: False)  # offline: cannot tell, so reused
    prepare.main(config(dataset="someone/books", tokenizer="char", name="hub"))
    assert "cannot tell whether someone/books changed" in capsys.readouterr().out and loaded == ["abc", "def"]


@pytest.mark.parametrize("damage", ["truncated", "no val tokens", "a list", "no tokenizer file"])
def test_a_damaged_preparation_is_rebuilt_not_reused(tmp_path, txt_dir, monkeypatch, capsys, damage):
    monkeypatch.chdir(tmp_path)
    prepare.main(config(dataset=txt_dir, tokenizer="char", name="d"))
    meta_path = tmp_path / "data" / "d" / "meta.json"
    good = meta_path.read_text()
    if damage == "truncated":
        meta_path.write_text(good[: len(good) // 2])
    elif damage == "no val tokens":
        meta = json.loads(good)
        del meta["val"]["tokens"]
        meta_path.write_text(json.dumps(meta))
    elif damage == "a list":
        meta_path.write_text("[1, 2]")
    else:
        os.remove(tmp_path / "data" / "d" / tok.TOKENIZER_FILE)
    capsys.readouterr()
    prepare.main(config(dataset=txt_dir, tokenizer="char", name="d"))
    out = capsys.readouterr().out
    assert "rebuilding" in out and "reusing" not in out
    assert tok.load_meta(str(tmp_path / "data" / "d")) == json.loads(good)


@pytest.mark.parametrize("arg", ["--num_threads=0", "--num_threads=-2", "--seed=-1", "--vocab_size=100",
                                 "--val_fraction=1.0"])
def test_bad_numbers_fail_before_any_work(tmp_path, txt_dir, arg):
    p = run("prepare.py", f"--dataset={txt_dir}", "--vocab_size=300", "--name=n", arg, cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and p.stderr.startswith(f"error: {arg}") and p.stderr.count("\n") == 1, p.stderr
    assert "loaded" not in p.stdout and not os.path.exists(tmp_path / "data")


def test_a_val_fraction_that_leaves_no_training_document_is_one_line(tmp_path, txt_dir):
    four = tmp_path / "four"
    four.mkdir()
    for name in sorted(os.listdir(txt_dir))[:4]:
        (four / name).write_bytes(open(os.path.join(txt_dir, name), "rb").read())
    p = run("prepare.py", f"--dataset={four}", "--tokenizer=char", "--name=v", "--val_fraction=0.9",
            cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[-1] == ("error: --val_fraction=0.9 of 4 documents holds out 4 for validation and "
                                         "leaves none for training: pass --val_fraction=0.75 or less, or more "
                                         "documents")
    assert not os.path.exists(tmp_path / "data" / "v")
    run("prepare.py", f"--dataset={four}", "--tokenizer=char", "--name=v", "--val_fraction=0.75", cwd=str(tmp_path))
    assert tok.load_meta(str(tmp_path / "data" / "v"))["train"]["documents"] == 1


def test_other_arguments_never_replace_a_preparation_silently(txt_dir, tmp_path):
    run("prepare.py", f"--dataset={txt_dir}", "--tokenizer=char", "--name=mine", cwd=str(tmp_path))
    before = (tmp_path / "data" / "mine" / "train.bin").read_bytes()
    p = run("prepare.py", f"--dataset={txt_dir}", "--tokenizer=char", "--name=mine", "--val_fraction=0.5",
            cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "val_fraction=0.05" in p.stderr and "--force" in p.stderr
    assert (tmp_path / "data" / "mine" / "train.bin").read_bytes() == before
    run("prepare.py", f"--dataset={txt_dir}", "--tokenizer=char", "--name=mine", "--val_fraction=0.5", "--force",
        cwd=str(tmp_path))
    assert (tmp_path / "data" / "mine" / "train.bin").read_bytes() != before
