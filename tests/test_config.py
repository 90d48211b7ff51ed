import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, run, train_defaults

import sweep
from configurator import configure, resolve
from model import make_model, model_args_from
from plumbing import check_config

DEFAULTS = {"batch_size": 16, "learning_rate": 1e-3, "device": "auto", "compile": None, "bias": False,
            "_private": 1, "np": pytest, "GENERATE_BATCH": 32}  # a constant, no setting


def test_defaults_file_then_command_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nbatch_size = 8\nlearning_rate = 3e-4\n")
    out = configure(DEFAULTS, [str(cfg), "--batch_size=4", "--device=cuda", "--bias", "--compile=True"])
    assert out == {"batch_size": 4, "learning_rate": 3e-4, "device": "cuda", "compile": True, "bias": True}


def test_int_is_accepted_for_float_and_bool_spellings():
    assert configure(DEFAULTS, ["--learning_rate=1"])["learning_rate"] == 1.0
    assert configure(DEFAULTS, ["--bias=false"])["bias"] is False


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown config key 'batchsize'.*did you mean batch_size"):
        configure(DEFAULTS, ["--batchsize=3"])
    cfg = tmp_path / "c.py"
    cfg.write_text("learning_rat = 1e-3\n")
    with pytest.raises(SystemExit, match=r"learning_rat.*in .*c\.py.*learning_rate"):
        configure(DEFAULTS, [str(cfg)])


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "'--device cuda': a setting takes '=': --device=cuda"),  # the value was run as a file
    (["--learning_rate", "books/notes.txt"], "a setting takes '=': --learning_rate=books/notes.txt"),
    (["batch_size=8"], "'batch_size=8' is neither a setting nor a config file: did you mean --batch_size=8?"),
    (["Il était une fois"], "neither a setting nor a config file: did you mean --key=value, or a config file"),
])
def test_a_word_that_is_no_setting_is_never_run_as_a_config_file(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        configure(DEFAULTS, argv)


@pytest.mark.parametrize("arg", ["--batch_size=8.5", "--batch_size=abc", "--learning_rate=fast", "--bias=maybe",
                                 "--batch_size"])
def test_wrong_types_are_one_line_errors(arg):
    with pytest.raises(SystemExit, match="error: ") as e:
        configure(DEFAULTS, [arg])
    assert "\n" not in str(e.value)


def test_config_file_errors_name_the_file(tmp_path):
    cfg = tmp_path / "broken.py"
    cfg.write_text("batch_size = 8\nlearning_rate = 1 / 0\n")
    with pytest.raises(SystemExit, match=r"broken\.py, line 2: ZeroDivisionError"):
        configure(DEFAULTS, [str(cfg)])
    with pytest.raises(SystemExit, match="cannot read config file"):
        configure(DEFAULTS, [str(tmp_path / "missing.py")])


def test_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--batch_size=16" in out and "GENERATE_BATCH" not in out and "_private" not in out


def test_a_config_builds_on_the_one_beside_it(tmp_path):
    (tmp_path / "base.py").write_text("batch_size = 8\nlearning_rate = 3e-4\n")
    (tmp_path / "child.py").write_text("import os\nexec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\n"
                                       "batch_size = 2\n")
    config = configure(DEFAULTS, [str(tmp_path / "child.py")])
    assert config["learning_rate"] == 3e-4 and config["batch_size"] == 2  # the base's settings, then the child's


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "config"))))
def test_every_shipped_config_resolves_for_its_script(name):
    script = "dpo.py" if name.startswith("dpo") else "train.py"
    p = run(script, os.path.join(ROOT, "config", name), "--help", cwd=ROOT)
    assert "--batch_size=" in p.stdout


@pytest.mark.parametrize("raw, value", [("false", False), ("False", False), ("0", False), ("true", True),
                                        ("1", True), ("None", None), ("auto", None)])
def test_switches_take_true_false_or_none(raw, value):
    assert configure(DEFAULTS, [f"--compile={raw}"])["compile"] is value
    if value is not None:
        assert configure(DEFAULTS, [f"--bias={raw}"])["bias"] is value


