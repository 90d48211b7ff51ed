import fcntl
import hashlib
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, finish, run, torchrun

import dpo
import eval as eval_script
import plumbing
from model import completion_logps, pack
from plumbing import curve, draw_windows, load_checkpoint, load_model, read_metrics


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
        logits = model(x)
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
    with open(os.path.join(d, "pairs_val.jsonl"), encoding="utf-8") as f:
        assert sum(1 for _ in f) >= 80  # 100 held out at least (less the samples that came out empty)
    # on its own pairs: evaluated on the training file itself
    p = run("dpo.py", "--init_from=out-tiny", "--out_dir=out-tiny-dpo2", "--pairs=out-tiny-dpo/pairs.jsonl",
            "--val_pairs=out-tiny-dpo/pairs.jsonl", "--max_iters=60", "--eval_interval=60", "--learning_rate=3e-3",
            "--device=cpu", cwd=trained)
    acc = [float(line.split("rewards/accuracies ")[1].split(",")[0]) for line in p.stdout.splitlines()
           if line.startswith("eval at step")]
    assert acc[0] == 0.0 and acc[-1] >= 0.8, acc  # at step 0 the policy is the reference: every reward is 0
    rows = read_metrics(os.path.join(trained, "out-tiny-dpo2", "metrics.jsonl"))
    assert curve(rows, "eval/rewards/accuracies")[1][-1] == pytest.approx(acc[-1], abs=5e-5)  # logged to 4 places
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
    # one rating per prompt (a plain chat session) compares nothing: the error says how to get pairs
    log.write_text("".join(json.dumps(r) + "\n" for r in rows[2:3]), encoding="utf-8")
    with pytest.raises(SystemExit, match=r"holds no preference pairs: a pair is a --pairwise choice, or two "
                                         r"replies to the same prompt rated differently; rate with chat.py --pairwise"):
        dpo.load_pairs(str(log))


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
    assert model.router_loss().item() > 0  # what dpo.py adds to its loss for a MoE model


def metric_lines(stdout: str) -> dict[str, str]:
    """The logged metrics of each training step and evaluation, without their timings."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^((?:step|eval at step) \d+): (.*?)(?:, \d+ ms/step)?$",
                                                        stdout, re.M)}


def run_dpo_here(monkeypatch, *args: str) -> None:
    """python dpo.py ARGS, run in this process: the test can replace plumbing's functions."""
    monkeypatch.setattr(sys, "argv", ["dpo.py", *args])
    handler = signal.getsignal(signal.SIGINT)
    try:
        runpy.run_path(os.path.join(ROOT, "dpo.py"), run_name="__main__")
    finally:  # dpo.py's Ctrl-C handler is for dpo.py: the tests that follow keep pytest's
        signal.signal(signal.SIGINT, handler)


