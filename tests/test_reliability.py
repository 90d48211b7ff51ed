"""Faults, caused for real: kill -9, crafted and damaged checkpoints, a full disk, a dying DDP process,
and any input at all to the tokenizers and the configuration."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata

import pytest
import torch
from conftest import ROOT, TINY, finish, run, torchrun, train_defaults
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_train import losses

import plumbing
import tokenizer as tok
from configurator import configure
from model import make_model
from plumbing import load_checkpoint


def popen(script: str, *args: str, cwd: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_kill_9_during_training_then_resume_gives_the_same_losses(workdir):
    args = ["--data_dir=data/tiny", "--eval_interval=5", "--lr_decay_iters=40", "--dropout=0.1", *TINY,
            "--max_iters=40"]
    full = losses(run("train.py", "--out_dir=out-kill-full", *args, cwd=workdir).stdout)
    p = popen("train.py", "--out_dir=out-kill", *args, cwd=workdir)
    for line in p.stdout:
        if line.startswith("iter 17:"):
            p.send_signal(signal.SIGKILL)  # no chance to clean up, like a power cut
            break
    assert p.wait() == -signal.SIGKILL
    resumed = losses(run("train.py", "--out_dir=out-kill", *args, "--init_from=resume", cwd=workdir).stdout)
    first = min(resumed)
    assert first % 5 == 1 and first <= 21 and max(resumed) == 40  # from the last checkpoint before the kill
    assert all(resumed[i] == full[i] for i in resumed), (full, resumed)


@pytest.mark.slow  # writes 16 MB checkpoints over and over
def test_kill_9_during_checkpoint_writes_never_leaves_a_broken_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    writer = (f"import sys; sys.path.insert(0, {ROOT!r}); import torch; from plumbing import save_checkpoint\n"
              "w = torch.randn(4_000_000)\n"  # 16 MB: each write takes a while, so the kills land inside writes
              "for i in range(10**6):\n"
              f"    save_checkpoint({{'model': {{'w': w}}, 'model_args': {{}}, 'i': i}}, {path!r}); print(i, flush=True)\n")
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        p = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # one checkpoint is complete
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        ckpt = plumbing.load_checkpoint(path)  # always the last complete one
        assert isinstance(ckpt["i"], int) and ckpt["model"]["w"].shape == (4_000_000,)


def test_a_crafted_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = tmp_path / "out-evil"
    out.mkdir()
    torch.save({"model": Evil(), "model_args": {}}, out / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"ckpt\.pt is not a readable checkpoint"):
        plumbing.load_checkpoint(str(out / "ckpt.pt"))
    p = run("sample.py", f"--out_dir={out}", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "not a readable checkpoint" in p.stderr
    # what it is and why it is refused, in full; never torch's advice to load it with weights_only=False
    assert "would run posix.system, so it may not be safe to load" in p.stderr, p.stderr
    assert "only loads checkpoints it wrote" in p.stderr and "weights_only" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not marker.exists()


def test_truncated_or_foreign_checkpoint_errors_name_the_file(trained, tmp_path):
    good = open(os.path.join(trained, "out-tiny", "ckpt.pt"), "rb").read()
    (tmp_path / "half.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(SystemExit, match=r"half\.pt is not a readable checkpoint"):
        plumbing.load_checkpoint(str(tmp_path / "half.pt"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"notes\.pt is not a readable checkpoint"):
        plumbing.load_checkpoint(str(tmp_path / "notes.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"other\.pt is not a checkpoint of this project"):
        plumbing.load_checkpoint(str(tmp_path / "other.pt"))


def copy_checkpoint(trained: str, out_dir: str, change) -> str:
    """out-tiny's checkpoint, changed by change(ckpt), saved in trained/out_dir; returns out_dir."""
    ckpt = plumbing.load_checkpoint(os.path.join(trained, "out-tiny", "ckpt.pt"))
    change(ckpt)
    os.makedirs(os.path.join(trained, out_dir), exist_ok=True)
    torch.save(ckpt, os.path.join(trained, out_dir, "ckpt.pt"))
    return out_dir


def one_line_error(p: subprocess.CompletedProcess, message: str) -> None:
    assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_checkpoint_with_non_finite_weights_is_refused_by_every_reader(trained):
    """A run that diverged and saved NaN weights: sample.py crashed, eval.py printed nan, export.py
    exported it."""
    out = copy_checkpoint(trained, "out-nan-weights", lambda ckpt: ckpt["model"]["transformer.h.0.mlp.c_fc.weight"]
                          .view(-1)[7].fill_(float("nan")))
    readers = [("sample.py", "--device=cpu"), ("eval.py", "--device=cpu"), ("export.py", "--hf_dir=hf-nan")]
    for script, arg in readers:
        p = run(script, f"--out_dir={out}", arg, cwd=trained, check=False)
        one_line_error(p, "out-nan-weights/ckpt.pt holds non-finite weights (NaN or inf, in transformer.h.0.mlp.c_fc")
        assert "use an earlier checkpoint, or train again" in p.stderr
    assert not os.path.exists(os.path.join(trained, "hf-nan"))


