import math
import os

import numpy as np
import pytest
import torch
from conftest import run

import plumbing
from eval import score
from model import next_token_loss
from plumbing import load_model


def test_sample_streams_one_and_batches_several(trained):
    p = run("sample.py", "--out_dir=out-tiny", "--start=Il était une fois", "--max_new_tokens=20", cwd=trained)
    assert p.stdout.startswith("Il était une fois") and len(p.stdout) > len("Il était une fois") + 5
    p = run("sample.py", "--out_dir=out-tiny", "--num_samples=3", "--max_new_tokens=10", cwd=trained)
    assert p.stdout.count("--- sample") == 3


def test_greedy_is_deterministic_and_seed_matters(trained):
    a, b = (run("sample.py", "--out_dir=out-tiny", "--greedy", "--max_new_tokens=15", f"--seed={s}", cwd=trained)
            for s in (1, 2))
    assert a.stdout == b.stdout
    c, d = (run("sample.py", "--out_dir=out-tiny", "--temperature=1.5", "--max_new_tokens=30", f"--seed={s}",
                "--top_k=0", cwd=trained) for s in (1, 2))
    assert c.stdout != d.stdout


def test_prompt_from_file_long_prompt_and_empty_prompt(trained, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("La nuit tombait sur la ville. " * 20, encoding="utf-8")
    p = run("sample.py", "--out_dir=out-tiny", f"--start=FILE:{f}", "--max_new_tokens=5", cwd=trained)
    assert "the model sees its last 32" in p.stderr and p.stdout.startswith("La nuit tombait")
    p = run("sample.py", "--out_dir=out-tiny", "--start=", "--max_new_tokens=5", cwd=trained)
    assert p.returncode == 0


def test_no_checkpoint_names_the_training_command(tmp_path):
    p = run("sample.py", "--out_dir=out-missing", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "python train.py config/gutenberg.py" in p.stderr and "Traceback" not in p.stderr


def test_attention_map_png(trained, tmp_path):
    path = tmp_path / "attn.png"
    p = run("sample.py", "--out_dir=out-tiny", f"--attention_map={path}",
            "--start=Le petit chat noir dort sur le canapé.", cwd=trained)
    assert "2 layers x 2 heads" in p.stdout
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_eval_on_a_text_file_matches_a_direct_computation(trained, tmp_path):
    text = "Le soleil se levait, « Allons ! » dit-il."
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    p = run("eval.py", "--out_dir=out-tiny", f"--text={f}", "--dtype=float32", cwd=trained)  # as computed below
    assert "bits per byte" in p.stdout
    model, tok, _ = load_model(os.path.join(trained, "out-tiny"))
    ids = [tok.eot_id, *tok.encode(text)]
    assert len(ids) <= 33  # one window: the direct computation is a plain forward pass
    x = torch.tensor([ids[:-1]])
    loss = next_token_loss(model(x), torch.tensor([ids[1:]]))
    bpb = loss.item() * (len(ids) - 1) / math.log(2) / len(text.encode())
    assert f"{bpb:.4f} bits per byte" in p.stdout


def test_eval_long_text_scores_every_token_once(trained):
    model, _, _ = load_model(os.path.join(trained, "out-tiny"))
    rt = plumbing.setup_runtime("cpu", "float32")
    tokens = np.fromfile(os.path.join(trained, "data", "tiny", "val.bin"), dtype=np.uint16)[:500]
    total, count = score(model, tokens, 4, rt)
    assert count == len(tokens) - 1 and total > 0
    p = run("eval.py", "--out_dir=out-tiny", cwd=trained)  # default: the held-out books
    assert "held-out documents" in p.stdout


def test_eval_bad_text_is_a_clear_error(trained, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("élève".encode("latin-1"))
    p = run("eval.py", "--out_dir=out-tiny", f"--text={f}", cwd=trained, check=False)
    assert p.returncode == 1 and "not UTF-8" in p.stderr and "Traceback" not in p.stderr


def test_text_stats_by_hand():
    from eval import text_stats

    s = text_stats(["a b c d a b c d", "« Oui » dit-il"])
    # first text: 4-grams abcd bcda cdab dabc abcd -> 1 repeat of 5; second: 1 four-gram, no repeat
    assert s["rep_4"] == pytest.approx((1 / 5 + 0) / 2)
    # pairs: ab bc cd da ab bc cd (4 distinct of 7) + «Oui Oui» »dit-il (3 distinct) -> 7 of 10
    assert s["distinct_2"] == pytest.approx(7 / 10) and s["dialogue"] == 0.5


def test_eval_measures_samples_the_same_way_every_time(trained):
    args = ["--out_dir=out-tiny", "--num_samples=4", "--max_new_tokens=12", "--prompt_tokens=6", "--device=cpu"]
    a, b = (run("eval.py", *args, cwd=trained).stdout for _ in range(2))
    assert "4 samples of 12 tokens" in a and "distinct-2" in a and a == b


def test_eval_prompts_longer_than_the_context_are_refused(trained):
    p = run("eval.py", "--out_dir=out-tiny", "--num_samples=1", "--prompt_tokens=10000", "--device=cpu", cwd=trained,
            check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "--prompt_tokens=10000 leaves no room in the model's block_size=32: pass fewer" in p.stderr, p.stderr
