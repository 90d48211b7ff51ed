"""
Exports a checkpoint to a Hugging Face folder that the usual tools load as they are, offline.

    python export.py --out_dir=out-gutenberg --hf_dir=hf-gutenberg  # the default, a Llama: Llama4ForCausalLM
    python export.py --out_dir=out-llama-moe --hf_dir=hf-llama-moe  # the Llama-MoE: Llama4ForCausalLM
    python export.py --out_dir=out-gpt --hf_dir=hf-gpt              # a GPT (--arch=gpt): GPT2LMHeadModel

hf_dir then holds
    config.json, model.safetensors            the network: AutoModelForCausalLM gives our logits (to 1e-4)
    tokenizer.json, tokenizer_config.json     the tokenizer, `tokenizers` format: AutoTokenizer gives our ids
    generation_config.json                    sample.py's defaults: temperature 0.8, top-k 40 (--temperature...)
    README.md                                 a model card: the Hub's metadata, this checkpoint's figures
    tokenizer.tiktoken, tokenizer_meta.json   the same tokenizer for tiktoken and tokenizer.load
so that, with transformers installed,
    transformers.pipeline("text-generation", model="hf-gutenberg")("Il était une fois")
writes French. The files are written to a temporary folder beside hf_dir, then moved in: an
interrupted export leaves nothing half-written, and an earlier export is replaced only with
--overwrite=True.
"""

import json
import math
import os
import shutil

import torch

from configurator import configure
from model import SAMPLING, sampling
from plumbing import check_config, ctrl_c_ends_quietly, load_model
from tokenizer import CHAR_PATTERN, EOT, TOKENIZER_FILE, read_meta

# -----------------------------------------------------------------------------
out_dir = "out-gutenberg"  # the checkpoint to export
hf_dir = ""  # where to write; "" = hf-<out_dir>
overwrite = False  # replace the files of an earlier export in hf_dir (files export does not write are kept)
globals().update(SAMPLING)  # model.SamplingConfig's settings: generation_config.json samples as sample.py does
# the model card's license tag, e.g. mit (the project states none; the novels are public domain)
license = "other"
# -----------------------------------------------------------------------------


def gpt2_state(model) -> tuple[dict, dict]:
    """GPT2LMHeadModel's config and weights. GPT-2 stores its linear layers as Conv1D, (in, out):
    our (out, in) weights are transposed. Missing biases (bias=False) become zeros."""
    from transformers import GPT2Config

    c = model.config
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                        n_layer=c.n_layer, n_head=c.n_head, n_inner=c.d_ff,
                        activation_function="gelu",  # exact GELU, as nn.GELU()
                        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1,
                        tie_word_embeddings=True)
    sd = {}
    for name, p in model.state_dict().items():
        if any(name.endswith(w) for w in ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            p = p.t()
        sd[name] = p
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight",
                          "c_attn.weight", "c_proj.weight", "c_fc.weight")):
            bias = name[: -len("weight")] + "bias"
            if bias not in model.state_dict():
                sd[bias] = torch.zeros(p.size(0) if "ln" in name else p.size(1))
    return config, sd


def llama4_state(model) -> tuple[dict, dict]:
    """Llama4ForCausalLM's config, every field set explicitly, and weights under its names."""
    from transformers import Llama4TextConfig

    c = model.config
    config = Llama4TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.n_embd // c.n_head, hidden_act="silu",
        intermediate_size=c.d_expert, intermediate_size_mlp=c.d_ff, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
        moe_layers=[i for i in range(c.n_layer) if c.is_moe(i)],
        no_rope_layers=[int(c.uses_rope(i)) for i in range(c.n_layer)],  # 1 = this layer uses RoPE
        use_qk_norm=c.qk_norm, attn_temperature_tuning=False, attention_chunk_size=c.block_size,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False, attention_dropout=0.0, router_aux_loss_coef=c.aux_loss_coef,
        bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1, pad_token_id=None)
    top = {"transformer.wte.weight": "model.embed_tokens.weight",
           "transformer.ln_f.weight": "model.norm.weight"}
    sd = {}
    for name, p in model.state_dict().items():
        new = top.get(name, name.replace("transformer.h.", "model.layers.").replace(".attn.", ".self_attn.")
                      .replace(".attn_norm.", ".input_layernorm.")
                      .replace(".mlp_norm.", ".post_attention_layernorm.")
                      .replace(".mlp.", ".feed_forward."))
        # the experts' stacked weights
        if new.endswith(("feed_forward.gate_up_proj", "feed_forward.down_proj")):
            new = new.replace("feed_forward.", "feed_forward.experts.")
        sd[new] = p
    return config, sd