def nanogpt(ckpt: dict) -> None:
    """A checkpoint as nanoGPT's train.py writes it: its GPT's weights and model_args, no tokenizer."""
    args = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "bias": False, "vocab_size": 512,
            "dropout": 0.0}
    ckpt.clear()
    ckpt.update(model=make_model(args).state_dict(), model_args=args, iter_num=60, optimizer={},
                best_val_loss=torch.tensor(2.0), config={"dataset": "shakespeare_char"})


def test_foreign_empty_or_unknown_arch_checkpoints_are_one_line_naming_the_file(trained, monkeypatch):
    """Each was a traceback: nanoGPT's checkpoint (no tokenizer: KeyError), one with no weights or
    other ones (load_state_dict's RuntimeError), one of an unknown arch (make_model's ValueError)."""
    cases = [(nanogpt, "is not a checkpoint of this project: it holds no tokenizer"),
             (lambda ckpt: ckpt.update(model={}),
              "its weights do not match its model_args: missing transformer.wte.weight"),
             (lambda ckpt: ckpt["model"].update(extra=torch.zeros(2)),
              "its weights do not match its model_args: unexpected extra"),
             (lambda ckpt: ckpt["model_args"].update(n_embd=64),
              "of another shape transformer.wte.weight (512, 32) (model_args: (512, 64))"),
             (lambda ckpt: ckpt["model_args"].update(arch="mamba"),
              "unknown arch 'mamba' (this project trains gpt and llama)")]
    monkeypatch.chdir(trained)
    for i, (change, message) in enumerate(cases):
        out = copy_checkpoint(trained, f"out-foreign{i}", change)
        with pytest.raises(SystemExit, match=re.escape(f"error: {out}/ckpt.pt") + ".*" + re.escape(message)):
            plumbing.load_model(out)  # what every script loads a model with (chat.py too)
    # and as each script says it
    one_line_error(run("sample.py", "--out_dir=out-foreign0", cwd=trained, check=False),
                   "out-foreign0/ckpt.pt is not a checkpoint of this project")
    one_line_error(run("export.py", "--out_dir=out-foreign1", "--hf_dir=hf-f1", cwd=trained, check=False),
                   "out-foreign1/ckpt.pt: its weights do not match")
    one_line_error(run("dpo.py", "--init_from=out-foreign4", "--out_dir=out-dpo-f4", "--make_pairs=8",
                       "--device=cpu", cwd=trained, check=False), "out-foreign4/ckpt.pt: unknown arch")


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    plumbing.save_checkpoint({"model": {"w": torch.ones(3)}, "model_args": {}, "i": 1}, path)
    real_save = torch.save

    def save_then_fill_the_disk(obj, f):
        real_save(obj, f)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    with pytest.raises(SystemExit, match=r"No space left on device.*previous checkpoint is intact"):
        plumbing.save_checkpoint({"model": {"w": torch.zeros(3)}, "model_args": {}, "i": 2}, path)
    monkeypatch.undo()
    assert plumbing.load_checkpoint(path)["i"] == 1 and not os.path.exists(path + ".tmp")


def limit_file_size(nbytes: int):
    """For a subprocess: files cannot grow past nbytes, as on a full disk (a write that crosses the limit
    writes what fits, the next one fails), without mounting anything."""
    import resource

    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return preexec


