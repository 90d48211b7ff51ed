import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY, run

import dpo
from common import completion_logps, draw_windows, load_model, pack


def test_loss_and_metrics_match_a_hand_computation():
    pi_c, pi_r = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -9.0])
    ref_c, ref_r = torch.tensor([-10.5, -12.0]), torch.tensor([-10.5, -10.0])
    # h = (pi_c - ref_c) - (pi_r - ref_r) = [1, -1]
    loss, m = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.1))) / 2  # -log sigmoid(+-0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-6) and m["loss"] == pytest.approx(expected, abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.025) and m["rewards/rejected"] == pytest.approx(0.025)
    assert m["rewards/accuracies"] == 0.5 and m["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    assert m["logps/chosen"] == -11.0 and m["logps/rejected"] == -10.0


def test_ipo_and_label_smoothing_formulas():
    pi_c, pi_r, ref_c, ref_r = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])
    h = 1.0 - (-0.5)  # 1.5
    loss, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.25, loss_type="ipo", label_smoothing=0.0)
    assert loss.item() == pytest.approx((h - 1 / (2 * 0.25)) ** 2)
    loss, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.25, loss_type="sigmoid", label_smoothing=0.2)
    sig = 1 / (1 + math.exp(-0.25 * h))
    assert loss.item() == pytest.approx(-0.8 * math.log(sig) - 0.2 * math.log(1 - sig), abs=1e-6)


def test_only_completion_tokens_are_scored(trained):
    model, tok, _ = load_model(os.path.join(trained, "out-tiny"))
    completion = tok.encode(" la suite")
    lps = []
    for prompt in (tok.encode("Il était une fois"), tok.encode("Tout autre chose, vraiment")):
        x, y = pack([prompt], [completion], model.config.block_size, "cpu")
        assert (y != -1).sum() == len(completion)
        logits, _ = model(x, y)
        logp = torch.log_softmax(logits, -1)[0]
        manual = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(completion))
        lps.append(completion_logps(logits, y).item())
        assert lps[-1] == pytest.approx(manual.item(), abs=1e-5)
    assert lps[0] != pytest.approx(lps[1])  # the prompt is context: it changes the score, it is not scored


def test_long_pairs_are_cut_the_same_way_and_counted(trained):
    _, tok, _ = load_model(os.path.join(trained, "out-tiny"))
    rows = [{"prompt": "mot " * 40, "chosen": "un deux", "rejected": "trois"},
            {"prompt": "a", "chosen": "b", "rejected": "c"}]
    pairs, cut = dpo.tokenize(rows, tok, 32)
    assert cut == 1
    p, cw, cl = pairs[0]  # the prompt lost its oldest tokens, to fit the longer completion
    assert len(p) + max(len(cw), len(cl)) == 33 and p[-1] == tok.encode("mot " * 40)[-1]
    assert pairs[1][0] == [tok.eot_id, *tok.encode("a")]
    assert dpo.tokenize(rows, tok, 32) == (pairs, cut)  # the same way every time


def test_dpo_run_raises_reward_accuracy_and_keeps_the_reference(trained):
    start = hashlib.sha256(open(os.path.join(trained, "out-tiny", "ckpt.pt"), "rb").read()).hexdigest()
    p = run("dpo.py", "--init_from=out-tiny", "--out_dir=out-tiny-dpo", "--make_pairs=48", "--prompt_tokens=12",
            "--completion_tokens=10", "--max_iters=40", "--eval_interval=40", "--log_interval=10",
            "--learning_rate=3e-3", "--device=cpu", cwd=trained)
    assert "rewards/accuracies" in p.stdout and "rewards/margins" in p.stdout
    d = os.path.join(trained, "out-tiny-dpo")
    with open(os.path.join(d, "pairs.jsonl"), encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    assert len(pairs) >= 40 and all(set(r) == {"prompt", "chosen", "rejected"} for r in pairs)
    # on its own pairs: evaluated on the training file itself
    p = run("dpo.py", "--init_from=out-tiny", "--out_dir=out-tiny-dpo2", "--pairs=out-tiny-dpo/pairs.jsonl",
            "--val_pairs=out-tiny-dpo/pairs.jsonl", "--max_iters=60", "--eval_interval=60", "--learning_rate=3e-3",
            "--device=cpu", cwd=trained)
    acc = [float(line.split("rewards/accuracies ")[1].split(",")[0]) for line in p.stdout.splitlines()
           if line.startswith("eval at step")]
    assert acc[0] == 0.0 and acc[-1] >= 0.8, acc  # at step 0 the policy is the reference: every reward is 0
    ckpt = torch.load(os.path.join(trained, "out-tiny-dpo2", "ckpt.pt"), weights_only=True)
    assert ckpt["history"]["eval/rewards/accuracies"][1][-1] == pytest.approx(acc[-1], abs=5e-5)  # logged to 4 places
    assert hashlib.sha256(open(os.path.join(trained, "out-tiny", "ckpt.pt"), "rb").read()).hexdigest() == start
    assert os.path.getsize(os.path.join(trained, "out-tiny-dpo2", "dpo_loss.png")) > 1000
    run("sample.py", "--out_dir=out-tiny-dpo2", "--max_new_tokens=5", cwd=trained)
    run("eval.py", "--out_dir=out-tiny-dpo2", cwd=trained)
    # a DPO checkpoint holds no training run to resume: one line that says what to do, no traceback
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-tiny-dpo2", "--init_from=resume", *TINY, cwd=trained,
            check=False)
    assert p.returncode == 1 and "not written by train.py" in p.stderr and "Traceback" not in p.stderr