@pytest.mark.parametrize("arg", ["--compile=no", "--compile=yes", "--compile=fast", "--bias=no", "--bias=None"])
def test_anything_else_for_a_switch_is_an_error(arg):
    with pytest.raises(SystemExit, match=r"error: (compile|bias) takes true or false"):
        configure(DEFAULTS, [arg])


def test_strings_are_taken_as_typed_whatever_their_length():
    long = "« Il était une fois, " * 400  # 8,000 characters, quotes and brackets included
    assert configure(DEFAULTS, [f"--device={long}"])["device"] == long
    assert configure(DEFAULTS, ["--device=[1, 2]"])["device"] == "[1, 2]"
    with pytest.raises(SystemExit, match="batch_size must be an int") as e:
        configure(DEFAULTS, ["--batch_size=" + "(" * 5000])
    assert len(str(e.value)) < 200


def test_sweep_gives_every_run_the_flops_of_the_reference_at_fixed_compute():
    """sweep.py's iterations per run, written by hand, are those of 1,400 iterations of 4 x 256."""
    defaults = train_defaults()

    def flops_per_iter(overrides: list[str]) -> float:
        if overrides[:1] and overrides[0].endswith(".py"):  # a run of its own config file (config/gpt.py)
            overrides = [os.path.join(ROOT, overrides[0]), *overrides[1:]]
        else:
            overrides = [os.path.join(ROOT, "config", "gutenberg.py"), *overrides]
        c = configure(defaults, overrides)
        vocab_size = int(re.search(r"(\d+)$", c["data_dir"])[1])  # data/gutenberg_bpe4096: 4,096 tokens
        model = make_model(model_args_from({**c, "vocab_size": vocab_size}))
        return model.flops_per_token() * c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]

    reference = 1400 * flops_per_iter(["--n_layer=4"])
    for name, (overrides, iters) in sweep.RUNS.items():
        assert iters * flops_per_iter(overrides) == pytest.approx(reference, rel=1e-3), name


def test_flags_win_over_config_files_whatever_the_order_typed(workdir, tmp_path):
    """A flag typed before the config file still wins: the file never overrides it, out_dir included."""
    c = configure(train_defaults(), ["--batch_size=4", "--block_size=32", "--out_dir=x",
                                     os.path.join(ROOT, "config", "gutenberg.py")])
    assert (c["batch_size"], c["block_size"], c["out_dir"]) == (4, 32, "x")
    cfg = tmp_path / "my_config.py"
    cfg.write_text('out_dir = "out-main"\ndata_dir = "data/tiny"\n')
    run("train.py", "--out_dir=out-experiment", "--overwrite=True", "--max_iters=1", *TINY, str(cfg), cwd=workdir)
    assert os.path.exists(os.path.join(workdir, "out-experiment", "ckpt.pt"))
    assert not os.path.exists(os.path.join(workdir, "out-main"))


@pytest.mark.parametrize("text, message", [
    ("batch_sise = [8]\n", r"unknown config key 'batch_sise' \(in .*c\.py\); did you mean batch_size"),
    ("warmup_iters = [5]\n", r"warmup_iters must be an int \(default 100\), got \[5\] of type list \(in "),
    ("import os\nlearning_rate = os\n", r"learning_rate must be a float"),
])
def test_a_config_files_misspelled_or_list_valued_key_is_an_error(tmp_path, text, message):
    cfg = tmp_path / "c.py"
    cfg.write_text(text)
    with pytest.raises(SystemExit, match=message):
        configure(train_defaults(), [str(cfg)])


def test_a_config_file_may_import_and_define_helpers(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import os\nfrom os.path import join\nfrom dataclasses import dataclass\n\n\n"
                   "def _width(n):\n    return 64 * n\n\n\n"
                   "_layers = [1, 2]\nn_embd = _width(len(_layers))\nout_dir = join('out', 'x')\n")
    c = configure(train_defaults(), [str(cfg)])
    assert c["n_embd"] == 128 and c["out_dir"] == os.path.join("out", "x")