def test_full_disk_during_a_checkpoint_save_says_the_disk_is_full(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(os.path.join(trained, "out-tiny"), out)
    before = (out / "ckpt.pt").read_bytes()
    args = [f"--data_dir={trained}/data/tiny", f"--out_dir={out}", "--init_from=resume", "--max_iters=61", *TINY]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=str(tmp_path), text=True,
                       capture_output=True, preexec_fn=limit_file_size(len(before) // 2))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.fullmatch(rf"error: the disk is full: could not write {out}/ckpt.pt \(.*unexpected pos \d+ vs \d+\): "
                        r"the previous checkpoint is intact: free some space, then resume\n", p.stderr), p.stderr
    assert (out / "ckpt.pt").read_bytes() == before and not os.path.exists(out / "ckpt.pt.tmp")


def test_full_disk_during_a_metrics_append_keeps_the_earlier_rows(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    plumbing.log_metrics(path, {"iter": 1, "loss": 2.0})
    with pytest.raises(SystemExit) as e:
        plumbing.log_metrics(str(tmp_path / "no" / "such" / "metrics.jsonl"), {"iter": 1})
    assert "disk is full" not in str(e.value)  # another failure keeps its own reason
    os.symlink("/dev/full", tmp_path / "full.jsonl")  # every write: No space left on device
    with pytest.raises(SystemExit) as e:
        plumbing.log_metrics(str(tmp_path / "full.jsonl"), {"iter": 2, "loss": 1.5})
    assert str(e.value) == (f"error: the disk is full: could not append to {tmp_path}/full.jsonl (No space left on "
                            "device): its earlier rows are kept, and so is the last checkpoint: free space, then "
                            "resume")
    # a row that crosses the limit: what was written of it is taken back, the earlier rows stay whole
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from plumbing import log_metrics\n"
            f"log_metrics({path!r}, {{'iter': 2, 'text': 'x' * 1000}})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       preexec_fn=limit_file_size(os.path.getsize(path) + 100))
    assert p.returncode == 1 and p.stderr.startswith(f"error: could not append to {path} (File too large)"), p.stderr
    assert plumbing.read_metrics(path) == [{"iter": 1, "loss": 2.0}] and open(path).read().endswith("}\n")
    # nor does a resume's rewrite of the file (keep_metrics) lose it
    code = code.replace("log_metrics", "keep_metrics").replace("{'iter': 2, 'text': 'x' * 1000}", "1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limit_file_size(10))
    assert p.returncode == 1 and p.stderr == f"error: could not rewrite {path} (File too large): it is as it was\n"
    assert plumbing.read_metrics(path) == [{"iter": 1, "loss": 2.0}] and not os.path.exists(path + ".tmp")


# --- never lose a trained model, never train on the wrong data (train.py) -----------------------------
def read_until(p: subprocess.Popen, prefix: str) -> str:
    """The output of p up to and including its first line that starts with prefix."""
    out = ""
    for line in p.stdout:
        out += line
        if line.startswith(prefix):
            return out
    raise AssertionError(f"{prefix!r} never came:\n{out}")


def test_a_fresh_run_never_replaces_a_trained_model(trained):
    ckpt = os.path.join(trained, "out-tiny", "ckpt.pt")
    before = open(ckpt, "rb").read()
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-tiny", "--max_iters=5", *TINY, cwd=trained, check=False)
    assert p.returncode == 1 and "already holds a model" in p.stderr and "Traceback" not in p.stderr
    assert all(hint in p.stderr for hint in ("--init_from=resume", "--out_dir", "--overwrite=True"))
    assert open(ckpt, "rb").read() == before


def test_two_runs_in_one_out_dir_the_second_refuses_and_a_killed_run_leaves_no_lock(workdir):
    args = ["--data_dir=data/tiny", "--out_dir=out-twice", "--eval_interval=5", *TINY]
    first = popen("train.py", *args, "--max_iters=100000", cwd=workdir)
    read_until(first, "iter 6:")  # it has written a checkpoint and goes on
    p = run("train.py", *args, "--max_iters=100000", "--init_from=resume", cwd=workdir, check=False)
    assert p.returncode == 1 and f"another run (process {first.pid}) is using out-twice" in p.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = popen("train.py", *args, "--max_iters=100000", "--init_from=resume", cwd=workdir)
    assert "resuming from out-twice/ckpt.pt" in read_until(again, "iter ")  # the lock died with the first run
    again.kill()
    again.wait()


def test_an_out_dir_that_cannot_take_the_run_is_one_line(workdir, tmp_path):
    (tmp_path / "a_file").write_text("notes")
    for out_dir, message in ((tmp_path / "a_file", "is a file, not a folder"), ("/proc/no/such", "cannot write in")):
        p = run("train.py", "--data_dir=data/tiny", f"--out_dir={out_dir}", *TINY, cwd=workdir, check=False)
        assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert (tmp_path / "a_file").read_text() == "notes"


def test_a_run_refused_before_it_wrote_anything_leaves_no_folder(workdir):
    """The out_dir a fresh run made is removed when the run stops with nothing in it; one that was
    there before is kept."""
    os.makedirs(os.path.join(workdir, "out-mine"))
    for out_dir in ("out-new", "out-mine"):
        p = run("train.py", "--data_dir=data/no-such", f"--out_dir={out_dir}", *TINY, cwd=workdir, check=False)
        assert p.returncode == 1 and "no prepared data in data/no-such" in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(workdir, "out-new"))
    assert os.path.isdir(os.path.join(workdir, "out-mine"))


def test_resuming_on_data_with_another_tokenizer_is_refused(trained, txt_dir, tmp_path):
    shutil.copytree(os.path.join(trained, "out-tiny"), tmp_path / "out-tiny")
    # other books, a vocabulary of the same size: the same ids would mean other strings
    other = tmp_path / "other"
    other.mkdir()
    for name in sorted(os.listdir(txt_dir))[3:]:
        shutil.copy(os.path.join(txt_dir, name), other / name)
    run("prepare.py", f"--dataset={other}", "--vocab_size=512", "--name=other", "--val_fraction=0.3",
        cwd=str(tmp_path))
    p = run("train.py", "--data_dir=data/other", "--out_dir=out-tiny", "--init_from=resume", "--max_iters=70",
            *TINY, cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "tokenizer of data/other differs" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--arch=llama", "--n_embd=30", "--n_head=2"], "head dimension n_embd/n_head = 15 must be even"),
    (["--compile=no"], "compile takes true or false"),
    (["--batch_size=0"], "batch_size must be positive"),
])
def test_impossible_settings_are_one_line_before_any_work(workdir, args, message):
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-never", *TINY, *args, cwd=workdir, check=False)
    assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(workdir, "out-never"))


def test_ctrl_c_during_training_is_one_line_saying_what_is_kept(workdir):
    p = popen("train.py", "--data_dir=data/tiny", "--out_dir=out-ctrl-c", "--eval_interval=5", *TINY,
              "--max_iters=100000", cwd=workdir)
    read_until(p, "iter 7:")
    p.send_signal(signal.SIGINT)
    rest = finish(p)
    assert p.returncode == 130 and "Traceback" not in rest, rest
    assert re.search(r"interrupted at iteration \d+: out-ctrl-c/ckpt.pt keeps iteration 5 \(continue with", rest)


