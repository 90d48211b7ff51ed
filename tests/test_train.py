import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run, train_defaults

import tokenizer
from configurator import configure
from plumbing import (
    Budget,
    curve,
    iters_in_budget,
    keep_metrics,
    load_checkpoint,
    plot_curves,
    read_metrics,
    share_batch,
)


def losses(stdout: str) -> dict[int, str]:
    return {int(i): loss for i, loss in re.findall(r"^iter (\d+): loss (\d+\.\d+)", stdout, re.M)}


def test_training_writes_checkpoint_and_curve_and_learns(trained):
    out = os.path.join(trained, "out-tiny")
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] == 60 and ckpt["config"]["max_iters"] == 60
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.5  # evaluated at 0, 30, 60, and it learned
    steps = [r for r in rows if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 61)) and all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in steps)


def test_metrics_of_a_resumed_run_are_appended_without_the_steps_redone(workdir):
    args = ["--data_dir=data/tiny", "--out_dir=out-metrics", "--eval_interval=5", *TINY]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--max_iters=100000"], cwd=workdir,
                         stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("iter 8:"):  # iterations 6 to 8 are logged after the checkpoint at 5
            p.kill()
            break
    p.wait()
    run("train.py", *args, "--max_iters=10", "--init_from=resume", cwd=workdir)
    rows = read_metrics(os.path.join(workdir, "out-metrics", "metrics.jsonl"))
    assert [r["iter"] for r in rows if "loss" in r] == list(range(1, 11))  # 6, 7, 8 once each
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 5, 10]


def test_metrics_lines_that_are_no_json_objects_are_skipped_with_one_warning(trained, tmp_path, capsys):
    path = str(tmp_path / "metrics.jsonl")
    good = [{"iter": 1, "loss": 2.5}, {"iter": 2, "loss": 2.0, "note": "ok"}, {"iter": 3, "loss": 1.5}]
    lines = [json.dumps(good[0]), "[1, 2]", json.dumps(good[1]), "42", '"text"', '{"iter": 3, "lo', "null",
             '{"iter": "x", "loss": "y"}', json.dumps(good[2]), '{"iter": 4, "loss": 1.']  # cut short
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode() + b"\xff\n")  # and a byte that is not UTF-8
    for _ in range(2):
        rows = read_metrics(path)
        assert rows == [*good[:2], {"iter": "x", "loss": "y"}, good[2]]
    out = capsys.readouterr().out
    assert out.count("warning:") == 1, out
    assert "skipped 7 line(s) that are not JSON objects (line 2, 4, 5, 6, 7, ...)" in out
    assert curve(rows, "loss") == ([1, 2, 3], [2.5, 2.0, 1.5])
    plot_curves(str(tmp_path / "loss.png"), {"loss": curve(rows, "loss")}, "iteration", "loss", "t")
    keep_metrics(path, 2)
    assert read_metrics(path) == good[:2]
    # and a resumed train.py goes on, its plot drawn
    out_dir = tmp_path / "out"
    shutil.copytree(os.path.join(trained, "out-tiny"), out_dir)
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
    p = run("train.py", f"--data_dir={trained}/data/tiny", f"--out_dir={out_dir}", "--init_from=resume",
            "--max_iters=61", *TINY, cwd=str(tmp_path))
    assert "skipped 1 line(s) that are not JSON objects" in p.stdout and "Traceback" not in p.stderr
    rows = read_metrics(str(out_dir / "metrics.jsonl"))
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 30, 60, 61]


def test_resumed_run_continues_with_the_same_losses(workdir):
    common = ["--data_dir=data/tiny", "--eval_interval=10", "--lr_decay_iters=20", "--dropout=0.1", *TINY]
    full = run("train.py", "--out_dir=out-full", "--max_iters=20", *common, cwd=workdir)
    run("train.py", "--out_dir=out-half", "--max_iters=10", *common, cwd=workdir)
    resumed = run("train.py", "--out_dir=out-half", "--max_iters=20", "--init_from=resume", *common, cwd=workdir)
    assert "resuming from" in resumed.stdout
    a, b = losses(full.stdout), losses(resumed.stdout)
    assert sorted(b) == list(range(11, 21))
    assert all(a[i] == b[i] for i in b), (a, b)