def test_resolve_says_which_keys_a_file_or_a_flag_set(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("learning_rate = 1e-3\n")  # the default's value, but set
    config, given = resolve(DEFAULTS, ["--batch_size=16", str(cfg)])
    assert config["batch_size"] == 16 and given == {"batch_size", "learning_rate"}


def test_help_says_flags_come_after_config_files(capsys):
    with pytest.raises(SystemExit):
        configure(DEFAULTS, ["--help"])
    assert "config files are applied first, then --key=value flags, whatever their order" in capsys.readouterr().out


@pytest.mark.parametrize("script, lines", [
    ("train.py", ["--max_time=0.0  # seconds the run may take", "--n_kv_head=2  # Llama only: key/value heads",
                  "--bias=False  # GPT only"]),  # the last two: model.py's
    ("sample.py", ["--top_k=40  # keep the k likeliest tokens; 0: off", "--start=''  # the prompt"]),
])
def test_help_says_each_setting_with_the_comment_where_it_is_declared(script, lines):
    """Each setting is declared once, with its default and a comment: in the script, or for the model
    and sampling settings in model.py's config dataclasses, which the scripts take as settings."""
    out = run(script, "--help", cwd=ROOT).stdout.splitlines()
    for line in lines:
        assert any(o.strip().startswith(line) for o in out), (line, out)
    assert sum(o.strip().startswith("--block_size=256  # the longest context") for o in out) == (script == "train.py")


def test_a_setting_of_the_other_architecture_is_an_error_when_given():
    """config/gutenberg.py's Llama settings (n_kv_head, tie_embeddings...) with --arch=gpt were dropped
    without a word; left at their defaults they are no one's choice, and pass."""
    defaults, gutenberg = train_defaults(), os.path.join(ROOT, "config", "gutenberg.py")
    for argv, named in (([gutenberg, "--arch=gpt"], "n_kv_head, moe_every, tie_embeddings set for arch=gpt"),
                        (["--arch=llama", "--bias=True"], "bias set for arch=llama")):
        config, given = resolve(defaults, argv)
        with pytest.raises(SystemExit, match=f"^error: {named}, which has no such setting") as e:
            check_config(config, given)
        assert "\n" not in str(e.value)
    for argv in (["--arch=gpt"], [os.path.join(ROOT, "config", "gpt.py")], [gutenberg]):
        check_config(*resolve(defaults, argv))


def test_help_into_a_closed_pipe_ends_quietly():
    """python train.py --help | head -1: the reader closes the pipe before the list is written."""
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--help"], stdout=w,
                         stderr=subprocess.PIPE, text=True)
    os.close(w)
    os.close(r)  # before the script has written anything: its import of torch takes a second
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("seed", [-1, 2**64 - 1, 10**23])
def test_a_seed_past_64_bits_is_one_line_at_start_up(seed):
    """A seed torch's generators cannot hold (with the rank, or 1, added) failed at the first evaluation."""
    with pytest.raises(SystemExit, match=f"seed must be zero or positive and below 2\\*\\*63 - 1024, got {seed}"):
        check_config(configure(train_defaults(), [f"--seed={seed}"]))


def test_sweep_checks_every_run_s_data_before_training_any(tmp_path, monkeypatch):
    """A run on data not prepared here stopped the sweep when its turn came: bpe4096, the tenth, hours in."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "gutenberg_bpe8192").mkdir(parents=True)
    (tmp_path / "data" / "gutenberg_bpe8192" / "meta.json").write_text("{}")  # the default's data, there
    with pytest.raises(SystemExit, match=r"run bpe4096 trains on data/gutenberg_bpe4096, which is not prepared here: "
                                         r"run python prepare.py --vocab_size=4096 first"):
        sweep.main(configure(vars(sweep), ["--runs=default,bpe4096"]))
    assert not os.path.exists(tmp_path / "out-sweep")  # nothing trained, nothing written