def test_a_ctrl_c_that_a_compiled_call_drops_is_raised_again():
    """torch.compile's guard check, before each call of a compiled function, drops an exception raised
    while it runs Python code: a Ctrl-C noticed there was lost, and sample.py went on printing samples
    (one press in ten here, in a loop of small calls; two in three with Inductor's kernels). on_ctrl_c
    counts the presses, and check_ctrl_c, once a round, raises a dropped one: every press stops the loop."""
    class Stopped(BaseException):  # as KeyboardInterrupt
        pass

    def stop(signum, frame):
        raise Stopped

    f = torch.compile(lambda x: x + 1, backend="eager")  # Dynamo's guards, without Inductor's compile
    x = torch.zeros(4)
    f(x)
    before, kill = signal.getsignal(signal.SIGINT), None
    try:
        for _ in range(50):
            plumbing.CTRL_C.clear()
            plumbing.on_ctrl_c(stop)
            r, w = os.pipe()  # the child writes "sent" there once its Ctrl-C is sent
            go_r, go_w = os.pipe()  # and sends it once it reads a line here: never during Popen
            os.set_blocking(r, False)
            kill = subprocess.Popen(["sh", "-c", f"read go; kill -INT {os.getpid()}; echo sent"], stdin=go_r, stdout=w)
            os.close(go_r)
            os.close(w)
            with pytest.raises(Stopped):
                os.write(go_w, b"go\n")  # Ctrl-C from another process, at a moment the loop cannot choose
                while not sent(r):
                    f(x)
                    plumbing.check_ctrl_c()
                for _ in range(100):  # the handler runs within a few of these calls, or the press was dropped
                    f(x)
                    plumbing.check_ctrl_c()
            os.close(r)
            os.close(go_w)
            kill.wait()
    finally:
        if kill is not None:  # no press left on its way to pytest, which would end the session
            kill.kill()
            kill.wait()
        signal.signal(signal.SIGINT, before)
        plumbing.CTRL_C.clear()