def to_transformers(model):
    """The same network as a transformers model: GPT2LMHeadModel for the GPT, Llama4ForCausalLM for the Llama."""
    import transformers

    is_gpt = type(model.config).__name__ == "GPTConfig"
    config, sd = (gpt2_state if is_gpt else llama4_state)(model)
    hf_model = (transformers.GPT2LMHeadModel if is_gpt else transformers.Llama4ForCausalLM)(config)
    hf_model.load_state_dict(sd, strict=True)  # every weight has its place, and every place a weight
    return hf_model




# The split pattern in the regex dialect of the `tokenizers` library (Oniguruma) where it differs:
# Oniguruma has no (?s) flag, and [\s\S] is any character there, as (?s:.) is in tiktoken's.
ONIGURUMA_PATTERNS = {CHAR_PATTERN: r"[\s\S]"}


def hf_tokenizer(tok, ranks_file: str, block_size: int):
    """Our tokenizer as a transformers PreTrainedTokenizerFast, built by transformers' own tiktoken
    converter: every token of ranks_file keeps its id, every token that two shorter ones make is a
    merge of the same rank (so `tokenizers` merges what tiktoken merges), the split pattern becomes
    a pre-tokenizer and bytes map to printable characters as in GPT-2 (ByteLevel). Then what is
    ours: NFC first for bpe and char, and a "<|endoftext|>" typed in a text stays text, as in
    tok.encode (split_special_tokens): only the id ends a document."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern = ONIGURUMA_PATTERNS.get(tok.pattern, tok.pattern)
    backend = TikTokenConverter(vocab_file=ranks_file, pattern=pattern,
                                extra_special_tokens=[EOT]).converted()
    if tok.nfc:
        backend.normalizer = normalizers.NFC()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, model_max_length=block_size,
                                   clean_up_tokenization_spaces=False,  # keeps the space of French " !", " ?"
                                   split_special_tokens=True)
    assert fast.eos_token_id == tok.eot_id, (
        "<|endoftext|> must come right after the ranks, as in tokenizer.py")
    return fast


def generation_config(eot_id: int, block_size: int, settings: dict):
    """How generate() and pipelines sample by default: settings, sample.py's (model.SamplingConfig's
    fields, named as transformers names them).
    Temperature 0 is sample.py's greedy decoding: do_sample=False (transformers refuses to sample at
    temperature 0). max_length keeps prompt and reply within the context when the caller does not
    say how much to write (a pipeline would write 256 tokens): transformers does not slide the
    context past block_size as sample.py does, and a GPT-2 fails."""
    from transformers import GenerationConfig

    how = {"do_sample": True, **settings} if settings["temperature"] else {"do_sample": False}
    return GenerationConfig(**how, max_length=block_size, bos_token_id=eot_id, eos_token_id=eot_id,
                            pad_token_id=eot_id)


def training_data(ckpt: dict) -> tuple[str | None, str]:
    """The Hub dataset the checkpoint was trained on (None if not one), and a line that says what
    the data was, from prepare.py's meta.json when its folder is still there."""
    try:  # read_meta checks every field this reads: a hand-edited meta.json is ValueError
        meta = read_meta(os.path.join(ckpt["data_dir"], "meta.json"))
    except (ValueError, KeyError):
        return None, f"{ckpt.get('data_dir', 'unknown')} (its meta.json was not found or not readable at export)"
    hub, source = meta.get("hub_dataset"), meta.get("source", ckpt["data_dir"])
    where = f"[{hub}](https://huggingface.co/datasets/{hub})" if hub else source
    return hub, (f"{where}: {meta['train']['documents']} documents ({meta['train']['tokens']:,} tokens); "
                 f"{meta['val']['documents']} held out for validation")


