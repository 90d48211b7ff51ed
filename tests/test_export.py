import os

import pytest
import torch
import transformers
from conftest import run

from common import load_model


def test_llama_moe_checkpoint_samples_and_evaluates(llama_trained):
    ckpt = torch.load(os.path.join(llama_trained, "out-llama-tiny", "ckpt.pt"), weights_only=True)
    assert ckpt["model_args"]["arch"] == "llama" and ckpt["history"]["val"][1][-1] < ckpt["history"]["val"][1][0]
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