def test_a_ctrl_c_ignored_from_the_start_stays_ignored():
    """A script started in the background by a shell script (cmd &) inherits SIGINT ignored: a Ctrl-C
    at the terminal is for the foreground job, and on_ctrl_c leaves it ignored."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        plumbing.on_ctrl_c()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def sent(r: int) -> bool:
    """Whether the pipe r has been written to or closed: a bare read. (Popen.poll, interrupted by the
    handler, can leave its lock held.)"""
    try:
        os.read(r, 1)
        return True
    except BlockingIOError:
        return False


@pytest.mark.parametrize("script, args, started", [
    ("sample.py", ["--start=Il était", "--max_new_tokens=100000000"], "Il était"),
    ("sample.py", ["--num_samples=100000000", "--max_new_tokens=4"], "--- sample 40 ---"),  # a second batch
    ("eval.py", ["--num_samples=2", "--max_new_tokens=100000000"], "cross-entropy"),
])
def test_ctrl_c_in_sample_and_eval_is_one_line_and_status_130(trained, script, args, started):
    """A real Ctrl-C while the script works; sample.py --num_samples=100000000 (a typo, say) prints
    its samples batch by batch, with bounded memory, until Ctrl-C, where it once tried to allocate
    them all at once and died."""
    p = popen(script, "--out_dir=out-tiny", "--device=cpu", *args, cwd=trained)
    before = ""
    while started not in before:
        c = p.stdout.read(1)
        assert c, before  # the process ended before it was interrupted
        before += c
    p.send_signal(signal.SIGINT)
    rest = finish(p)
    assert p.returncode == 130 and rest.splitlines()[-1] == "interrupted" and "Traceback" not in rest, rest


@pytest.mark.parametrize("resume", [False, True])
def test_ctrl_c_during_start_up_is_one_line_and_writes_nothing(trained, tmp_path, resume):
    out = tmp_path / "out"
    if resume:
        shutil.copytree(os.path.join(trained, "out-tiny"), out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)} if resume else {}
    args = [f"--data_dir={trained}/data/tiny", f"--out_dir={out}", "--max_iters=1000", *TINY, "--compile=None"]
    p = popen("train.py", *args, *(["--init_from=resume"] if resume else []), cwd=str(tmp_path))
    read_until(p, "tokens per iteration")  # data checked, model not built yet: then a compile check, a peak
    p.send_signal(signal.SIGINT)
    rest = finish(p)
    assert p.returncode == 130 and "Traceback" not in rest, rest
    kept = f"{out}/ckpt.pt is as it was (continue with --init_from=resume)" if resume else "no checkpoint was written"
    assert rest.splitlines()[-1] == f"interrupted during start-up: {kept}", rest
    assert out.exists() == resume  # the folder a fresh run made, with nothing in it, is gone
    after = {f: (out / f).read_bytes() for f in os.listdir(out) if f != ".lock"} if resume else {}
    assert after == {f: b for f, b in before.items() if f != ".lock"}  # nothing written, nothing half-written


def test_resume_is_exact_under_a_max_time_budget(workdir):
    """The budget (iterations that fit in max_time) is saved: a run killed after its first count and
    resumed repeats the same learning rates and losses, and keeps the same last iteration (until its
    next count, at iteration 60 here)."""
    args = ["--data_dir=data/tiny", "--out_dir=out-budget", "--eval_interval=5", *TINY, "--warmup_iters=10",
            "--dropout=0.1", "--max_iters=1000000", "--max_time=120"]  # fitted at 15, timed from 5
    first = popen("train.py", *args, cwd=workdir)
    before = read_until(first, "iter 19:")
    first.send_signal(signal.SIGKILL)
    first.wait()
    n = int(re.search(r"max_time=120s: (\d+) of the", before).group(1))
    again = popen("train.py", *args, "--init_from=resume", cwd=workdir)
    after = read_until(again, "iter 19:")
    again.send_signal(signal.SIGKILL)
    again.wait()
    assert "resuming from out-budget/ckpt.pt at iteration 15" in after and "of the" not in after  # not refitted
    line = re.compile(r"^iter (1[6-9]): loss (\S+), lr (\S+),", re.M)
    assert line.findall(after) == line.findall(before) and len(line.findall(after)) == 4
    assert load_checkpoint(os.path.join(workdir, "out-budget", "ckpt.pt"))["budget"]["iters"] == n


def test_resume_keeps_the_loss_scale_of_fp16(workdir):
    args = ["--data_dir=data/tiny", "--eval_interval=10", *TINY, "--dtype=float16", "--lr_decay_iters=20"]
    full = run("train.py", *args, "--out_dir=out-fp16-full", "--max_iters=20", cwd=workdir).stdout
    run("train.py", *args, "--out_dir=out-fp16-half", "--max_iters=10", cwd=workdir)
    half = run("train.py", *args, "--out_dir=out-fp16-half", "--max_iters=20", "--init_from=resume", cwd=workdir).stdout
    assert all(losses(half)[i] == losses(full)[i] for i in range(11, 21))
    scaler = [load_checkpoint(os.path.join(workdir, d, "ckpt.pt"))["scaler"] for d in ("out-fp16-full", "out-fp16-half")]
    assert scaler[0] == scaler[1] and scaler[0]["_growth_tracker"] == 20  # not restarted from 0 at the resume


def test_ddp_a_dying_process_stops_the_others(workdir):
    args = ["--data_dir=data/tiny", "--out_dir=out-ddp-die", "--eval_interval=1000", *TINY, "--max_iters=100000",
            "--log_interval=10", "--ddp_timeout=30", "--gradient_accumulation_steps=2"]
    # --monitor-interval: torchrun's agent looks at its workers every 5 s, not every 0.1 s, so that the
    # survivor, not the agent's SIGTERM, is what ends the run (under load the agent could win the race)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--monitor-interval=5", os.path.join(ROOT, "train.py"), *args], cwd=workdir,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("iter 20:"):
            break
    workers = subprocess.run(["pgrep", "-f", "-P", str(p.pid), "train.py"], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    try:
        rest = p.communicate(timeout=120)[0]  # ends, rather than hanging
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the surviving DDP process hung after the other died")
    assert p.returncode != 0 and "lost contact with the other processes" in rest


@pytest.fixture(scope="module")
def all_tokenizers(books):
    return [tok.train_bpe(books, 400), tok.gpt2(), tok.train_char(books[:2])]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_any_string_survives_encode_decode(all_tokenizers, text):
    for t in all_tokenizers:
        expected = unicodedata.normalize("NFC", text) if t.nfc else text
        assert t.decode(t.encode(text)) == expected


TRAIN_KEYS = ["batch_size", "learning_rate", "n_embd", "n_head", "dropout", "device", "compile", "init_from",
              "max_time", "beta2", "block_size", "bogus_key", "batchsize"]


TRAIN_DEFAULTS = train_defaults()


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(TRAIN_KEYS) | st.text(max_size=12), value=st.text(max_size=20))
def test_any_key_value_is_a_config_or_a_one_line_error(key, value):
    try:
        config = configure(TRAIN_DEFAULTS, [f"--{key}={value}"])
        plumbing.check_config(config)
    except SystemExit as e:
        msg = str(e)
        assert msg.startswith("error: ") and "\n" not in msg, msg


def test_ddp_two_processes_give_the_single_process_losses(workdir):
    """Same global batch (1 x 8 sequences): 2 processes with 1 micro-step of 4 sequences each (batch_size
    lowered, config/gutenberg_gpu.py on 8 GPUs), or 1 with 1 of 8."""
    args = ["--data_dir=data/tiny", "--eval_interval=1000", *TINY, "--max_iters=20", "--gradient_accumulation_steps=1"]
    single = run("train.py", *args, "--out_dir=out-single", cwd=workdir).stdout
    ddp = torchrun("train.py", *args, "--out_dir=out-ddp2", cwd=workdir)
    assert "note: 2 processes share the global batch of 1 x 8 sequences as 1 micro-step(s) each of 4" in ddp.stdout

    def losses(log: str) -> list[float]:
        return [float(line.split("loss ")[1].split(",")[0]) for line in log.splitlines() if line.startswith("iter ")]

    a, b = losses(single), losses(ddp.stdout)
    assert len(a) == len(b) == 20 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)


def test_ddp_resume_gives_every_process_back_its_own_dropout(workdir):
    """2 processes with dropout: 10 iterations then a resume give the losses of 20 in one go."""
    args = ["--data_dir=data/tiny", "--eval_interval=10", *TINY, "--dropout=0.1", "--lr_decay_iters=20",
            "--gradient_accumulation_steps=2"]

    def ddp(*extra: str) -> str:
        return torchrun("train.py", *args, *extra, cwd=workdir).stdout

    full = losses(ddp("--out_dir=out-ddp-full", "--max_iters=20"))
    ddp("--out_dir=out-ddp-half", "--max_iters=10")
    resumed = losses(ddp("--out_dir=out-ddp-half", "--max_iters=20", "--init_from=resume"))
    assert sorted(resumed) == list(range(11, 21)) and all(resumed[i] == full[i] for i in resumed), (full, resumed)


# --- issue 13: stale or damaged prepared data, Ctrl-C in prepare.py, sample.py's attention map ------------


BLOCKING_PREPARE = """
import runpy, sys, time
sys.path.insert(0, {root!r})
import tokenizer
real, calls = tokenizer.Tokenizer.encode_batch, []