def test_ipo_with_label_smoothing_is_refused_before_any_work(trained):
    p = run("dpo.py", "--init_from=out-tiny", "--out_dir=out-tiny-ipo", "--make_pairs=8", "--loss_type=ipo",
            "--label_smoothing=0.1", "--device=cpu", cwd=trained, check=False)
    assert p.returncode == 1 and "label_smoothing applies to loss_type=sigmoid only" in p.stderr
    assert not os.path.exists(os.path.join(trained, "out-tiny-ipo"))


def test_passages_stay_inside_one_document_and_the_draw_gives_up():
    eot = 9
    tokens = np.array([1, 2, 3, 4, 5, eot, 6, 7, 8, 1, 2, eot, 3, 4, 5, 6, 7, 8, 1], dtype=np.uint16)
    windows = draw_windows(tokens, 20, 4, eot, seed=0)
    assert len(windows) == 20 and all(eot not in w and len(w) == 4 for w in windows)
    assert windows == draw_windows(tokens, 20, 4, eot, seed=0)  # the same prompts every time: paired comparisons
    with pytest.raises(SystemExit, match="too few passages"):  # no window of 7 fits: an error, not an endless loop
        draw_windows(tokens, 3, 7, eot, seed=0)


def test_reference_logps_carry_no_gradient(trained):
    model, tok, _ = load_model(os.path.join(trained, "out-tiny"))
    pairs, _ = dpo.tokenize([{"prompt": "Il", "chosen": " était", "rejected": " fut"}], tok, 32)
    with torch.no_grad():
        ref_c, _ = dpo.batch_logps(model, pairs, 32, "cpu", mean=False)
    pi_c, _ = dpo.batch_logps(model.train(), pairs, 32, "cpu", mean=False)
    loss, _ = dpo.dpo_loss(pi_c, pi_c.detach(), ref_c, ref_c, 0.1, "sigmoid", 0.0)
    loss.backward()
    assert not ref_c.requires_grad and model.lm_head.weight.grad is not None


def test_chat_feedback_becomes_pairs(tmp_path):
    log = tmp_path / "feedback.jsonl"
    rows = [{"prompt": "P", "replies": ["a", "b"], "choice": 2, "update": 1},
            {"prompt": "P", "replies": ["c", "d"], "choice": "=", "update": 1},
            {"prompt": "Q", "reply": "good", "rating": 1.0, "update": 2},
            {"prompt": "Q", "reply": "bad", "rating": -0.5, "update": 3},
            {"prompt": "Q", "reply": "skipped", "rating": None, "update": 3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert dpo.load_pairs(str(log)) == [{"prompt": "P", "chosen": "b", "rejected": "a"},
                                        {"prompt": "Q", "chosen": "good", "rejected": "bad"}]


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "p", "chosen": "c"}\n', r"pairs\.jsonl, row 1: no text column 'rejected'"),
    (b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": " ", "rejected": "r"}\n',
     r"pairs\.jsonl, row 2: the chosen completion is empty"),
    (b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "\xe9t\xe9", "chosen": "c", "rejected": "r"}\n',
     r"pairs\.jsonl, row 2: bytes that are not UTF-8"),
    (b'{"prompt": "p", "chosen": "c", "rejected": "r"\n', r"pairs\.jsonl, row 1: not JSON"),
])
def test_bad_pair_files_name_the_file_and_row(tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=message):
        dpo.load_pairs(str(path))


def test_dpo_on_the_llama_moe_adds_the_router_loss(llama_trained):
    rows = [{"prompt": "Il était une fois", "chosen": " un roi qui avait trois filles.", "rejected": " de de de de"},
            {"prompt": "Elle dit :", "chosen": " « Venez ! »", "rejected": " la la la"}] * 4
    with open(os.path.join(llama_trained, "llama_pairs.jsonl"), "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    p = run("dpo.py", "--init_from=out-llama-tiny", "--out_dir=out-llama-dpo", "--pairs=llama_pairs.jsonl",
            "--val_pairs=llama_pairs.jsonl", "--max_iters=20", "--eval_interval=20", "--log_interval=5",
            "--batch_size=4", "--learning_rate=3e-3", "--device=cpu", cwd=llama_trained)
    acc = [float(line.split("rewards/accuracies ")[1].split(",")[0]) for line in p.stdout.splitlines()
           if line.startswith("eval at step")]
    assert acc[-1] == 1.0, p.stdout
    model, _, ckpt = load_model(os.path.join(llama_trained, "out-llama-dpo"))
    assert ckpt["model_args"]["arch"] == "llama" and model.moe_layers


def test_aux_loss_is_part_of_the_dpo_objective(llama_trained):
    model, tok, _ = load_model(os.path.join(llama_trained, "out-llama-tiny"))
    pairs, _ = dpo.tokenize([{"prompt": "Il", "chosen": " était", "rejected": " fut"}], tok, 32)
    model.train()
    dpo.batch_logps(model, pairs, 32, "cpu", mean=False)
    assert model.aux_loss().item() > 0  # what dpo.py adds to its loss for a MoE model
