"""Shared fixtures: a slice of the French novels, prepared once, and a tiny model trained once.
Scripts run as real subprocesses, from a temporary folder, exactly as a user runs them."""

import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))  # the offline corpus and GPT-2 ranks
CORPUS = os.path.join(SHARED, "french_gutenberg", "data", "train-00000-of-00001.parquet")
GPT2_RANKS = os.path.join(SHARED, "tokenizers", "gpt2.tiktoken")
sys.path.insert(0, ROOT)

# a suite started in the background by a script (cmd &) inherits SIGINT ignored, and the scripts it runs
# would too: with a handler here, they start with the default one, which the Ctrl-C tests need
signal.signal(signal.SIGINT, signal.default_int_handler)

# a tiny model: trains in seconds on a CPU, big enough to learn something. float32 whatever the CPU
# (dtype=auto picks bf16 where it has bf16 units), so that every test sees the same numbers on both kinds
TINY = ["--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=5", "--learning_rate=3e-3", "--device=cpu", "--compile=False"]


def run(script: str, *args: str, cwd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs one of the project's scripts with its arguments; returns the finished process."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"})
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def torchrun(script: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    """Runs one of the project's scripts under torchrun, in 2 processes; returns the finished run."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    # every process ended cleanly; else the whole stderr: a process's own error comes before torchrun's summary
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr}"
    return p


def finish(p: subprocess.Popen, timeout: float = 60) -> str:
    """The rest of a running script's output, once it exits. One still running after timeout (a Ctrl-C
    it missed) is killed, not left to slow the rest of the suite, and the test fails saying so."""
    try:
        return p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"still running {timeout:.0f} s after the Ctrl-C, killed:\n{p.communicate()[0][-2000:]}") \
            from None


def train_defaults() -> dict:
    """train.py's defaults: the block between its first two '# ----' lines, run with model.model_settings."""
    source = open(os.path.join(ROOT, "train.py")).read().split("# " + "-" * 77 + "\n")[1]
    from model import model_settings

    namespace: dict = {"model_settings": model_settings}  # the model's settings come from model.py
    exec(source, namespace)
    return namespace


# `pytest -m fast`: the tests that need neither the corpus nor a trained model (seconds, not minutes)
DATA_FIXTURES = {"books", "txt_dir", "workdir", "trained", "llama_trained", "gpt2_ranks"}


def pytest_collection_modifyitems(items):
    for item in items:
        if not DATA_FIXTURES & set(item.fixturenames) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def gpt2_ranks() -> str:
    if not os.path.exists(GPT2_RANKS):
        pytest.skip(f"{GPT2_RANKS} is absent: the GPT-2 tokenizer tests need ../shared beside the project")
    return GPT2_RANKS


@pytest.fixture(scope="session")
def books() -> list[str]:
    """Six real documents: 30,000 characters from each of six novels."""
    if not os.path.exists(CORPUS):
        pytest.skip(f"{CORPUS} is absent: the corpus tests need ../shared beside the project")
    table = pq.read_table(CORPUS, columns=["content"])
    return [t[:30_000] for t in table.column("content").to_pylist()[:6]]


@pytest.fixture(scope="session")
def txt_dir(tmp_path_factory, books) -> str:
    d = tmp_path_factory.mktemp("txt")
    for i, b in enumerate(books):
        (d / f"book{i}.txt").write_text(b, encoding="utf-8")
    return str(d)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, txt_dir) -> str:
    """A folder holding data/tiny (a BPE of 512 tokens on the six books), where scripts run."""
    d = str(tmp_path_factory.mktemp("work"))
    run("prepare.py", f"--dataset={txt_dir}", "--vocab_size=512", "--name=tiny", "--val_fraction=0.2", cwd=d)
    return d


@pytest.fixture(scope="session")
def trained(workdir) -> str:
    """out-tiny/ckpt.pt: a tiny model trained for 60 iterations on data/tiny."""
    run("train.py", "--data_dir=data/tiny", "--out_dir=out-tiny", "--max_iters=60", "--eval_interval=30", *TINY,
        cwd=workdir)
    return workdir


LLAMA = ["--arch=llama", "--n_kv_head=1", "--n_expert=3", "--n_expert_per_token=2", "--moe_every=2",
         "--no_rope_interval=2", "--d_expert=48"]


@pytest.fixture(scope="session")
def llama_trained(trained) -> str:
    """out-llama-tiny: a tiny Llama-MoE trained by train.py on data/tiny, beside out-tiny."""
    p = run("train.py", "--data_dir=data/tiny", "--out_dir=out-llama-tiny", "--max_iters=30", "--eval_interval=15",
            *TINY, *LLAMA, cwd=trained)
    assert "tokens per expert (%)" in p.stdout
    return trained