def encode_batch(self, texts, num_threads=8):  # the {block_at}th call waits, long enough to be interrupted
    calls.append(1)
    if len(calls) == {block_at}:
        print("encoding blocked", flush=True)
        time.sleep(300)
    return real(self, texts, num_threads)

tokenizer.Tokenizer.encode_batch = encode_batch
sys.argv = ["prepare.py", *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def interrupt_prepare(cwd: str, args: list[str], block_at: int) -> tuple[int, str]:
    """Runs prepare.py, sends it SIGINT once it is encoding (at its block_at-th batch, held there so
    that the signal cannot come too early or too late); returns (exit code, stderr)."""
    code = BLOCKING_PREPARE.format(root=ROOT, block_at=block_at, args=args, script=os.path.join(ROOT, "prepare.py"))
    p = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in p.stdout:
        if line.startswith("encoding blocked"):
            p.send_signal(signal.SIGINT)
            break
    else:
        p.kill()
        pytest.fail(f"prepare.py never reached its encoding: {p.communicate()[1][-2000:]}")
    return p.wait(timeout=60), p.stderr.read()


def test_ctrl_c_in_prepare_leaves_the_previous_data_or_none(tmp_path, txt_dir):
    args = [f"--dataset={txt_dir}", "--tokenizer=char", "--name=c"]
    rc, err = interrupt_prepare(str(tmp_path), args, block_at=1)  # a first run: nothing to keep
    assert rc == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "interrupted: data/c was not created, nothing half-written is left"
    assert not os.path.exists(tmp_path / "data" / "c")
    run("prepare.py", *args, cwd=str(tmp_path))
    d = tmp_path / "data" / "c"
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}
    # another split: every file would change; interrupted once train.bin is written, before val.bin
    rc, err = interrupt_prepare(str(tmp_path), [*args, "--val_fraction=0.4", "--force"], block_at=2)
    assert rc == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "interrupted: data/c is as it was before this run, nothing half-written is left"
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == before


