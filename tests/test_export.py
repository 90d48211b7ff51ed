import json
import math
import os
import re

import pytest
import torch
import transformers
from conftest import run

import export
import sample
import tokenizer
from configurator import configure
from export import hf_tokenizer
from plumbing import load_checkpoint, load_model, read_metrics

# what French text throws at a tokenizer: elisions, typographic apostrophes, accents typed as e +
# combining accent (NFD), dialogue dashes, guillemets with their spaces, an emoji and a character
# no French book holds (bytes for the char tokenizer), <|endoftext|> typed as text, \r\n
FRENCH = ("L'homme qu'il vit aujourd'hui, jusqu'ici, lorsqu'il entra : « Bonjour ! »\n"
          "— C’est l’été, dit-elle. Qu’importe ? répondit-il.\u00a0« Allons-y »…\n\n"
          "Cafe\u0301 de\u0301ja\u0300 pre\u0301vu a\u0300 Noe\u0308l, 1848. Un emoji 🙂, un 汉字 <|endoftext|> la suite.\r\n")


def test_llama_moe_checkpoint_samples_and_evaluates(llama_trained):
    ckpt = torch.load(os.path.join(llama_trained, "out-llama-tiny", "ckpt.pt"), weights_only=True)
    val = [r["val_loss"] for r in read_metrics(os.path.join(llama_trained, "out-llama-tiny", "metrics.jsonl"))
           if "val_loss" in r]
    assert ckpt["model_args"]["arch"] == "llama" and ckpt["val_loss"] == val[-1] < val[0]  # it learned
    p = run("sample.py", "--out_dir=out-llama-tiny", "--max_new_tokens=10", "--start=Il était", cwd=llama_trained)
    assert p.stdout.startswith("Il était")
    assert "bits per byte" in run("eval.py", "--out_dir=out-llama-tiny", cwd=llama_trained).stdout


@pytest.mark.parametrize("kind", ["bpe", "char", "gpt2"])
def test_the_exported_tokenizer_gives_our_ids_and_decodes_back(books, tmp_path, kind):
    ours = {"bpe": lambda: tokenizer.train_bpe(books, 512), "char": lambda: tokenizer.train_char(books),
            "gpt2": tokenizer.gpt2}[kind]()
    ours.save(str(tmp_path))
    hf_tokenizer(ours, str(tmp_path / tokenizer.TOKENIZER_FILE), 64).save_pretrained(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # from the folder alone, offline
    assert theirs.eos_token_id == ours.eot_id and theirs.model_max_length == 64
    for text in [FRENCH, *books]:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text)
        assert theirs.decode(ids) == ours.decode(ids) == ours.normalize(text)
    assert (ours.encode("e\u0301") == ours.encode("é")) == (kind != "gpt2")  # the NFC was exercised
    assert theirs.decode([ours.eot_id]) == tokenizer.EOT


def exported(workdir: str, out_dir: str, hf_dir: str) -> str:
    """export.py run in this process (the command line is tested below): saves a start of Python."""
    path = os.path.join(workdir, hf_dir)
    return export.main(configure(vars(export), [f"--out_dir={os.path.join(workdir, out_dir)}", f"--hf_dir={path}"]))


@pytest.mark.parametrize("out_dir,hf_class", [("out-tiny", "GPT2LMHeadModel"), ("out-llama-tiny", "Llama4ForCausalLM")])
def test_transformers_loads_the_export_with_our_logits_and_tokens(llama_trained, out_dir, hf_class):
    hf_dir = os.path.join(llama_trained, "hf-" + out_dir)
    run("export.py", f"--out_dir={out_dir}", f"--hf_dir={hf_dir}", cwd=llama_trained)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == hf_class
    ours, tok, ckpt = load_model(os.path.join(llama_trained, out_dir))
    torch.manual_seed(0)
    x = torch.randint(0, tok.vocab_size, (3, ours.config.block_size))
    with torch.no_grad():
        logits = ours(x)
        theirs = hf(x).logits
    assert (logits - theirs).abs().max().item() < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(hf_dir)(FRENCH)["input_ids"] == tok.encode(FRENCH)
    with open(os.path.join(hf_dir, "tokenizer_meta.json")) as f:  # and our own tokenizer, from the folder
        assert tokenizer.load(hf_dir, {"tokenizer": json.load(f)}).state() == tok.state()
    gen = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert (gen.do_sample, gen.top_k, gen.temperature, gen.eos_token_id) == (True, 40, 0.8, tok.eot_id)
    assert gen.max_length == ours.config.block_size  # a call that sets no length stays within the context
    # the model card: the Hub's metadata, and the checkpoint's figures
    with open(os.path.join(hf_dir, "README.md"), encoding="utf-8") as f:
        card = f.read()
    front = card.split("---\n")[1]
    assert "language:\n- fr\n" in front and "pipeline_tag: text-generation\n" in front and "license: other\n" in front
    c = ckpt["config"]
    tokens = ckpt["iter_num"] * c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
    bpb = ckpt["val_loss"] / math.log(2) / ckpt["bytes_per_token"]
    assert f"| parameters | {sum(p.numel() for p in ours.parameters()):,} |" in card
    assert f"| tokens seen | {tokens:,} (" in card and f"| val bits per byte | {bpb:.4f} |" in card
    assert tokens == {"out-tiny": 60, "out-llama-tiny": 30}[out_dir] * 8 * 32


