import os

import pytest
import torch
import transformers
from conftest import run

from common import load_model


def test_llama_moe_checkpoint_samples_and_evaluates(llama_trained):
    ckpt = torch.load(os.path.join(llama_trained, "out-llama-tiny", "ckpt.pt"), weights_only=True)
    assert ckpt["model_args"]["arch"] == "llama" and ckpt["val_loss"] < 6.0  # it learned: a uniform guess over 512 tokens is 6.24
    p = run("sample.py", "--out_dir=out-llama-tiny", "--max_new_tokens=10", "--start=Il était", cwd=llama_trained)
    assert p.stdout.startswith("Il était")
    assert "bits per byte" in run("eval.py", "--out_dir=out-llama-tiny", cwd=llama_trained).stdout


@pytest.mark.parametrize("out_dir,hf_class", [("out-tiny", "GPT2LMHeadModel"), ("out-llama-tiny", "Llama4ForCausalLM")])
def test_transformers_loads_the_export_with_our_logits(llama_trained, out_dir, hf_class):
    hf_dir = os.path.join(llama_trained, "hf-" + out_dir)
    run("export.py", f"--out_dir={out_dir}", f"--hf_dir={hf_dir}", cwd=llama_trained)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == hf_class
    ours, tok, _ = load_model(os.path.join(llama_trained, out_dir))
    torch.manual_seed(0)
    x = torch.randint(0, tok.vocab_size, (3, ours.config.block_size))
    with torch.no_grad():
        logits, _ = ours(x, x)
        theirs = hf(x).logits
    assert (logits - theirs).abs().max().item() < 1e-4
    assert os.path.exists(os.path.join(hf_dir, "tokenizer.tiktoken"))


def test_the_default_dense_llama_exports_with_our_logits():
    """config/gutenberg.py's shape of model (a Llama without experts), untrained, scaled down."""
    from export import to_transformers
    from model import make_model

    torch.manual_seed(0)
    ours = make_model({"arch": "llama", "vocab_size": 64, "block_size": 16, "n_layer": 4, "n_head": 4, "n_kv_head": 2,
                       "n_embd": 32, "d_ff": 64, "moe_every": 0}).eval()
    hf = to_transformers(ours).eval()
    assert not ours.moe_layers and hf.config.moe_layers == []
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (ours(x, x)[0] - hf(x).logits).abs().max().item() < 1e-4