def test_a_resumed_run_repeats_an_uninterrupted_one(trained, monkeypatch, capsys):
    """A run killed after its checkpoint at step 12 (its max_time budget fixed at step 11) and resumed
    gives the uninterrupted run's metrics and weights, without making pairs or a reference pass again."""
    monkeypatch.chdir(trained)
    monkeypatch.setattr(plumbing, "iters_in_budget", lambda *a: 16)  # the steps that "fit" in max_time: no timing here
    save = plumbing.save_checkpoint

    def save_and_keep_step_12(obj, path):  # the state a kill -9 right after the step-12 checkpoint leaves
        save(obj, path)
        if obj["iter_num"] == 12:
            os.makedirs("out-dpo-cut", exist_ok=True)
            save(obj, os.path.join("out-dpo-cut", "ckpt.pt"))
            shutil.copy(os.path.join("out-dpo-whole", "metrics.jsonl"), "out-dpo-cut")  # and the log so far

    monkeypatch.setattr(plumbing, "save_checkpoint", save_and_keep_step_12)
    args = ["--init_from=out-tiny", "--make_pairs=16", "--prompt_tokens=12", "--completion_tokens=10",
            "--max_iters=1000000", "--max_time=60", "--eval_interval=12", "--log_interval=1", "--warmup_iters=2",
            "--learning_rate=3e-3", "--device=cpu"]
    run_dpo_here(monkeypatch, "--out_dir=out-dpo-whole", *args)
    whole = metric_lines(capsys.readouterr().out)
    assert "step 16" in whole and "step 17" not in whole  # the budget ended the schedule and the run

    p = run("dpo.py", "--out_dir=out-dpo-cut", "--resume=True", *args, cwd=trained)
    assert "resuming out-dpo-cut/ckpt.pt at step 12" in p.stdout
    assert "making" not in p.stdout and "reference's log-probabilities" not in p.stdout  # both kept from the start
    resumed = metric_lines(p.stdout)
    assert sorted(resumed) == sorted(["step 13", "step 14", "step 15", "step 16", "eval at step 16"])
    assert all(resumed[k] == whole[k] for k in resumed), (resumed, whole)
    a, b = (load_checkpoint(os.path.join(trained, d, "ckpt.pt")) for d in ("out-dpo-whole", "out-dpo-cut"))
    assert b["iter_num"] == 16 and b["dpo"]["budget"] == {"max_time": 60.0, "iters": 16}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    metrics = [read_metrics(os.path.join(trained, d, "metrics.jsonl")) for d in ("out-dpo-whole", "out-dpo-cut")]
    assert metrics[0] == metrics[1]  # the steps redone after the cut are logged once

    # a fresh run does not replace the tuned model, a run at its end trains no more, and resuming
    # refuses other pairs: settings that would make or split them anew, or a changed file
    def refused(*more: str) -> str:
        with pytest.raises(SystemExit) as e:
            run_dpo_here(monkeypatch, "--out_dir=out-dpo-cut", *args, *more)
        return str(e.value)

    assert "--resume=True, pass another --out_dir, or --overwrite=True" in refused()
    assert "at step 16: its run has ended" in refused("--resume=True")
    assert "make_pairs=99 (checkpoint: 16)" in refused("--resume=True", "--make_pairs=99")
    with open("out-dpo-whole/pairs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "Il", "chosen": " était", "rejected": " fut"}) + "\n")
    assert "the pairs of out-dpo-whole/pairs.jsonl changed" in refused("--resume=True", "--max_time=0")
    assert "making" not in capsys.readouterr().out
    assert load_checkpoint(os.path.join(trained, "out-dpo-cut", "ckpt.pt"))["iter_num"] == 16


def test_dropout_is_off_so_the_policy_starts_as_the_reference(trained, tmp_path):
    ckpt = load_checkpoint(os.path.join(trained, "out-tiny", "ckpt.pt"))  # as if trained with --dropout=0.1
    os.makedirs(os.path.join(trained, "out-tiny-dropout"), exist_ok=True)
    torch.save({**ckpt, "model_args": {**ckpt["model_args"], "dropout": 0.1}},
               os.path.join(trained, "out-tiny-dropout", "ckpt.pt"))
    rows = [{"prompt": "Il était une fois", "chosen": " un roi.", "rejected": " de de de"},
            {"prompt": "Elle dit :", "chosen": " « Venez donc ! »", "rejected": " la"},
            {"prompt": "Le soir", "chosen": " tombait.", "rejected": " tombait."}]  # no preference: dropped
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows * 4), encoding="utf-8")
    p = run("dpo.py", "--init_from=out-tiny-dropout", "--out_dir=out-dpo-dropout", f"--pairs={pairs}",
            f"--val_pairs={pairs}", "--max_iters=1", "--log_interval=1", "--batch_size=4", "--device=cpu", cwd=trained)
    assert p.stdout.count("dropped 4 pair(s) whose chosen equals rejected") == 2  # the training and held-out files
    assert "8 training pairs" in p.stdout
    rows = read_metrics(os.path.join(trained, "out-dpo-dropout", "metrics.jsonl"))
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):  # step 1's, measured before its update
        assert curve(rows, k) == ([1], [pytest.approx(0.0, abs=1e-6)]), (k, curve(rows, k))


def test_too_few_pairs_is_one_line_before_the_reference_pass(trained, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "Il", "chosen": " était", "rejected": " fut"}) + "\n", encoding="utf-8")
    p = run("dpo.py", "--init_from=out-tiny", "--out_dir=out-dpo-one", f"--pairs={one}", "--device=cpu", cwd=trained,
            check=False)
    assert p.returncode == 1 and "holds 1 usable pair(s): too few" in p.stderr and "Traceback" not in p.stderr
    assert "reference" not in p.stdout
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Il", "chosen": " fut", "rejected": " fut"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"holds no preference pairs \(every chosen equals its rejected\)"):
        dpo.load_pairs(str(same))


