"""
Exports a checkpoint to the Hugging Face transformers format: config.json and model.safetensors.

    python export.py --out_dir=out-gutenberg --hf_dir=hf-gutenberg      # the default, a dense Llama -> Llama4ForCausalLM
    python export.py --out_dir=out-llama-moe --hf_dir=hf-llama-moe      # the Llama-MoE -> Llama4ForCausalLM
    python export.py --out_dir=out-gpt --hf_dir=hf-gpt                  # a GPT (--arch=gpt) -> GPT2LMHeadModel

Then, with transformers installed:
    model = transformers.AutoModelForCausalLM.from_pretrained("hf-gutenberg")
gives the same logits as our model (tests/test_export.py checks it to 1e-4). The tokenizer has no
transformers class: hf_dir also gets tokenizer.tiktoken and tokenizer.json ({"pattern", "nfc",
"eot_id"}), and `tokenizer.Tokenizer.from_state(...)` or tiktoken itself encodes text for it
(NFC-normalise first when "nfc" is true).
"""

import json
import os

import torch

from common import load_model
from configurator import configure

# -----------------------------------------------------------------------------
out_dir = "out-gutenberg"  # the checkpoint to export
hf_dir = ""  # where to write; "" = hf-<out_dir>
# -----------------------------------------------------------------------------


def gpt2_state(model) -> tuple[dict, dict]:
    """GPT2LMHeadModel's config and weights. GPT-2 stores its linear layers as Conv1D, (in, out):
    our (out, in) weights are transposed. Missing biases (bias=False) become zeros."""
    from transformers import GPT2Config

    c = model.config
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, n_inner=c.d_ff, activation_function="gelu",  # exact GELU, as nn.GELU()
                        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1, tie_word_embeddings=True)
    sd = {}
    for name, p in model.state_dict().items():
        if any(name.endswith(w) for w in ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            p = p.t()
        sd[name] = p
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "c_attn.weight", "c_proj.weight", "c_fc.weight")):
            bias = name[: -len("weight")] + "bias"
            if bias not in model.state_dict():
                sd[bias] = torch.zeros(p.size(0) if "ln" in name else p.size(1))
    return config, sd


def llama4_state(model) -> tuple[dict, dict]:
    """Llama4ForCausalLM's config, every field set explicitly, and weights under its names."""
    from transformers import Llama4TextConfig

    c = model.config
    config = Llama4TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.n_embd // c.n_head, hidden_act="silu",
        intermediate_size=c.d_expert, intermediate_size_mlp=c.d_ff, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
        moe_layers=[i for i in range(c.n_layer) if c.is_moe(i)],
        no_rope_layers=[int(c.uses_rope(i)) for i in range(c.n_layer)],  # 1 = this layer uses RoPE
        use_qk_norm=c.qk_norm, attn_temperature_tuning=False, attention_chunk_size=c.block_size,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, tie_word_embeddings=True,
        attention_bias=False, attention_dropout=0.0, router_aux_loss_coef=c.aux_loss_coef,
        bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1, pad_token_id=None)
    top = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight"}
    sd = {}
    for name, p in model.state_dict().items():
        new = top.get(name, name.replace("transformer.h.", "model.layers.").replace(".attn.", ".self_attn.")
                      .replace(".attn_norm.", ".input_layernorm.").replace(".mlp_norm.", ".post_attention_layernorm.")
                      .replace(".mlp.", ".feed_forward."))
        if new.endswith(("feed_forward.gate_up_proj", "feed_forward.down_proj")):  # the experts' stacked weights
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


def main(c: dict) -> str:
    model, tok, _ = load_model(c["out_dir"])
    hf_dir = c["hf_dir"] or "hf-" + os.path.basename(os.path.normpath(c["out_dir"])).removeprefix("out-")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("error: export needs transformers: pip install -r requirements-dev.txt") from None
    hf_model = to_transformers(model)
    hf_model.save_pretrained(hf_dir)
    tok.save(hf_dir)
    with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
        json.dump({"kind": tok.kind, "pattern": tok.pattern, "nfc": tok.nfc, "eot_id": tok.eot_id,
                   "ranks_file": "tokenizer.tiktoken"}, f, indent=2)
    print(f"wrote {hf_dir}/ ({type(hf_model).__name__}: config.json, model.safetensors; tokenizer.tiktoken and "
          "tokenizer.json for tiktoken)")
    return hf_dir


if __name__ == "__main__":
    main(configure(globals()))