def test_the_default_recipe_trains_and_resumes_with_the_same_losses(workdir):
    """config/gutenberg.py's recipe (Muon + AdamW, an untied token table at its own learning rate),
    scaled down, in bf16 autocast as on a CPU with bf16 units (on others bf16 is emulated: slow, but
    exact all the same): the learning-rate scale of the table survives the checkpoint. The resume leaves
    the config's optimizer=auto, which takes the checkpoint's Muon (on a CPU without bf16 units auto
    means AdamW, whose moments the checkpoint has not); another optimizer named is refused."""
    config = os.path.join(ROOT, "config", "gutenberg.py")  # first: what follows overrides it
    common = ["--data_dir=data/tiny", "--eval_interval=6", "--max_time=0", *TINY, "--d_ff=64", "--dtype=bfloat16"]
    full = run("train.py", config, "--out_dir=out-recipe-full", "--max_iters=12", "--optimizer=muon", *common,
               cwd=workdir)
    run("train.py", config, "--out_dir=out-recipe-half", "--max_iters=6", "--optimizer=muon", *common,
        cwd=workdir)
    p = run("train.py", config, "--out_dir=out-recipe-half", "--max_iters=12", "--init_from=resume",
            "--optimizer=adamw", *common, cwd=workdir, check=False)
    assert p.returncode == 1 and "was trained with --optimizer=muon" in p.stderr, p.stderr
    resumed = run("train.py", config, "--out_dir=out-recipe-half", "--max_iters=12", "--init_from=resume", *common,
                  cwd=workdir)
    a, b = losses(full.stdout), losses(resumed.stdout)
    assert sorted(b) == list(range(7, 13)) and all(a[i] == b[i] for i in b), (a, b)
    # without the config file, nor --optimizer, the checkpoint's Muon goes on (adamw is only the default)
    p = run("train.py", "--out_dir=out-recipe-half", "--max_iters=13", "--init_from=resume", *common[:-1],
            cwd=workdir)
    assert "optimizer muon" in p.stdout and "iter 13:" in p.stdout, p.stdout
    p = run("train.py", config, "--out_dir=out-recipe-half", "--max_iters=14", "--init_from=resume", *common,
            "--embedding_lr=0", cwd=workdir, check=False)  # would make the token table one group with the rest
    assert p.returncode == 1 and "keeps the checkpoint's optimizer groups, but you set embedding_lr=0.0" in p.stderr
    ckpt = load_checkpoint(os.path.join(workdir, "out-recipe-half", "ckpt.pt"))
    assert ckpt["config"]["optimizer"] == "muon" and not ckpt["model_args"]["tie_embeddings"]
    scales = [g.get("lr_scale") for o in ckpt["optimizer"]["optimizers"] for g in o["param_groups"]]
    assert scales.count(None) == len(scales) - 1 and 2e-2 / 3e-3 in scales  # TINY's learning rate is 3e-3


