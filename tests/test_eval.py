import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import run
from torch.nn import functional as F

import eval as eval_script
from configurator import configure
from eval import score
from model import next_token_loss
from plumbing import load_model, setup_runtime

# sentences a model of French novels has read the like of a thousand times, each against its own
# words shuffled: any model that learned something prefers the sentence
SENTENCES = ["Elle ouvrit la porte et entra dans la chambre.", "Le vieux monsieur avait les yeux fermés.",
             "Je ne sais pas ce que vous voulez dire.", "Il faisait froid, et la nuit tombait déjà.",
             "Nous partirons demain matin pour Paris.", "Sa mère lui avait donné une lettre.",
             "Il y avait du monde dans la rue.", "Elle le regarda longtemps sans rien dire."]
# and minimal pairs of grammar (agreement, mood, negation, relatives), as in BLiMP: too hard for a
# tiny model, scored here only to show the format
GRAMMAR = [("Les enfants jouent dans le jardin.", "Les enfants joue dans le jardin."),
           ("Elle est partie hier soir.", "Elle est parti hier soir."),
           ("Il faut que tu viennes.", "Il faut que tu viens."),
           ("Je ne l'ai jamais vu.", "Je l'ai ne jamais vu."),
           ("C'est la maison où je suis né.", "C'est la maison que je suis né.")]


def shuffled(sentence: str, rng: random.Random) -> str:
    words = sentence.split()
    while " ".join(words) == sentence:
        rng.shuffle(words)
    return " ".join(words)


def write_pairs(path, pairs) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for good, bad in pairs:
            f.write(json.dumps({"sentence_good": good, "sentence_bad": bad, "UID": "fr"}, ensure_ascii=False) + "\n")
    return str(path)


def test_minimal_pairs_prefer_the_sentence_to_its_shuffled_words(trained, tmp_path):
    rng = random.Random(0)
    certain = [(s, shuffled(s, rng)) for s in SENTENCES]
    p = run("eval.py", "--out_dir=out-tiny", f"--pairs={write_pairs(tmp_path / 'certain.jsonl', certain)}", cwd=trained)
    correct = int(p.stdout.split(" in ")[1].split(" of ")[0])
    assert f"in {correct} of 8 minimal pairs" in p.stdout and correct >= 6, p.stdout
    grammar = write_pairs(tmp_path / "grammar.jsonl", GRAMMAR)
    res = eval_script.main(configure(vars(eval_script), [f"--out_dir={os.path.join(trained, 'out-tiny')}",
                                                          f"--pairs={grammar}", "--dtype=float32"]))
    # each score, from a padded batch of all ten sentences, is the log-probability computed directly
    model, tok, _ = load_model(os.path.join(trained, "out-tiny"))
    for i, (good, bad) in enumerate(GRAMMAR[:2]):
        for sentence, logp in ((good, res["logp_good"][i]), (bad, res["logp_bad"][i])):
            ids = tok.encode(sentence)
            with torch.no_grad():
                logits = model(torch.tensor([[tok.eot_id, *ids[:-1]]]))
            direct = F.log_softmax(logits[0], dim=-1)[torch.arange(len(ids)), ids].sum().item()
            assert abs(logp - direct) < 1e-4 and direct < 0
    assert res["pairs"] == 5 and res["correct"] == sum(map(float.__gt__, res["logp_good"], res["logp_bad"]))


def test_a_folder_as_text_is_a_one_line_error(trained, tmp_path):
    p = run("eval.py", "--out_dir=out-tiny", f"--text={tmp_path}", cwd=trained, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "is a folder" in p.stderr


def test_bad_pairs_files_and_strides_are_one_line_errors(trained, tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"sentence_good": "Il dort."}\n')
    out = f"--out_dir={os.path.join(trained, 'out-tiny')}"
    for args, why in (([f"--pairs={tmp_path}"], "is a folder"), ([f"--pairs={tmp_path / 'pairs.jsonl'}"], "line 1"),
                      (["--stride=33"], "block_size=32")):
        with pytest.raises(SystemExit, match=f"^error: .*{why}") as e:
            eval_script.main(configure(vars(eval_script), [out, *args]))
        assert "\n" not in str(e.value)


def test_stride_block_size_scores_disjoint_windows_as_lm_eval_does(trained):
    model, _, _ = load_model(os.path.join(trained, "out-tiny"))
    tokens = np.fromfile(os.path.join(trained, "data", "tiny", "val.bin"), dtype=np.uint16)[: 4 * 32 + 1].astype(np.int64)
    total, count = score(model, tokens, 3, setup_runtime("cpu", "float32"), stride=32)
    x, y = torch.from_numpy(tokens[:-1]).view(4, 32), torch.from_numpy(tokens[1:]).view(4, 32)
    with torch.no_grad():
        loss = next_token_loss(model(x), y)  # four windows side by side, none sees another
    assert count == 128 and abs(total - loss.item() * 128) < 1e-3
    assert abs(score(model, tokens, 3, setup_runtime("cpu", "float32"))[0] - total) > 1e-3  # the default overlaps


def test_eval_refuses_a_data_dir_whose_tokenizer_was_rebuilt(trained, txt_dir, tmp_path):
    """prepare.py run again on the checkpoint's data_dir with another tokenizer: its val.bin holds
    ids of that one, which the checkpoint's tokenizer reads as other strings (it scored 3.60 bits per
    byte where 3.13 was right, without a word). train.py refuses the same case on resume."""
    shutil.copytree(os.path.join(trained, "out-tiny"), tmp_path / "out-tiny")
    run("prepare.py", f"--dataset={txt_dir}", "--tokenizer=char", "--name=tiny", "--val_fraction=0.2",
        cwd=str(tmp_path))
    p = run("eval.py", "--out_dir=out-tiny", "--device=cpu", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert ("the tokenizer of data/tiny differs from the one out-tiny/ckpt.pt was trained with (prepare.py "
            "has run there again since)") in p.stderr and "--text=FILE" in p.stderr


def test_more_samples_than_the_text_holds_prompts_is_one_line_before_scoring(trained, tmp_path):
    """eval.py --num_samples=100000000 (a typo, say) drew every prompt and generated them in one batch."""
    f = tmp_path / "t.txt"
    f.write_text("Le soleil se levait sur la ville endormie. " * 20, encoding="utf-8")
    p = run("eval.py", "--out_dir=out-tiny", f"--text={f}", "--num_samples=100000000", "--device=cpu", cwd=trained,
            check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: --num_samples=100000000: the text holds "), p.stderr
    assert "bits per byte" not in p.stdout and len(p.stderr.strip().splitlines()) == 1
