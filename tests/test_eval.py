import json
import os
import random

import numpy as np
import torch
from conftest import run
from torch.nn import functional as F

from common import load_model, setup_runtime
from eval import score, sentence_logps

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
    p = run("eval.py", "--out_dir=out-tiny", f"--pairs={write_pairs(tmp_path / 'grammar.jsonl', GRAMMAR)}", cwd=trained)
    assert " of 5 minimal pairs: accuracy " in p.stdout
    # the score of a sentence, batched and padded, is its log-probability computed directly
    model, tok, _ = load_model(os.path.join(trained, "out-tiny"))
    scores = sentence_logps(model, tok, [bad for _, bad in certain[:3]] + [SENTENCES[0]], 16, setup_runtime("cpu"))
    ids = tok.encode(SENTENCES[0])
    with torch.no_grad():
        logits, _ = model(torch.tensor([[tok.eot_id, *ids[:-1]]]), torch.tensor([ids]))
    direct = F.log_softmax(logits[0], dim=-1)[torch.arange(len(ids)), ids].sum().item()
    assert abs(scores[-1] - direct) < 1e-4 and direct < 0


def test_bad_pairs_files_and_folders_are_one_line_errors(trained, tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"sentence_good": "Il dort."}\n')
    for args in ([f"--text={tmp_path}"], [f"--pairs={tmp_path}"], [f"--pairs={tmp_path / 'pairs.jsonl'}"],
                 ["--stride=33"]):
        p = run("eval.py", "--out_dir=out-tiny", *args, cwd=trained, check=False)
        assert p.returncode == 1 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "is a folder" in run("eval.py", f"--text={tmp_path}", cwd=trained, check=False).stderr


def test_stride_block_size_scores_disjoint_windows_as_lm_eval_does(trained):
    model, _, _ = load_model(os.path.join(trained, "out-tiny"))
    tokens = np.fromfile(os.path.join(trained, "data", "tiny", "val.bin"), dtype=np.uint16)[: 4 * 32 + 1].astype(np.int64)
    total, count = score(model, tokens, 3, setup_runtime("cpu", "float32"), stride=32)
    x, y = torch.from_numpy(tokens[:-1]).view(4, 32), torch.from_numpy(tokens[1:]).view(4, 32)
    with torch.no_grad():
        _, loss = model(x, y)  # four windows side by side, none sees another
    assert count == 128 and abs(total - loss.item() * 128) < 1e-3
    assert abs(score(model, tokens, 3, setup_runtime("cpu", "float32"))[0] - total) > 1e-3  # the default overlaps