def test_config_errors_come_before_reading_data(tmp_path):
    p = run("train.py", "--n_embd=30", "--n_head=4", "--data_dir=nowhere", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "divisible" in p.stderr and "Traceback" not in p.stderr
    p = run("train.py", "--batch_sise=4", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "did you mean batch_size" in p.stderr
    p = run("train.py", "--batch_size=0", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "batch_size must be positive" in p.stderr
    p = run("train.py", os.path.join(ROOT, "config", "gutenberg.py"), "--data_dir=nowhere", cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "python prepare.py" in p.stderr and "Traceback" not in p.stderr


def test_run_from_another_folder_says_where_it_looked_for_the_data(tmp_path, monkeypatch):
    p = run("train.py", os.path.join(ROOT, "config", "gutenberg.py"), cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"error: no prepared data in data/gutenberg_bpe8192 (looked in {tmp_path}/"
                               "data/gutenberg_bpe8192: data_dir is relative to the working directory "
                               f"{tmp_path})")
    # prepared beside the scripts, run from elsewhere: where it is
    project = tmp_path / "project"
    os.makedirs(project / "data" / "mine")
    (project / "data" / "mine" / "meta.json").write_text("{}")
    monkeypatch.setattr(tokenizer, "__file__", str(project / "tokenizer.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        tokenizer.load_meta("data/mine")
    assert str(e.value).endswith(f"relative to the working directory {tmp_path}): run from {project}, or "
                                 f"pass --data_dir={project}/data/mine")


def test_a_block_size_the_data_cannot_fill_or_a_micro_batch_memory_cannot_hold_is_one_line(workdir):
    gutenberg = os.path.join(ROOT, "config", "gutenberg.py")
    p = run("train.py", gutenberg, "--data_dir=data/tiny", "--out_dir=out-big", "--block_size=100000", cwd=workdir,
            check=False)
    assert p.returncode == 1 and p.stderr == ("error: data/tiny/train.bin holds 70,942 tokens, too few for a window "
                                              "of block_size=100000 (+1): lower --block_size or prepare more text\n")
    # it fits the data, not the memory: at least 4 bytes x 10**12 x 32 tokens x (2 x 512 + 4 x 2 x 32) numbers
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-big", *TINY, "--batch_size=1000000000000",
            cwd=workdir, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: a micro-batch of batch_size=1000000000000 x block_size=32 tokens needs at "
                               "least 152,587,890.6 GiB for its activations, more than the "), p.stderr
    assert "memory: lower --batch_size (raise --gradient_accumulation_steps" in p.stderr
    assert not os.path.exists(os.path.join(workdir, "out-big", "ckpt.pt"))


def test_resume_without_checkpoint_is_a_clear_error(workdir):
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-none", "--init_from=resume", *TINY, cwd=workdir,
            check=False)
    assert p.returncode == 1 and "no checkpoint at out-none/ckpt.pt" in p.stderr


def get_lr(it: int, peak: float, warmup: int, end: int, floor: float) -> float:
    """The schedule train.py's get_lr promises, written out again: linear warmup over warmup
    iterations, then a cosine from peak down to floor at iteration end."""
    if it < warmup:
        return peak * (it + 1) / (warmup + 1)
    return floor if it >= end else floor + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (end - warmup))) * (peak - floor)


def test_lr_schedule_warmup_then_cosine_to_min(trained):
    """The trained fixture's 60 iterations (warmup 5, peak 3e-3, min_lr its default, a tenth): each
    logged row holds the learning rate of the iteration before it."""
    rows = read_metrics(os.path.join(trained, "out-tiny", "metrics.jsonl"))
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert [r["iter"] for r in rows if "lr" in r] == list(range(1, 61))
    assert lrs[0] < lrs[2] < lrs[4] < 3e-3  # warmup
    assert all(x >= y for x, y in itertools.pairwise(lrs[5:]))  # then the cosine only goes down
    assert lrs == pytest.approx([get_lr(i, 3e-3, 5, 60, 3e-4) for i in range(60)], rel=1e-9)
    assert 3e-4 < lrs[-1] < 3.05e-4  # the last iteration's rate, near the tenth it decays to


def lrs(stdout: str) -> dict[int, str]:
    return {int(i): lr for i, lr in re.findall(r"^iter (\d+): .*lr ([\d.e+-]+),", stdout, re.M)}


def test_iters_in_budget_counts_the_speed_and_the_evaluations_to_come():
    # 10 iterations in 1 s after the first: 0.1 s each, plus an evaluation worth 10 of them (1 s) every 50
    n = iters_in_budget(11, 1.1, (1, 0.1), 100.0, 50, 10.0)
    assert n == 11 + int(0.98 * (100 - 1.1 - 1.0) / 0.12)
    # iterations 51-200 at 0.2 s, with the evaluation at 150 (worth 10 iterations: 2 s) among them
    n = iters_in_budget(200, 10.0 + 150 * 0.2 + 2.0, (50, 10.0), 100.0, 150, 10.0)
    assert n == 200 + int(0.98 * (100 - 42.0 - 2.0) / (0.2 + 2.0 / 150))


def test_budget_counts_again_what_fits_as_the_machine_changes_speed():
    """Counted at fit_at from a slow start (1 s an iteration), counted again every 33 iterations from
    the speed since fit_at: 0.5 s, then slower again: the run plans what fits now."""
    lines = []
    budget = Budget(100.0, 10**6, 10**6, 0.0, time_from=1, fit_at=11, refit_every=33, log=lines.append)
    clock = {i: 1.0 * i if i <= 11 else 11 + 0.5 * (i - 11) if i <= 44 else 27.5 + 1.5 * (i - 44) for i in range(1, 80)}
    for i in range(1, 44):
        budget.tick(i, clock[i])
    assert budget.last == 11 + int(0.98 * (100 - 11) / 1.0)  # 98, at 1 s each
    budget.tick(44, clock[44])
    assert budget.last == 44 + int(0.98 * (100 - 27.5) / 0.5)  # 186: the 33 iterations since ran at 0.5 s
    assert budget.fitted == {"max_time": 100.0, "iters": budget.last}  # what the checkpoint keeps
    assert "counted again at iteration 44, at the speed since iteration 11: 186 iterations fit" in lines[1]
    for i in range(45, 78):
        budget.tick(i, clock[i])
    assert budget.last == 77 + int(0.98 * (100 - clock[77]) / ((clock[77] - 11) / 66))  # 1 s a step since 11
    # a run resumed at 30 keeps the checkpoint's count, and counts again from its own start
    resumed = Budget(100.0, 10**6, 10**6, 0.0, time_from=31, fit_at=41, refit_every=3,
                     saved={"max_time": 100.0, "iters": 98}, log=print)
    for i in range(31, 44):
        resumed.tick(i, clock[i])
    assert resumed.last == 98
    resumed.tick(44, clock[44])
    assert resumed.last == 44 + int(0.98 * (100 - 27.5) / ((27.5 - clock[31]) / 13))


def test_a_run_under_max_time_fits_its_iterations_and_ends_its_schedule(workdir):
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-clock", "--max_iters=1000000", "--max_time=15",
            "--eval_interval=1000000", *TINY, "--warmup_iters=20", cwd=workdir)
    n = int(re.search(r"max_time=15s: (\d+) of the max_iters=1000000 iterations fit", p.stdout).group(1))
    # counted at the warmup's end, from the speed of its second half (the first iterations run slower)
    assert re.search(r"^iter 19: .*\nmax_time=15s: ", p.stdout, re.M), p.stdout  # logged in iteration 20
    # counted again every 60 iterations (3 x 20), from the speed since 20: logged where the count changed
    counts = {20: n} | {int(k): int(m) for k, m in re.findall(
        r"counted again at iteration (\d+), at the speed since iteration 20: (\d+) iterations", p.stdout)}
    assert all(k % 60 == 20 for k in counts)
    ckpt = load_checkpoint(os.path.join(workdir, "out-clock", "ckpt.pt"))
    assert ckpt["budget"] == {"max_time": 15.0, "iters": counts[max(counts)]} and ckpt["elapsed"] > 0
    # the schedule runs by iterations, its cosine ending at the last count made before each one (not at max_iters)
    def end(i: int) -> int:
        return counts[max((k for k in counts if k < i), default=20)]  # the warmup's rates do not depend on it
    assert all(lr == f"{get_lr(i - 1, 3e-3, 20, end(i), 3e-4):.2e}" for i, lr in lrs(p.stdout).items())
    if "max_time=15s reached" not in p.stdout:  # (unless the machine slowed down: max_time is a safety net)
        assert ckpt["iter_num"] == counts[max(counts)] and max(lrs(p.stdout)) == ckpt["iter_num"]


def test_resume_keeps_a_trained_models_settings(workdir):
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-tiny-keep", "--max_iters=2", *TINY, cwd=workdir)
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-tiny-keep", "--max_iters=4", "--init_from=resume",
            *TINY, "--n_layer=3", "--n_embd=64", cwd=workdir, check=False)
    assert p.returncode == 1 and "n_layer=3 (checkpoint: 2), n_embd=64 (checkpoint: 32)" in p.stderr
    # keys left at their defaults take the checkpoint's values, and the log and saved config say so
    no_model_keys = [a for a in TINY if not a.startswith(("--n_layer", "--n_head", "--n_embd", "--block_size"))]
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-tiny-keep", "--max_iters=4", "--init_from=resume",
            *no_model_keys, cwd=workdir)
    assert '"n_layer": 2, "n_head": 2, "n_embd": 32' in p.stdout
    assert load_checkpoint(os.path.join(workdir, "out-tiny-keep", "ckpt.pt"))["config"]["n_embd"] == 32
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-tiny-keep", "--max_iters=4", "--init_from=resume",
            *TINY, cwd=workdir, check=False)  # at max_iters already: nothing to do, not one more step
    assert p.returncode == 1 and "its run has ended" in p.stderr and "iter 5" not in p.stdout