@pytest.mark.parametrize("out_dir", ["out-tiny", "out-llama-tiny"])
def test_the_pipeline_writes_what_sample_py_writes_greedily(llama_trained, tmp_path, out_dir, capsys):
    """The tiny models, barely trained, greedily write nothing but commas, and any two decoders
    agree on that: the test shakes their weights (seeded) so that each prompt gets its own text."""
    ckpt = load_checkpoint(os.path.join(llama_trained, out_dir, "ckpt.pt"))
    gen = torch.Generator().manual_seed(2)
    for p in ckpt["model"].values():
        p.add_(torch.randn(p.shape, generator=gen) * p.std() * 3)
    os.makedirs(tmp_path / "out")
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    hf_dir = exported(str(tmp_path), "out", "hf")
    generate = transformers.pipeline("text-generation", model=hf_dir)
    continuations = set()
    for prompt in ["Il était une fois", "— Oui, dit-elle"]:
        capsys.readouterr()
        sample.main(configure(vars(sample), [f"--out_dir={tmp_path / 'out'}", "--greedy", f"--start={prompt}",
                                             "--max_new_tokens=16", "--device=cpu"]))
        ours = capsys.readouterr().out
        theirs = generate(prompt, do_sample=False, max_new_tokens=16)[0]["generated_text"]
        assert ours == theirs + "\n"
        continuations.add(theirs.removeprefix(prompt))
    assert len(continuations) == 2 and all(len(set(t)) > 1 for t in continuations)  # not one repeated character
    assert generate("Il était")[0]["generated_text"].startswith("Il était")  # generation_config's defaults:
    assert len(generate("Il était", return_tensors=True)[0]["generated_token_ids"]) <= 32  # sampling, max_length


def test_export_never_overwrites_without_overwrite_and_keeps_other_files(trained, tmp_path):
    hf_dir = exported(trained, "out-tiny", str(tmp_path / "hf"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        before = f.read()
    with open(os.path.join(hf_dir, "notes.txt"), "w") as f:
        f.write("mine")
    p = run("export.py", "--out_dir=out-tiny", f"--hf_dir={hf_dir}", cwd=trained, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert "--overwrite=True" in p.stderr and sorted(os.listdir(tmp_path)) == ["hf"]
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert f.read() == before
    run("export.py", "--out_dir=out-tiny", f"--hf_dir={hf_dir}", "--overwrite=True", cwd=trained)
    assert open(os.path.join(hf_dir, "notes.txt")).read() == "mine"  # a file export does not write is kept
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left beside it


def test_overwrite_replaces_only_an_earlier_export(trained, tmp_path):
    """--overwrite=True into a folder that holds no export (a project, a data folder) once replaced its
    README.md or its tokenizer.tiktoken: refused, whatever the flag."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("my project")
    (mine / "tokenizer.tiktoken").write_text("my ranks")
    p = run("export.py", "--out_dir=out-tiny", f"--hf_dir={mine}", "--overwrite=True", cwd=trained, check=False)
    assert p.returncode == 1 and "holds 2 file(s) (README.md, tokenizer.tiktoken) and is no export folder" in p.stderr
    assert (mine / "README.md").read_text() == "my project" and (mine / "tokenizer.tiktoken").read_text() == "my ranks"
    assert sorted(os.listdir(tmp_path)) == ["project"]


def test_export_to_a_file_is_a_one_line_error(trained, tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("not a folder")
    p = run("export.py", "--out_dir=out-tiny", f"--hf_dir={path}", cwd=trained, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "is a file" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and path.read_text() == "not a folder"


@pytest.mark.parametrize("arg, message", [("--temperature=-1", "temperature must be zero or positive"),
                                          ("--top_k=-3", "top_k must be zero or positive"),
                                          ("--top_p=5", "top_p must be in (0, 1]"),
                                          ("--temperature=1e-30", "temperature must be 0 (greedy) or at")])
def test_export_checks_the_sampling_settings_as_sample_py_does(trained, tmp_path, arg, message):
    """They went into generation_config.json as given, for transformers to fail on at generate()."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        export.main(configure(vars(export), ["--out_dir=" + os.path.join(trained, "out-tiny"),
                                             f"--hf_dir={tmp_path / 'hf'}", arg]))
    assert not os.listdir(tmp_path)


def test_export_temperature_0_is_greedy_as_in_sample_py(trained, tmp_path):
    """transformers refuses to sample at temperature 0: sample.py's greedy decoding is do_sample=False."""
    hf_dir = export.main(configure(vars(export), ["--out_dir=" + os.path.join(trained, "out-tiny"),
                                                  f"--hf_dir={tmp_path / 'hf'}", "--temperature=0"]))
    gen = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert gen.do_sample is False
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    x = torch.tensor([[5, 6, 7]])
    assert torch.equal(hf.generate(x, max_new_tokens=3), hf.generate(x, max_new_tokens=3))  # greedy: the same
    with open(os.path.join(hf_dir, "README.md"), encoding="utf-8") as f:
        assert "decodes greedily (`do_sample=False`)" in f.read()


@pytest.mark.parametrize("tie", [True, False])
def test_the_default_dense_llama_exports_with_our_logits(tie):
    """config/gutenberg.py's shape of model (a Llama without experts, its output layer untied from
    the token embedding), untrained, scaled down."""
    from export import to_transformers
    from model import make_model

    torch.manual_seed(0)
    ours = make_model({"arch": "llama", "vocab_size": 64, "block_size": 16, "n_layer": 4, "n_head": 4, "n_kv_head": 2,
                       "n_embd": 32, "d_ff": 64, "moe_every": 0, "tie_embeddings": tie}).eval()
    hf = to_transformers(ours).eval()
    assert not ours.moe_layers and hf.config.moe_layers == []
    assert (ours.transformer.wte.weight is ours.lm_head.weight) == tie
    assert torch.equal(hf.get_input_embeddings().weight, ours.transformer.wte.weight)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4