def test_a_second_prepare_into_the_same_folder_is_refused_while_the_first_writes(tmp_path, txt_dir):
    args = [f"--dataset={txt_dir}", "--tokenizer=char", "--name=c"]
    run("prepare.py", *args, cwd=str(tmp_path))
    d = tmp_path / "data" / "c"
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}
    code = BLOCKING_PREPARE.format(root=ROOT, block_at=2, args=[*args, "--val_fraction=0.4", "--force"],
                                   script=os.path.join(ROOT, "prepare.py"))
    first = subprocess.Popen([sys.executable, "-c", code], cwd=str(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert read_until(first, "encoding blocked")  # its train.bin is in data/c/.incomplete
    staged = sorted(os.listdir(d / ".incomplete"))
    p = run("prepare.py", *args, "--val_fraction=0.5", "--force", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[-1] == ("error: data/c is in use (another prepare.py writes it, or train.py or dpo.py "
                                         "reads it): wait for it to end, or pass another --name")
    assert sorted(os.listdir(d / ".incomplete")) == staged  # the first run's files are untouched
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == before


def test_prepare_never_replaces_data_that_a_run_reads(workdir, txt_dir, tmp_path):
    """prepare.py --force while train.py read the same folder: the run went on with the new token ids
    (or died in get_batch), its checkpoint naming the old tokenizer. A run holds a shared lock on the
    folder (plumbing.hold_data) that prepare.py's exclusive one waits for, in one line."""
    import fcntl

    shutil.copytree(os.path.join(workdir, "data", "tiny"), tmp_path / "data" / "tiny")
    d = tmp_path / "data" / "tiny"
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}
    fd = plumbing.hold_data(str(d))  # as train.py holds it while it trains
    try:
        p = run("prepare.py", f"--dataset={txt_dir}", "--tokenizer=char", "--name=tiny", "--force", cwd=str(tmp_path),
                check=False)
    finally:
        os.close(fd)
    assert p.returncode == 1 and "data/tiny is in use (another prepare.py writes it, or train.py" in p.stderr, p.stderr
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == before
    # and the other way: a run does not start on a folder that prepare.py is writing
    fd = os.open(d, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as prepare.py holds it
    try:
        p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-locked", *TINY, "--max_iters=2", cwd=str(tmp_path),
                check=False)
    finally:
        os.close(fd)
    assert p.returncode == 1 and p.stderr.strip() == "error: prepare.py is writing data/tiny: start again once it " \
        "has ended", p.stderr
    assert not os.path.exists(tmp_path / "out-locked")


def test_load_meta_missing_truncated_or_incomplete_is_one_line(tmp_path, monkeypatch):
    d = tmp_path / "data" / "m"
    with pytest.raises(SystemExit, match=r"^error: no prepared data in .*m: run python prepare.py --dataset=YOUR_TEXT "
                                         r"--name=m first"):
        tok.load_meta(str(d))
    # the command that writes the folder the config names: config/tp_seed.py's is the GPT-2 tokenizer's
    monkeypatch.chdir(tmp_path)
    for name, command in (("gutenberg_gpt2", "python prepare.py --tokenizer=gpt2 first"),
                          ("gutenberg_bpe4096", "python prepare.py --vocab_size=4096 first"),
                          ("gutenberg_char", "python prepare.py --tokenizer=char first")):
        with pytest.raises(SystemExit, match=f"run {command}"):
            tok.load_meta(os.path.join("data", name))  # relative: a folder prepare.py writes by that name
    d.mkdir(parents=True)
    meta = {"vocab_size": 300, "tokenizer": {"kind": "char", "file": tok.TOKENIZER_FILE, "pattern": tok.CHAR_PATTERN,
                                             "nfc": True, "vocab_size": 300},
            **{s: {"documents": 1, "tokens": 10, "bytes": 12, "bytes_per_token": 1.2} for s in ("train", "val")}}
    text = json.dumps(meta)
    (d / "meta.json").write_text(text)
    assert tok.load_meta(str(d)) == meta
    del meta["val"]["tokens"]
    for damaged, why in [(text[:40], r"is unreadable \(.*char 40\)"), (json.dumps(meta), r"is incomplete \(val\.tokens"),
                         ("[]", r"is incomplete \(vocab_size"), ("\xff", "is unreadable")]:
        (d / "meta.json").write_text(damaged, encoding="latin-1")
        with pytest.raises(SystemExit) as e:
            tok.load_meta(str(d))
        assert re.match(rf"error: .*meta\.json {why}.*: rerun python prepare.py --force", str(e.value)), str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value, why", [
    ("tokenizer.pattern", "([", 'has a bad tokenizer.pattern ("([": must be a regular expression'),
    ("tokenizer.pattern", "a*", "has a bad tokenizer.pattern"),  # empty pieces: tiktoken panics
    ("val.bytes_per_token", 0, "has a bad val.bytes_per_token (0: must be a positive number)"),
    ("val.bytes_per_token", 0.0, "has a bad val.bytes_per_token (0.0: must be a positive number)"),
    ("train.tokens", "70942", 'has a bad train.tokens ("70942": must be a positive integer)'),
    ("tokenizer.nfc", 1, "has a bad tokenizer.nfc (1: must be true or false)"),
    ("vocab_size", None, r"is incomplete (vocab_size: missing)"),
    ("tokenizer.kind", "bpe2", "has a bad tokenizer.kind"),
    ("tokenizer.file", "/etc/passwd", "has a bad tokenizer.file"),
])
def test_a_hand_edited_meta_json_is_one_line_naming_the_field(workdir, tmp_path, field, value, why):
    shutil.copytree(os.path.join(workdir, "data", "tiny"), tmp_path / "data" / "e")
    path = tmp_path / "data" / "e" / "meta.json"
    meta = json.loads(path.read_text())
    *parents, key = field.split(".")
    parent = meta
    for k in parents:
        parent = parent[k]
    if value is None:
        del parent[key]
    else:
        parent[key] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        tok.load_meta(str(tmp_path / "data" / "e"))
    assert str(e.value).startswith(f"error: {path} {why}") and "\n" not in str(e.value), str(e.value)
    assert str(e.value).endswith(f"rerun python prepare.py --force with the arguments that prepared {path.parent}")
    if field == "tokenizer.pattern" and value == "([":  # and train.py says so, instead of a traceback
        p = run("train.py", "--data_dir=data/e", "--out_dir=out", *TINY, cwd=str(tmp_path), check=False)
        assert p.returncode == 1 and p.stderr.startswith("error: data/e/meta.json has a bad tokenizer.pattern ")


def test_a_deleted_or_damaged_tokenizer_file_is_one_line(workdir, tmp_path):
    shutil.copytree(os.path.join(workdir, "data", "tiny"), tmp_path / "data" / "tiny")
    d = tmp_path / "data" / "tiny"
    lines = (d / tok.TOKENIZER_FILE).read_text().splitlines()
    os.remove(d / tok.TOKENIZER_FILE)
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out", *TINY, "--max_iters=1", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr == ("error: data/tiny/tokenizer.tiktoken is missing: rerun python prepare.py --force with the "
                        "arguments that prepared data/tiny\n")
    meta = tok.load_meta(str(d))
    for damaged, why in [(lines[:100], "holds 101 tokens where meta.json says 512"),
                         ([*lines[:-1], lines[-1][:5]], "line 511 is not"),
                         ([*lines[:-1], lines[0]], "ranks are not 0 to n-1"), (["\u00e9 1"], "unreadable")]:
        (d / tok.TOKENIZER_FILE).write_text("\n".join(damaged) + "\n")
        with pytest.raises(SystemExit, match=why):
            tok.load(str(d), meta)


