import ctypes
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run
from torch.nn import functional as F

from plumbing import completion_logits, load_model, read_metrics


def chat(cwd: str, stdin: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--out_dir=out-tiny", "--max_new_tokens=12",
                        *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"chat.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def feedback(cwd: str, chat_dir: str) -> list[dict]:
    with open(os.path.join(cwd, chat_dir, "feedback.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def reply_logprob(out_dir: str, prompt: str, reply: str) -> float:
    model, tok, _ = load_model(out_dir)
    with torch.no_grad():
        logits, targets = completion_logits(model, [tok.eot_id, *tok.encode(prompt)], tok.encode(reply))
        return F.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()


@pytest.mark.parametrize("rating,sign", [("1", 1), ("-1", -1)])
def test_a_rating_moves_the_reply_logprob_its_way(trained, rating, sign):
    d = f"chat-{sign}"
    chat(trained, f"Il était une fois\n{rating}\n", f"--chat_dir={d}", "--learning_rate=0.05")
    [entry] = feedback(trained, d)
    assert entry["rating"] == float(rating) and entry["update"] == 1
    before = reply_logprob(os.path.join(trained, "out-tiny"), entry["prompt"], entry["reply"])
    after = reply_logprob(os.path.join(trained, d), entry["prompt"], entry["reply"])
    assert sign * (after - before) > 0.05, (before, after)


def mean_kl_to_start(cwd: str, chat_dir: str) -> float:
    ref, tok, _ = load_model(os.path.join(cwd, "out-tiny"))
    pol, _, _ = load_model(os.path.join(cwd, chat_dir))
    kls = []
    with torch.no_grad():
        for e in feedback(cwd, chat_dir):
            prompt, reply = [tok.eot_id, *tok.encode(e["prompt"])], tok.encode(e["reply"])
            p = F.log_softmax(completion_logits(pol, prompt, reply)[0], -1)
            q = F.log_softmax(completion_logits(ref, prompt, reply)[0], -1)
            kls.append((p.exp() * (p - q)).sum(-1).mean().item())
    return sum(kls) / len(kls)


def test_the_kl_term_bounds_the_drift(trained):
    session = "Le soir tombait\n1\n" * 12
    for kl, d in ((0.0, "chat-kl0"), (20.0, "chat-kl20")):
        chat(trained, session, f"--chat_dir={d}", "--learning_rate=0.05", f"--kl_coef={kl}", "--baseline_decay=0")
    free, held = mean_kl_to_start(trained, "chat-kl0"), mean_kl_to_start(trained, "chat-kl20")
    assert held < 0.5 * free, (held, free)


def test_bad_input_is_asked_again_and_end_of_input_saves(trained):
    start = hashlib.sha256(open(os.path.join(trained, "out-tiny", "ckpt.pt"), "rb").read()).hexdigest()
    p = chat(trained, "\nLa nuit\nabc\n2\n?\n0.5\n \nLe jour\ns\n", "--chat_dir=chat-bad")  # blank prompts: asked again
    assert "'abc' is not a number" in p.stdout and "2.0 is outside [-1, 1]" in p.stdout
    assert "skip: no rating" in p.stdout  # the help
    log = feedback(trained, "chat-bad")
    assert [e["rating"] for e in log] == [0.5, None] and log[-1]["update"] == 1
    assert [e["prompt"] for e in log] == ["La nuit", "Le jour"]
    ckpt = torch.load(os.path.join(trained, "chat-bad", "ckpt.pt"), weights_only=True)
    assert ckpt["chat"]["updates"] == 1 and os.path.getsize(os.path.join(trained, "chat-bad", "rewards.png")) > 1000
    rows = read_metrics(os.path.join(trained, "chat-bad", "metrics.jsonl"))
    assert [(r["update"], r["rating"]) for r in rows] == [(1, 0.5)] and rows[0]["kl"] >= 0
    assert hashlib.sha256(open(os.path.join(trained, "out-tiny", "ckpt.pt"), "rb").read()).hexdigest() == start
    # the tuned model works with the other scripts
    run("sample.py", "--out_dir=chat-bad", "--max_new_tokens=5", cwd=trained)


def test_pairwise_choices_and_script_file(trained, tmp_path):
    script = tmp_path / "session.txt"
    # with a byte-order mark first, as Windows Notepad writes: it is no part of the first prompt
    script.write_text("La mer\n3\n1\nLe vent\n=\nLa pluie\nq\nnever read\n", encoding="utf-8-sig")
    p = chat(trained, "", "--chat_dir=chat-pair", "--pairwise", f"--script={script}")
    assert "'3' is not a choice" in p.stdout and "never read" not in p.stdout.split("choice [")[-1]
    log = feedback(trained, "chat-pair")
    assert [e["choice"] for e in log] == [1, "="] and all(len(e["replies"]) == 2 for e in log)
    assert [e["prompt"] for e in log] == ["La mer", "Le vent"]
    assert [e["update"] for e in log] == [1, 1]  # a tie teaches nothing


def test_a_killed_session_leaves_valid_jsonl_and_ctrl_c_saves(trained):
    args = [sys.executable, os.path.join(ROOT, "chat.py"), "--out_dir=out-tiny", "--max_new_tokens=8"]
    for sig, d in ((signal.SIGKILL, "chat-kill"), (signal.SIGINT, "chat-int")):
        p = subprocess.Popen([*args, f"--chat_dir={d}"], cwd=trained, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        updates = 0
        for i in range(3):
            p.stdin.write(f"Prompt {i}\n0.{i + 1}\n")
            p.stdin.flush()
            while updates <= i:
                updates += p.stdout.readline().startswith("update ")
        p.send_signal(sig)
        p.wait(timeout=60)
        log = feedback(trained, d)  # every line parses
        assert [e["rating"] for e in log] == [0.1, 0.2, 0.3]
        if sig == signal.SIGINT:
            assert p.returncode == 0
            assert torch.load(os.path.join(trained, d, "ckpt.pt"), weights_only=True)["chat"]["updates"] == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tgkill and /proc are Linux's")
def test_ctrl_c_saves_even_when_a_worker_thread_receives_it(trained):
    """The kernel may hand a process's SIGINT to any of its threads: here, on purpose, to one of torch's."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "chat.py"), "--out_dir=out-tiny", "--max_new_tokens=8",
                          "--chat_dir=chat-thread"], cwd=trained, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    p.stdin.write("Prompt\n0.5\n")
    p.stdin.flush()
    while not p.stdout.readline().startswith("update "):
        pass
    workers = [int(t) for t in os.listdir(f"/proc/{p.pid}/task") if int(t) != p.pid]
    assert workers and ctypes.CDLL(None).tgkill(p.pid, workers[0], signal.SIGINT) == 0
    try:
        assert p.wait(timeout=60) == 0  # it noticed, saved and quit
    finally:
        p.kill()
    assert torch.load(os.path.join(trained, "chat-thread", "ckpt.pt"), weights_only=True)["chat"]["updates"] == 1


def test_clear_errors(trained, tmp_path):
    p = chat(trained, "", "--chat_dir=out-tiny", check=False)
    assert p.returncode == 1 and "never overwritten" in p.stderr
    p = chat(trained, "", "--auto_rate=length", check=False)
    assert p.returncode == 1 and "use dialogue" in p.stderr
    p = chat(trained, "", "--top_k=-3", check=False)  # it meant "no filter" once
    assert p.returncode == 1 and "top_k must be zero or positive, got -3" in p.stderr
    p = chat(trained, "", f"--script={tmp_path / 'none.txt'}", check=False)
    assert p.returncode == 1 and "cannot read the script" in p.stderr
    p = chat(str(tmp_path), "", check=False)
    assert p.returncode == 1 and "python train.py" in p.stderr and "Traceback" not in p.stderr


def test_fresh_replaces_a_tuned_model_only_when_asked_and_one_session_per_chat_dir(trained):
    chat(trained, "La nuit\n0.5\n", "--chat_dir=chat-keep")
    path = os.path.join(trained, "chat-keep", "ckpt.pt")
    tuned = open(path, "rb").read()
    p = chat(trained, "", "--chat_dir=chat-keep", "--fresh", check=False)
    assert p.returncode == 1 and "continue it without --fresh, pass another --chat_dir, or --overwrite=True" in p.stderr
    assert open(path, "rb").read() == tuned
    p = chat(trained, "", "--chat_dir=chat-keep", "--fresh", "--overwrite=True")
    assert "(0 updates so far)" in p.stdout and torch.load(path, weights_only=True)["chat"]["updates"] == 0
    with open(os.path.join(trained, "chat-keep", ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a session in progress holds it
        p = chat(trained, "La mer\n1\n", "--chat_dir=chat-keep", check=False)
    assert p.returncode == 1 and "is using chat-keep: wait for it to end, or pass another --chat_dir" in p.stderr
    assert len(feedback(trained, "chat-keep")) == 1  # the refused session wrote nothing


def test_a_session_without_ratings_draws_no_plot_and_warns_nothing(trained):
    p = chat(trained, "La nuit\ns\n", "--chat_dir=chat-unrated")
    assert "Warning" not in p.stderr and "ratings plot" not in p.stdout, p.stderr
    assert not os.path.exists(os.path.join(trained, "chat-unrated", "rewards.png"))
    assert [e["rating"] for e in feedback(trained, "chat-unrated")] == [None]


def saved_updates(cwd: str, chat_dir: str) -> int:
    return torch.load(os.path.join(cwd, chat_dir, "ckpt.pt"), weights_only=True)["chat"]["updates"]


def test_a_line_that_is_not_utf8_is_asked_again_and_the_session_is_saved(trained):
    # Latin-1 "fenêtre", then the same line in UTF-8, as a person retyping it would
    p = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--out_dir=out-tiny",
                        "--max_new_tokens=8", "--chat_dir=chat-latin1"], cwd=trained, capture_output=True, timeout=300,
                       input=b"La fen\xeatre\nLa fen\xc3\xaatre\n0.5\n")
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "that line is not UTF-8 text (byte 0xea at position 6): type it again in UTF-8" in out
    assert [(e["prompt"], e["rating"]) for e in feedback(trained, "chat-latin1")] == [("La fenêtre", 0.5)]
    assert saved_updates(trained, "chat-latin1") == 1


def test_an_error_mid_session_still_saves_the_updates(trained):
    os.makedirs(os.path.join(trained, "chat-error", "feedback.jsonl"))  # the log cannot be written
    p = chat(trained, "La nuit\n0.5\n", "--chat_dir=chat-error", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "error: cannot write chat-error/feedback.jsonl (Is a directory)" in p.stderr
    assert saved_updates(trained, "chat-error") == 1


def test_the_end_message_names_a_feedback_file_only_when_there_is_one(trained):
    p = chat(trained, "", "--chat_dir=chat-empty")
    assert "no feedback logged" in p.stdout and "feedback in" not in p.stdout
    assert not os.path.exists(os.path.join(trained, "chat-empty", "feedback.jsonl"))


def test_a_session_goes_on_only_against_the_reference_it_started_from(trained):
    chat(trained, "La nuit\n0.5\n", "--chat_dir=chat-ref")
    tuned = open(os.path.join(trained, "chat-ref", "ckpt.pt"), "rb").read()
    ckpt = torch.load(os.path.join(trained, "out-tiny", "ckpt.pt"), weights_only=True)
    model = ckpt["model"]
    wpe = model["transformer.wpe.weight"]  # the GPT's position table: one row per position
    others = {"out-tiny-16": {**ckpt, "model_args": {**ckpt["model_args"], "block_size": 16},
                              "model": {**model, "transformer.wpe.weight": wpe[:16]}},  # another block_size
              "out-tiny-other": {**ckpt, "model": {k: v * 1.01 for k, v in model.items()}}}  # other weights
    for name, other in others.items():
        os.makedirs(os.path.join(trained, name), exist_ok=True)
        torch.save(other, os.path.join(trained, name, "ckpt.pt"))
        p = chat(trained, "Le jour\n1\n", "--chat_dir=chat-ref", f"--out_dir={name}", check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        refused = f"error: chat-ref was tuned from another model than {name}/ckpt.pt (out-tiny/ckpt.pt as it"
        assert refused in p.stderr, p.stderr
        assert open(os.path.join(trained, "chat-ref", "ckpt.pt"), "rb").read() == tuned
    assert len(feedback(trained, "chat-ref")) == 1
    p = chat(trained, "Le jour\n1\n", "--chat_dir=chat-ref")  # its own reference: the session goes on
    assert "(1 updates so far)" in p.stdout and len(feedback(trained, "chat-ref")) == 2


def test_a_chat_dir_that_is_a_symlink_to_out_dir_is_refused(trained):
    start = open(os.path.join(trained, "out-tiny", "ckpt.pt"), "rb").read()
    os.symlink("out-tiny", os.path.join(trained, "chat-link"))
    p = chat(trained, "La nuit\n0.5\n", "--chat_dir=chat-link", check=False)
    assert p.returncode == 1 and "chat_dir must differ from out_dir" in p.stderr
    assert open(os.path.join(trained, "out-tiny", "ckpt.pt"), "rb").read() == start


def test_a_chat_dir_holding_a_trained_model_is_refused(trained):
    """A --chat_dir that names another model's folder (train.py's, dpo.py's): its ckpt.pt has the
    tokenizer and shape of out_dir's, and was once taken for an earlier session, then replaced."""
    os.makedirs(os.path.join(trained, "out-tiny-copy"), exist_ok=True)
    for f in ("ckpt.pt", "metrics.jsonl"):
        with open(os.path.join(trained, "out-tiny", f), "rb") as src, \
                open(os.path.join(trained, "out-tiny-copy", f), "wb") as dst:
            dst.write(src.read())
    before = {f: open(os.path.join(trained, "out-tiny-copy", f), "rb").read() for f in ("ckpt.pt", "metrics.jsonl")}
    p = chat(trained, "La nuit\n0.5\n", "--chat_dir=out-tiny-copy", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "out-tiny-copy/ckpt.pt is not a model that chat.py tuned" in p.stderr
    assert sorted(os.listdir(os.path.join(trained, "out-tiny-copy"))) == [".lock", "ckpt.pt", "metrics.jsonl"]
    assert {f: open(os.path.join(trained, "out-tiny-copy", f), "rb").read() for f in before} == before