@pytest.mark.parametrize("args,message", [
    (["--prompt_tokens=0", "--make_pairs=8"], "prompt_tokens must be positive, got 0"),
    (["--make_pairs=-5"], "make_pairs must be zero or positive, got -5"),
    (["--init_from=no-such-model", "--make_pairs=8"], "no checkpoint at no-such-model/ckpt.pt: train one first "
                                                      "(python train.py config/gutenberg.py) or pass --init_from=DIR"),
    (["--resume=True"], "no checkpoint at out-dpo-bad/ckpt.pt to resume"),
    (["--beta=0", "--make_pairs=8"], "need beta > 0 and 0 <= label_smoothing < 0.5"),
    (["--make_pairs=8", "--pairs=mine.jsonl"], "--make_pairs makes the pairs, and --pairs or --val_pairs names "
                                               "others: drop them, or pass --make_pairs=0"),
    (["--pairs=no-such-pairs.jsonl"], "error: no such file: no-such-pairs.jsonl"),  # not the Hub's error
    (["--make_pairs=8"], "prompt_tokens + completion_tokens = 224 is longer than out-tiny's block_size=32: pass "
                         "--prompt_tokens and --completion_tokens that add up to at most 32"),  # every pair cut
])
def test_bad_settings_are_one_line_before_any_sampling(trained, args, message):
    p = run("dpo.py", "--init_from=out-tiny", "--out_dir=out-dpo-bad", *args, "--device=cpu", cwd=trained, check=False)
    assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "making" not in p.stdout and not os.path.exists(os.path.join(trained, "out-dpo-bad"))