def model_card(name: str, hf_model, model, tok, ckpt: dict, license_tag: str) -> str:
    """README.md: the metadata the Hub reads (YAML front matter), then what the model is, what it
    was trained on and the figures this checkpoint holds."""
    c, cfg = model.config, ckpt.get("config", {})
    hub, data = training_data(ckpt)
    yaml = ["---", "language:", "- fr", f"license: {license_tag}", "library_name: transformers",
            "pipeline_tag: text-generation", "tags:", "- petit-llm", f"- {hf_model.config.model_type}",
            *(["datasets:", f"- {hub}"] if hub else []), "---"]
    moe = getattr(hf_model.config, "moe_layers", None)
    shape = f"{c.n_layer} layers of width {c.n_embd}, {c.n_head} heads"
    shape += f", {c.n_expert} experts (top-{c.n_expert_per_token}) in layers {moe}" if moe else ""
    rows = [("architecture", f"{type(hf_model).__name__}: {shape}"),
            ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
            ("context", f"{c.block_size} tokens"),
            ("tokenizer", f"{tok.kind}, {tok.vocab_size:,} tokens" + (", NFC-normalised" if tok.nfc else "")),
            ("training data", data)]
    if "val_loss" in ckpt:  # a train.py checkpoint: the val loss of these weights, measured as it was saved
        it, val = ckpt["iter_num"], ckpt["val_loss"]
        per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]
        rows += [("tokens seen", f"{ckpt['iter_num'] * per_iter:,} ({ckpt['iter_num']:,} iterations of "
                  f"{per_iter:,} tokens)"),
                 ("val loss", f"{val:.4f} nats/token at iteration {it:,} (train.py's estimate on "
                  f"{cfg['eval_iters']} batches of the held-out documents)"),
                 ("val bits per byte", f"{val / math.log(2) / ckpt['bytes_per_token']:.4f}")]
    else:
        tuned = "chat.py (ratings)" if "chat" in ckpt else "dpo.py (preference pairs)"
        rows.append(("tuning", f"tuned after pretraining with {tuned}: measure it with python eval.py"))
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return "\n".join(yaml) + f"""

# {name}

A small French language model trained from scratch with petit-llm (`train.py`) and exported by
`export.py`. It continues French text in the style of the text it was trained on; it does not
follow instructions.

{table}

## Use

```python
from transformers import pipeline

generate = pipeline("text-generation", model="{name}")
print(generate("Il était une fois", max_new_tokens=100)[0]["generated_text"])
```

`generation_config.json` {decoding(hf_model.generation_config)}
and stops at `<|endoftext|>` or after {c.block_size} tokens in all (`max_length`, the context:
transformers does not slide the context past it as `sample.py` does, so keep prompt and
`max_new_tokens` within it). `<|endoftext|>` separates
documents: typed in a prompt it is plain text, only its id ({tok.eot_id}) is the separator.

## Licence

The training texts are in the public domain. The license tag above is `{license_tag}`
(`python export.py --license=...` sets it).
"""


def decoding(gen) -> str:
    """How a generation config decodes, in the model card's words."""
    if not gen.do_sample:
        return "decodes greedily (`do_sample=False`), as `sample.py --temperature=0` does,"
    return f"samples as `sample.py` does ({', '.join(f'{k} {getattr(gen, k)}' for k in SAMPLING)}),"


def write_export(d: str, model, tok, ckpt: dict, name: str, license_tag: str, settings: dict) -> str:
    """Every file of the export into folder d; returns the transformers class."""
    hf_model = to_transformers(model)
    hf_model.generation_config = generation_config(tok.eot_id, model.config.block_size, settings)
    hf_model.save_pretrained(d)
    with open(os.path.join(d, "tokenizer_meta.json"), "w") as f:
        json.dump(tok.save(d), f, indent=2)  # as meta.json's "tokenizer": tokenizer.load reads both
    hf_tokenizer(tok, os.path.join(d, TOKENIZER_FILE), model.config.block_size).save_pretrained(d)
    with open(os.path.join(d, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(name, hf_model, model, tok, ckpt, license_tag))
    return type(hf_model).__name__


def main(c: dict) -> str:
    check_config(c)  # the sampling settings in range, as sample.py checks them
    hf_dir = c["hf_dir"] or "hf-" + os.path.basename(os.path.normpath(c["out_dir"])).removeprefix("out-")
    if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
        raise SystemExit(f"error: --hf_dir={hf_dir} is a file: pass a folder (new, or an earlier export)")
    held = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
    earlier = {"config.json", "model.safetensors"} <= set(held)  # what every export has written
    if held and not (earlier and c["overwrite"]):
        what = f"{len(held)} file(s) ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''})"
        if not earlier:  # a project, a data folder: --overwrite would replace its README.md, its tokenizer
            raise SystemExit(f"error: {hf_dir} holds {what} and is no export folder (its README.md, say, would "
                             "be replaced): pass a new or empty --hf_dir")
        raise SystemExit(f"error: {hf_dir} already holds an export, {what}: pass --overwrite=True to replace "
                         "it (files export does not write are kept), or another --hf_dir")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("error: export needs transformers: pip install -r requirements-dev.txt") from None
    model, tok, ckpt = load_model(c["out_dir"])
    tmp = f"{os.path.abspath(hf_dir)}.tmp{os.getpid()}"  # beside hf_dir: same disk, so the moves are renames
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise SystemExit(f"error: cannot write beside {hf_dir} ({e.strerror}): pass another --hf_dir") \
            from None
    try:
        hf_class = write_export(tmp, model, tok, ckpt, os.path.basename(os.path.abspath(hf_dir)),
                                c["license"], sampling(c))
        written = sorted(os.listdir(tmp))
        if not os.path.exists(hf_dir):
            os.rename(tmp, hf_dir)  # all files appear at once
        else:  # an earlier export: each file is replaced whole, the others are kept
            for name in written:
                os.replace(os.path.join(tmp, name), os.path.join(hf_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {hf_dir}/ ({hf_class}): {', '.join(written)}")
    return hf_dir


if __name__ == "__main__":
    with ctrl_c_ends_quietly():  # one line, exit status 130; the temporary folder is removed
        main(configure(globals()))
