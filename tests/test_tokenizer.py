import os

import pytest

import tokenizer as tok

FRENCH = "« — Qu'il vienne ! » s'écria l'œil de Noël, jusqu'à l’été… Ça coûte 3 € 😀\n\tÀ bientôt\u00a0!"


@pytest.fixture(scope="module")
def tokenizers(books, gpt2_ranks):
    return {"bpe": tok.train_bpe(books, 600), "gpt2": tok.gpt2(), "char": tok.train_char(books)}


def test_gpt2_ids_match_openai(gpt2_ranks):
    assert tok.gpt2().encode("Hello world") == [15496, 995]
    assert tok.gpt2().eot_id == 50256 and tok.gpt2().vocab_size == 50257


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "char"])
def test_round_trip_french(tokenizers, kind):
    t = tokenizers[kind]
    ids = t.encode(FRENCH)
    assert t.decode(ids) == FRENCH
    assert all(0 <= i < t.vocab_size for i in ids) and t.eot_id not in ids
    # a literal "<|endoftext|>" in a text is text, never the document separator
    assert t.eot_id not in t.encode("a <|endoftext|> b") and t.decode(t.encode("a <|endoftext|> b")) == "a <|endoftext|> b"


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "char"])
def test_state_and_file_round_trip(tokenizers, kind, tmp_path):
    t = tokenizers[kind]
    assert tok.Tokenizer.from_state(t.state()).encode(FRENCH) == t.encode(FRENCH)
    fields = t.save(str(tmp_path))
    loaded = tok.load(str(tmp_path), {"tokenizer": fields})
    assert loaded.encode(FRENCH) == t.encode(FRENCH) and loaded.vocab_size == t.vocab_size


def test_char_tokenizer_one_token_per_seen_character_bytes_for_unseen(tokenizers):
    t = tokenizers["char"]
    for ch in "eé—œ«":  # all in the six books
        assert len(t.encode(ch)) == 1, ch
    assert len(t.encode("😀")) == 4  # never seen: its 4 UTF-8 bytes, and still decodes exactly
    assert t.decode(t.encode("😀")) == "😀"
    assert t.vocab_size < 500


def test_nfc_normalisation():
    t = tok.train_char(["café"])
    decomposed = "cafe\u0301"  # e + combining acute accent
    assert t.encode(decomposed) == t.encode("café")


def test_french_pattern_splits_elisions(tokenizers):
    t = tokenizers["bpe"]
    pieces = [t.decode([i]) for i in t.encode(" l'homme d'une fille qu'il aimait")]
    # the apostrophe ends the elided word: no token glues it to the next word
    assert not any("'" in p and not p.endswith("'") for p in pieces), pieces


def test_bpe_compresses_french_better_than_bytes(tokenizers, books):
    t = tokenizers["bpe"]
    text = books[0][:5000]
    assert len(text.encode()) / len(t.encode(text)) > 2.0


def test_missing_gpt2_ranks_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--gpt2_ranks"):
        tok.gpt2(os.path.join(tmp_path, "nope.tiktoken"))