def test_a_rebuilt_tokenizer_is_read_again_not_taken_from_a_cache(tmp_path, books, monkeypatch):
    """tiktoken's own loader caches files by their path: a tokenizer rebuilt in the same data/<name>
    would come back as the old one (and train.py would store it in the checkpoint)."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/again")
    for n in (1, 4):
        fields = tok.train_char(books[:n]).save("data/again")
        loaded = tok.load("data/again", {"tokenizer": fields})
        assert loaded.ranks == tok.train_char(books[:n]).ranks and loaded.vocab_size == fields["vocab_size"]


def test_sample_attention_map_to_a_missing_folder_fails_before_the_model(tmp_path):
    # no checkpoint at all: the error about the figure's path comes first
    p = run("sample.py", "--out_dir=nothing", "--attention_map=/no/such/dir/a.png", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and p.stderr == "error: --attention_map=/no/such/dir/a.png: the folder /no/such/dir does not exist\n"
    import sample

    for path, why in [(str(tmp_path), "is a folder"), (f"{tmp_path}/", "is a folder"), ("a.xyz", "matplotlib writes")]:
        with pytest.raises(SystemExit, match=why):
            sample.attention_map_path(path)
    assert sample.attention_map_path("attn") == "attn.png"


def test_sample_attention_map_names_the_file_it_wrote_and_refuses_a_huge_figure(trained):
    p = run("sample.py", "--out_dir=out-tiny", "--device=cpu", "--attention_map=attn", "--start=Il était", cwd=trained)
    assert p.stdout.startswith(f"wrote {os.path.join(trained, 'attn.png')}:") and os.path.exists(os.path.join(trained, "attn.png"))
    # the tiny model's checkpoint with 6 layers of 8 heads (untrained): 48 heatmaps, at most 1024 // 48 = 21 tokens
    ckpt = plumbing.load_checkpoint(os.path.join(trained, "out-tiny", "ckpt.pt"))
    ckpt["model_args"] = {**ckpt["model_args"], "n_layer": 6, "n_head": 8}
    ckpt["model"] = make_model(ckpt["model_args"]).state_dict()
    os.makedirs(os.path.join(trained, "out-heads"), exist_ok=True)
    plumbing.save_checkpoint(ckpt, os.path.join(trained, "out-heads", "ckpt.pt"))
    p = run("sample.py", "--out_dir=out-heads", "--device=cpu", "--attention_map=big.png",
            "--start=" + "Il était une fois un roi et une reine. " * 3, cwd=trained, check=False)
    assert p.returncode == 1 and "use a prompt of at most 21 tokens with this model (this one has 32)" in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(trained, "big.png"))


@pytest.mark.parametrize("script, arg, message", [
    *((script, "--top_k=-3", "top_k must be zero or positive") for script in ("sample.py", "eval.py", "chat.py")),
    *((script, "--temperature=-1", "temperature must be zero or positive") for script in ("sample.py", "chat.py")),
    ("sample.py", "--top_p=0", "top_p must be in (0, 1]"),
    ("sample.py", "--temperature=1e-30", "temperature must be 0 (greedy) or at least 0.001"),  # logits overflow
    ("eval.py", "--batch_size=0", "batch_size must be positive"),
])
def test_sampling_settings_out_of_range_are_one_line(trained, script, arg, message):
    p = run(script, "--out_dir=out-tiny", "--device=cpu", arg, cwd=trained, check=False)
    assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_prompt_of_thousands_of_characters_is_a_prompt(trained):
    start = "« Il était une fois, dit-elle [1, 2] », " * 100  # 4,000 characters, brackets and quotes
    p = run("sample.py", "--out_dir=out-tiny", "--device=cpu", f"--start={start}", "--max_new_tokens=5", cwd=trained)
    assert p.stdout.startswith(start[:100])


def test_overwrite_interrupted_before_its_first_checkpoint_keeps_the_earlier_run_whole(workdir):
    """--overwrite=True, then Ctrl-C before the new run's first checkpoint: the earlier run's model was
    kept, but its metrics.jsonl had been emptied at start-up. The rows go when the model they describe does."""
    args = ["--data_dir=data/tiny", "--out_dir=out-ow", *TINY, "--eval_interval=5"]
    run("train.py", *args, "--max_iters=5", cwd=workdir)
    d = os.path.join(workdir, "out-ow")
    before = {f: open(os.path.join(d, f), "rb").read() for f in ("ckpt.pt", "metrics.jsonl")}
    p = popen("train.py", *args, "--max_iters=5", "--overwrite=True", "--eval_iters=100000", cwd=workdir)
    for line in p.stdout:
        if line.startswith("config: "):  # the last line before the first evaluation, which takes minutes
            time.sleep(1)  # well into it, before the first save (an earlier Ctrl-C passes as well)
            p.send_signal(signal.SIGINT)
            break
    rest = finish(p)
    assert p.returncode == 130 and "no checkpoint was written; out-ow/ckpt.pt and its metrics.jsonl are the " \
        "earlier run's, as they were" in rest, rest
    assert {f: open(os.path.join(d, f), "rb").read() for f in before} == before
    run("train.py", *args, "--max_iters=5", "--overwrite=True", cwd=workdir)  # run whole: only its rows
    assert [r["iter"] for r in plumbing.read_metrics(os.path.join(d, "metrics.jsonl")) if "val_loss" in r] == [0, 5]