def test_one_run_per_out_dir(trained):
    os.makedirs(os.path.join(trained, "out-dpo-busy"), exist_ok=True)
    with open(os.path.join(trained, "out-dpo-busy", ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        p = run("dpo.py", "--init_from=out-tiny", "--out_dir=out-dpo-busy", "--make_pairs=8", "--prompt_tokens=12",
                "--completion_tokens=10", "--device=cpu", cwd=trained, check=False)
    assert p.returncode == 1 and "is using out-dpo-busy" in p.stderr and "making" not in p.stdout


def test_ddp_two_processes_give_the_single_process_run(trained):
    """2 processes share the global batch of 8 pairs, 4 each: the steps and the model of 1 process."""
    args = ["--init_from=out-tiny", "--max_iters=12", "--eval_interval=6", "--log_interval=6",
            "--learning_rate=3e-3", "--device=cpu", "--dtype=float32"]  # bf16 on a CPU with bf16 units: not equal
    single = run("dpo.py", *args, "--out_dir=out-dpo-single", "--batch_size=8", "--make_pairs=48",
                 "--prompt_tokens=12", "--completion_tokens=10", cwd=trained).stdout
    pairs = ["--pairs=out-dpo-single/pairs.jsonl", "--val_pairs=out-dpo-single/pairs_val.jsonl"]
    # every process ends cleanly, after rank 0 has saved
    ddp = torchrun("dpo.py", *args, *pairs, "--out_dir=out-dpo-ddp", "--batch_size=8", cwd=trained).stdout
    assert "as 1 micro-step(s) each of 4 pairs" in ddp, ddp

    def evals(log: str) -> dict[str, list[float]]:
        return {k: [float(v) for v in re.findall(r" (-?[\d.]+)(?:,|$)", line)]
                for k, line in metric_lines(log).items() if k.startswith("eval")}

    a, b = evals(single), evals(ddp)
    assert list(a) == list(b) == [f"eval at step {i}" for i in (0, 6, 12)], (a, b)
    assert a["eval at step 12"] != a["eval at step 0"], a
    assert all(x == pytest.approx(y, abs=2e-4) for s in a for x, y in zip(a[s], b[s], strict=True)), (a, b)
    weights = [load_checkpoint(os.path.join(trained, d, "ckpt.pt"))["model"] for d in ("out-dpo-single", "out-dpo-ddp")]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-4


def write_pairs(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


PAIRS = [{"prompt": "Il était une fois", "chosen": " un roi.", "rejected": " de de de"},
         {"prompt": "Elle dit :", "chosen": " « Venez donc ! »", "rejected": " la"}] * 4


def test_a_diverged_run_never_replaces_its_last_good_checkpoint(trained, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    args = ["--init_from=out-tiny", "--out_dir=out-dpo-nan", f"--pairs={pairs}", f"--val_pairs={pairs}",
            "--batch_size=4", "--device=cpu"]
    p = run("dpo.py", *args, "--max_iters=2", "--eval_interval=2", cwd=trained)
    assert "note: --val_pairs is --pairs: the held-out figures are measured on the training pairs" in p.stdout
    # resumed with a learning rate that ruins the weights in one step, evaluated (and saved) at every step
    p = run("dpo.py", *args, "--resume=True", "--max_iters=6", "--eval_interval=1", "--learning_rate=1e12",
            cwd=trained, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "error: the held-out loss is nan at step 3: stopped; out-dpo-nan/ckpt.pt keeps step 2" in p.stderr
    ckpt = load_checkpoint(os.path.join(trained, "out-dpo-nan", "ckpt.pt"))
    assert ckpt["iter_num"] == 2 and not plumbing.non_finite(ckpt["model"])


def test_ctrl_c_is_one_line_saying_which_step_the_checkpoint_keeps(trained, tmp_path):
    def interrupt(after: str, *args: str) -> str:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "dpo.py"), "--init_from=out-tiny",
                              "--device=cpu", *args], cwd=trained, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            if line.startswith(after):
                p.send_signal(signal.SIGINT)
                break
        out = finish(p)
        assert p.returncode == 1 and "Traceback" not in out, out
        return out.splitlines()[-1]

    # while the pairs are being made: nothing saved
    last = interrupt("making", "--out_dir=out-dpo-int0", "--make_pairs=5000", "--prompt_tokens=8",
                     "--completion_tokens=24")
    assert last == "interrupted: nothing was saved, out-tiny is unchanged", last
    assert not os.path.exists(os.path.join(trained, "out-dpo-int0", "ckpt.pt"))
    # while training, after a checkpoint: the step the message names is the one on disk
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    last = interrupt("step 3:", "--out_dir=out-dpo-int", f"--pairs={pairs}", f"--val_pairs={pairs}",
                     "--batch_size=4", "--max_iters=100000", "--eval_interval=2", "--log_interval=1")
    m = re.fullmatch(r"interrupted at step \d+: out-dpo-int/ckpt.pt keeps step (\d+) \(continue with "
                     r"--resume=True\)", last)
    assert m, last
    kept = load_checkpoint(os.path.join(trained, "out-dpo-int", "ckpt.pt"))["iter_num"]
    assert kept == int(m.group(1)) >= 2, (kept, last)


def test_out_dir_that_is_a_symlink_to_init_from_is_refused(trained):
    start = open(os.path.join(trained, "out-tiny", "ckpt.pt"), "rb").read()
    os.symlink("out-tiny", os.path.join(trained, "out-tiny-link"))
    p = run("dpo.py", "--init_from=out-tiny", "--out_dir=out-tiny-link", "--overwrite=True", "--make_pairs=8",
            "--max_iters=1", "--device=cpu", cwd=trained, check=False)
    assert p.returncode == 1 and "out_dir must differ from init_from" in p.stderr and "making" not in p.stdout
    assert open(os.path.join(trained, "out-tiny", "ckpt.pt"), "rb").read() == start


def test_make_pairs_without_the_training_data_says_where_it_looked_and_data_dir_names_it(trained, tmp_path):
    init_from = os.path.join(trained, "out-tiny")  # run from another folder: its data_dir is relative
    short = ["--prompt_tokens=12", "--completion_tokens=10"]  # the tiny model's block_size is 32
    p = run("dpo.py", f"--init_from={init_from}", "--out_dir=out-elsewhere", "--make_pairs=8", "--device=cpu", *short,
            cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert (f"data/tiny/train.bin is not there (relative to the working folder {tmp_path})" in p.stderr
            and "run dpo.py from the folder train.py ran in, pass --data_dir=DIR, or --pairs=FILE" in p.stderr), p.stderr
    assert "making" not in p.stdout and not os.path.exists(tmp_path / "out-elsewhere")
    # --data_dir names it; a copy whose tokenizer differs (two ranks swapped: the same ids, other strings) is refused
    other = tmp_path / "other"
    shutil.copytree(os.path.join(trained, "data", "tiny"), other)
    ranks = (other / "tokenizer.tiktoken").read_text().splitlines()
    (a, ra), (b, rb) = (line.split() for line in ranks[-2:])
    (other / "tokenizer.tiktoken").write_text("\n".join([*ranks[:-2], f"{a} {rb}", f"{b} {ra}"]) + "\n")
    p = run("dpo.py", f"--init_from={init_from}", "--out_dir=out-elsewhere", "--make_pairs=8", "--device=cpu",
            f"--data_dir={other}", *short, cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and f"the tokenizer of {other} differs" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = run("dpo.py", f"--init_from={init_from}", "--out_dir=out-elsewhere", "--make_pairs=8", "--device=cpu",
            f"--data_dir={trained}/data/tiny", "--prompt_tokens=12", "--completion_tokens=10", "--max_iters=2",
            "--eval_interval=2", cwd=str(tmp_path))
    assert f"making 8 self-play pairs from {trained}/data/tiny" in p.stdout, p.stdout
    assert os.path.exists(tmp_path / "out-elsewhere" / "ckpt.pt")


NO_REPLIES = "a choice needs 'replies', a list of the 2 replies' texts"
BAD_FEEDBACK = [({"prompt": "P", "replies": ["a"], "choice": 2}, NO_REPLIES),  # a short list
                ({"prompt": "P", "choice": 1}, NO_REPLIES),  # a missing key
                ({"prompt": "P", "reply": "r", "rating": "good"}, "rating 'good' is not a number"),
                ({"prompt": ["P"], "reply": "r", "rating": 1}, "no text 'prompt'"),
                ({"prompt": "P", "replies": ["a", "b"], "choice": 3}, "choice 3 is not 1, 2, = or null"),
                ({"prompt": "P", "replies": ["a", "b"], "choice": 1.0}, "choice 1.0 is not 1, 2, = or null")]


@pytest.mark.parametrize("row,why", BAD_FEEDBACK)
def test_malformed_chat_feedback_rows_name_the_file_and_row(tmp_path, row, why):
    good = {"prompt": "Q", "reply": "good", "rating": 1.0, "update": 1}
    path = write_pairs(tmp_path / "feedback.jsonl", [good, row])
    message = f"feedback.jsonl, row 2: not a row of chat.py's feedback log ({why}): correct or delete it"
    with pytest.raises(SystemExit, match=re.escape(message)):
        dpo.load_pairs(path)


def test_pair_files_other_formats_and_a_bom(tmp_path):
    truncated = tmp_path / "pairs.json"
    truncated.write_text('[{"prompt": "p", "chosen": "c"', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"pairs\.json: not JSON \(Expecting ',' delimiter"):
        dpo.load_pairs(str(truncated))
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\np,c,r\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"pairs\.csv: pairs are read from \.jsonl, \.json, \.parquet files"):
        dpo.load_pairs(str(csv))
    # a BOM, as some editors write first, is not part of the first row (dpo.py's pairs, eval.py's --pairs)
    pair, bom = {"prompt": "p", "chosen": "c", "rejected": "r"}, b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(bom + json.dumps(pair).encode() + b"\n")
    assert dpo.load_pairs(str(tmp_path / "bom.jsonl")) == [pair]
    (tmp_path / "bom.json").write_bytes(bom + json.dumps([pair]).encode())
    assert dpo.load_pairs(str(tmp_path / "bom.json")) == [pair]
    blimp = {"sentence_good": "Il est.", "sentence_bad": "Il es."}
    (tmp_path / "blimp.jsonl").write_bytes(bom + json.dumps(blimp).encode())
    assert eval_script.read_pairs(str(tmp_path / "blimp.jsonl")) == [("Il est.", "Il es.")]


def test_make_pairs_never_replaces_pairs_already_in_out_dir(trained):
    """Pairs a person put in out_dir (or a run made, without a model yet): --make_pairs would have
    written its own over them."""
    d = os.path.join(trained, "out-dpo-mine")
    os.makedirs(d, exist_ok=True)
    mine = json.dumps({"prompt": "Il", "chosen": " était une fois", "rejected": " a"}) + "\n"
    with open(os.path.join(d, "pairs.jsonl"), "w", encoding="utf-8") as f:
        f.write(mine)
    p = run("dpo.py", "--init_from=out-tiny", "--out_dir=out-dpo-mine", "--make_pairs=8", "--device=cpu", cwd=trained,
            check=False)
    assert p.returncode == 1 and "out-dpo-mine/pairs.jsonl exists, and --make_pairs would replace it" in p.stderr
    assert "making" not in p.stdout and open(os.path.join(d, "pairs.jsonl"), encoding="utf-8").read() == mine


def test_an_overwrite_interrupted_before_its_first_save_says_what_is_left(trained, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    args = ["--init_from=out-tiny", "--out_dir=out-dpo-ow", f"--pairs={pairs}", "--batch_size=4", "--device=cpu",
            "--eval_interval=100000"]  # its first save: at the end, far away
    run("dpo.py", *args, "--max_iters=2", cwd=trained)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "dpo.py"), *args, "--max_iters=100000",
                          "--overwrite=True"], cwd=trained, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("eval at step 0"):  # its metrics.jsonl is this run's now
            p.send_signal(signal.SIGINT)
            break
    out = finish(p)
    assert p.returncode == 1 and "Traceback" not in out, out
    assert re.match(r"interrupted at step \d+: nothing was saved, out-tiny is unchanged; out-dpo-ow/ckpt.pt is the "
                    r"earlier run's model, but its log", out.splitlines()[-1]), out