def test_checkpoint_is_weights_only(trained, tmp_path):
    ckpt = torch.load(os.path.join(trained, "out-tiny", "ckpt.pt"), weights_only=True)
    assert isinstance(ckpt["tokenizer"]["ranks"], str)


def test_damaged_data_is_a_clear_error(workdir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(os.path.join(workdir, "data", "tiny"), d)
    size = os.path.getsize(d / "train.bin")
    with open(d / "train.bin", "r+b") as f:
        f.truncate(size - 1)  # an odd byte length: not uint16 tokens
    p = run("train.py", f"--data_dir={d}", "--out_dir=o", *TINY, cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "damaged" in p.stderr and "Traceback" not in p.stderr
    np.full(size // 2, 60000, dtype=np.uint16).tofile(d / "train.bin")  # ids beyond the 512-token vocabulary
    p = run("train.py", f"--data_dir={d}", "--out_dir=o", *TINY, cwd=str(tmp_path), check=False)
    assert p.returncode == 1 and "beyond the vocabulary" in p.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workdir):
    args = ["--data_dir=data/tiny", "--out_dir=out-nan", "--eval_interval=5", *TINY]
    run("train.py", "--max_iters=5", *args, cwd=workdir)
    ckpt = os.path.join(workdir, "out-nan", "ckpt.pt")
    good = open(ckpt, "rb").read()
    p = run("train.py", *args, "--max_iters=30", "--init_from=resume", "--learning_rate=1e30", "--grad_clip=0",
            cwd=workdir, check=False)  # later arguments win: the huge learning rate blows the weights up
    assert p.returncode == 1 and re.search(r"is (nan|inf) at iteration \d+", p.stderr), p.stderr
    assert open(ckpt, "rb").read() == good


def test_an_untied_embedding_gets_its_own_learning_rate_and_no_flops():
    """--tie_embeddings=False --embedding_lr=X: the token table (a lookup) trains at X without weight
    decay, every other group follows the schedule; the FLOP count (MFU) is the tied model's."""
    from model import make_model
    from plumbing import configure_optimizer

    args = {"arch": "llama", "vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_kv_head": 1,
            "n_embd": 32, "moe_every": 0}
    tied, untied = make_model(args), make_model({**args, "tie_embeddings": False})
    assert untied.flops_per_token() == tied.flops_per_token()
    assert untied.num_params() == tied.num_params() + 64 * 32
    for optimizer in ("adamw", "muon"):
        opt = configure_optimizer(untied, 0.1, 1e-3, (0.9, 0.95), "cpu", optimizer, embedding_lr=2e-2)
        wte = [g for g in opt.param_groups if any(p is untied.transformer.wte.weight for p in g["params"])]
        assert len(wte) == 1 and len(wte[0]["params"]) == 1
        assert wte[0]["lr_scale"] == pytest.approx(20.0) and wte[0]["weight_decay"] == 0.0
        assert all("lr_scale" not in g for g in opt.param_groups if g is not wte[0])
    opt = configure_optimizer(tied, 0.1, 1e-3, (0.9, 0.95), "cpu", "adamw", embedding_lr=2e-2)
    assert all("lr_scale" not in g for g in opt.param_groups)  # tied: the table is the output layer


def test_auto_takes_bf16_and_muon_only_where_the_device_computes_bf16_fast(monkeypatch):
    """dtype=auto and optimizer=auto (config/gutenberg.py's): bf16 autocast and Muon (which
    orthogonalises in bf16) where bf16 matmuls are fast, float32 and AdamW on CPUs that emulate bf16."""
    import plumbing

    for fast, dtype, optimizer in ((False, torch.float32, "adamw"), (True, torch.bfloat16, "muon")):
        monkeypatch.setattr(plumbing, "fast_bf16", lambda device, fast=fast: fast)
        assert plumbing.setup_runtime("cpu", "auto").ptdtype == dtype
        assert plumbing.resolve_optimizer("auto", "cpu") == optimizer
        assert plumbing.resolve_optimizer("adamw", "cpu") == "adamw"
        assert plumbing.setup_runtime("cpu", "float32").ptdtype == torch.float32  # a dtype named is kept


@pytest.mark.parametrize("fast", [False, True])
def test_the_default_config_runs_either_kind_of_cpu(workdir, fast):
    """train.py with config/gutenberg.py's dtype=auto and optimizer=auto, on a CPU faked to have bf16
    units or not: each branch of auto trains and says what it chose, whatever CPU runs the suite."""
    config = os.path.join(ROOT, "config", "gutenberg.py")
    argv = [config, "--data_dir=data/tiny", f"--out_dir=out-auto-{fast}", "--max_iters=2", "--eval_interval=2",
            "--max_time=0", *TINY, "--d_ff=64", "--dtype=auto"]
    fake = (f"import sys, runpy; sys.path.insert(0, {ROOT!r}); import plumbing\n"
            f"plumbing.fast_bf16 = lambda device: {fast}\n"
            # and its matmul peak on small products: a CPU without bf16 units would emulate the 2048 x 2048
            # bf16 ones of a CPU with them for seconds, at start-up and at every evaluation
            "plumbing.peak_matmul_size = lambda device, dtype: 256\n"
            f"sys.argv = ['train.py', *{argv!r}]\n"
            f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-c", fake], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    chosen = "torch.bfloat16, optimizer muon" if fast else "torch.float32, optimizer adamw"
    assert chosen in p.stdout and "iter 2:" in p.stdout, p.stdout
    # the resolved run in the log: the untied table at its own rate (2e-2), Muon's matrices where it runs
    groups = re.search(r"^output layer: untied from the token table; parameter groups: (.*)$", p.stdout, re.M)
    assert groups and "at lr 2e-02 (peak), weight decay 0.0" in groups[1], p.stdout
    assert ("Muon " in groups[1]) == fast, groups[1]
    ckpt = load_checkpoint(os.path.join(workdir, f"out-auto-{fast}", "ckpt.pt"))
    assert ckpt["config"]["optimizer"] == ("muon" if fast else "adamw")


def test_fast_bf16_measures_what_the_cpu_has():
    """auto's choice on the machine the suite runs on: a CPU with AMX computes bf16 matmuls several
    times faster than float32; one without AVX512-BF16 or AMX emulates bf16, far slower. (A CPU with
    AVX512-BF16 alone is near the 1.5x line, and is not asserted.)"""
    import plumbing

    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    if not flags:
        pytest.skip("no x86 CPU flags in /proc/cpuinfo")
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):  # e.g. AVX2: oneDNN leaves the bf16 units unused, whatever the flags
        pytest.skip("ONEDNN_MAX_CPU_ISA caps the instructions bf16 matmuls use")
    plumbing.fast_bf16.cache_clear()
    if "amx_bf16" in flags:
        assert plumbing.fast_bf16("cpu") and plumbing.resolve_dtype("auto", "cpu") == "bfloat16"
    elif "avx512_bf16" not in flags:
        assert not plumbing.fast_bf16("cpu") and plumbing.resolve_dtype("auto", "cpu") == "float32"
    else:
        pytest.skip("AVX512-BF16 without AMX: bf16 measures near float32's 1.5x line")


def test_resume_refuses_a_model_key_given_with_its_default_value(trained, tmp_path):
    """--n_layer=6 --n_embd=384 --n_head=6 are train.py's defaults, but typed (or set in a config file)
    they ask for that model: resuming the checkpoint of 2 x 32 is refused, not done silently."""
    out = str(tmp_path / "out")
    shutil.copytree(os.path.join(trained, "out-tiny"), out)
    args = ["--data_dir=data/tiny", f"--out_dir={out}", "--init_from=resume", "--max_iters=61", *TINY]
    p = run("train.py", *args, "--n_layer=6", "--n_embd=384", "--n_head=6", cwd=trained, check=False)
    assert p.returncode == 1 and "n_layer=6 (checkpoint: 2), n_head=6 (checkpoint: 2), n_embd=384 (checkpoint: 32)" \
        in p.stderr, p.stderr
    cfg = tmp_path / "big.py"
    cfg.write_text("n_layer = 6\n")
    no_layers = [a for a in args if not a.startswith("--n_layer")]
    p = run("train.py", str(cfg), *no_layers, cwd=trained, check=False)
    assert p.returncode == 1 and "n_layer=6 (checkpoint: 2)" in p.stderr, p.stderr
    # the same model typed resolved (d_ff=0 is 4 x n_embd = 128) resumes
    p = run("train.py", *args, "--d_ff=0", cwd=trained)
    assert "resuming from" in p.stdout and load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 61


def test_a_checkpoint_saved_before_a_model_field_existed_resumes_and_samples(trained, tmp_path):
    """A checkpoint whose model_args lack a field (saved before d_ff was added) takes the field's
    default on load (4 x n_embd, the model it has): it resumes and samples, and another d_ff typed is
    still refused."""
    out = tmp_path / "out-old"
    shutil.copytree(os.path.join(trained, "out-tiny"), out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["model_args"]["d_ff"]
    torch.save(ckpt, out / "ckpt.pt")
    args = ["--data_dir=data/tiny", f"--out_dir={out}", "--init_from=resume", "--max_iters=61", *TINY]
    p = run("train.py", *args, "--d_ff=64", cwd=trained, check=False)
    assert p.returncode == 1 and "d_ff=64 (checkpoint: 128)" in p.stderr, p.stderr
    run("train.py", *args, cwd=trained)
    assert load_checkpoint(str(out / "ckpt.pt"))["model_args"]["d_ff"] == 128  # saved with it from now on
    torch.save(ckpt, out / "ckpt.pt")  # the old checkpoint again, for sample.py
    p = run("sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--device=cpu", cwd=trained)
    assert p.stdout.strip()


def test_ddp_processes_share_the_configs_global_batch():
    """config/gutenberg_gpu.py's global batch (4 x 16 sequences) is kept with 1, 2, 4 or 8 processes;
    where it cannot be split evenly, one line says what to pass."""
    c = configure(train_defaults(), [os.path.join(ROOT, "config", "gutenberg_gpu.py")])
    shares = {w: share_batch(c["batch_size"], c["gradient_accumulation_steps"], w) for w in (1, 2, 4, 8)}
    assert shares == {1: (4, 16), 2: (2, 16), 4: (1, 16), 8: (1, 8)}
    assert share_batch(12, 5, 4) == (3, 5)  # 2 micro-steps of 7.5 sequences would not do: 3 of 5
    with pytest.raises(SystemExit, match=r"^error: the global batch of 64 sequences .* cannot be split evenly "
                                         r"among 3 processes: make it a multiple of 3, e.g. --batch_size=15$"):
        share_batch(16, 4, 3)


def test_freed_memory_stays_with_the_process_on_linux():
    """train.py on a CPU keeps freed memory in the process (glibc's mallopt), which spares a training step
    the kernel's page faults on its large tensors; elsewhere it says it did not apply."""
    import platform

    from plumbing import keep_freed_memory

    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc


def test_eval_only_evaluates_the_trained_model_and_writes_nothing(trained):
    ckpt = os.path.join(trained, "out-tiny", "ckpt.pt")
    before = open(ckpt, "rb").read()
    args = ["--data_dir=data/tiny", "--out_dir=out-tiny", "--eval_interval=30", *TINY, "--eval_only=True"]
    resumed = run("train.py", *args, "--init_from=resume", cwd=trained).stdout
    fresh = run("train.py", *args, cwd=trained).stdout
    assert "note: eval_only evaluates a new, untrained model" in fresh and "note: eval_only" not in resumed
    val = [float(re.search(r"val loss ([\d.]+)", out)[1]) for out in (resumed, fresh)]
    assert val[0] < val[1]  # 60 iterations of training against none
    assert open(ckpt, "rb").read() == before
