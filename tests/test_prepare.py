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
