"""
Course parts 4 and 5: generate text from a trained checkpoint, and look at its attention.

    python sample.py --top_k=40                                 # from out-gutenberg/ckpt.pt
    python sample.py --start="Il était une fois" --temperature=0.8 --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --greedy
    python sample.py --attention_map=attn.png --start="Le petit chat noir dort sur le canapé."

Decoding strategies: greedy (always the likeliest token: safe, soon repetitive), temperature (divide
the logits: < 1 sharper, > 1 more adventurous), top-k (sample among the k likeliest tokens only)
and top-p (among the smallest set of tokens whose probabilities add up to p).
"""

import os
import sys

import torch

from configurator import configure
from model import SAMPLING, sampling
from plumbing import (
    check_config,
    ctrl_c_ends_quietly,
    decode_compile,
    decode_steps,
    load_model,
    setup_runtime,
    stoppable,
    stream,
)

# -----------------------------------------------------------------------------
out_dir = "out-gutenberg"  # where train.py saved ckpt.pt
start = ""  # the prompt, or FILE:path to read it from a file; "" starts from <|endoftext|>
num_samples = 1  # several: generated batch_size at a time, each batch printed as it ends (Ctrl-C stops)
batch_size = 32  # samples generated together: memory stays bounded whatever num_samples
max_new_tokens = 200
globals().update(SAMPLING)  # model.SamplingConfig's settings and defaults: temperature, top_k, top_p
greedy = False  # always take the likeliest token (same as temperature=0)
seed = 1337
device = "auto"
dtype = "auto"
# decode with the step compiled (model.generate's compile); None: when the run takes at least 5,000 decode
# steps (batches x max_new_tokens): compiling takes 5-40 s and saves about 1-2 ms a step
compile = None
attention_map = ""  # a PNG path: plot every layer's and head's attention over the prompt instead of sampling
# -----------------------------------------------------------------------------


def attention_map_path(path: str) -> str:
    """The file the attention figure goes to (.png added when there is no extension, as matplotlib
    does), checked before the model runs: its folder exists and its format is one matplotlib writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise SystemExit(f"error: --attention_map={path} is a folder: give a file name, such as "
                         f"{os.path.join(path, 'attn.png')}")
    path = path if os.path.splitext(path)[1] else path + ".png"
    formats = FigureCanvasAgg.get_supported_filetypes()
    if os.path.splitext(path)[1][1:].lower() not in formats:
        raise SystemExit(f"error: --attention_map={path}: matplotlib writes {', '.join(sorted(formats))}, "
                         "not this extension: end the name with .png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --attention_map={path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"error: --attention_map={path}: cannot write in {folder}")
    return path


def plot_attention(maps: list[torch.Tensor], labels: list[str], path: str) -> None:
    """One heatmap per layer (rows) and head (columns): row i shows where token i looks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layer, n_head, T = len(maps), maps[0].size(1), len(labels)
    cell = max(2.5, 0.28 * T)  # inches per heatmap: room for one label per token
    fig, axes = plt.subplots(n_layer, n_head, figsize=(cell * n_head, cell * n_layer), squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(maps[layer][0, head].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer}, head {head}", fontsize=10)
            ax.set_xticks(range(T), labels, rotation=90, fontsize=8)
            ax.set_yticks(range(T), labels, fontsize=8)
    fig.supxlabel("key: the token looked at")
    fig.supylabel("query: the token looking")
    fig.tight_layout()
    # a temporary file, then renamed: an existing figure is replaced whole or not at all
    fig.savefig(path + ".tmp", dpi=80, format=os.path.splitext(path)[1][1:].lower())
    plt.close(fig)
    os.replace(path + ".tmp", path)


def main(c: dict) -> None:
    if c["start"].startswith("FILE:"):
        path = c["start"][5:]
        try:
            with open(path, encoding="utf-8") as f:
                c["start"] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read the prompt file {path}: {e}") from None
    check_config(c)  # the sampling settings, max_new_tokens, batch_size: in range
    if c["num_samples"] < 1:
        raise SystemExit(f"error: num_samples must be at least 1, got {c['num_samples']}")
    if c["attention_map"]:
        c["attention_map"] = attention_map_path(c["attention_map"])
    rt = setup_runtime(c["device"], c["dtype"], c["seed"])
    model, tok, _ = load_model(c["out_dir"], rt.device)
    block_size = model.config.block_size

    ids = tok.encode(c["start"]) if c["start"] else [tok.eot_id]
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens; the model sees its last {block_size} (block_size)",
              file=sys.stderr)
        ids = ids[-block_size:]
    x = torch.tensor([ids], dtype=torch.long, device=rt.device)

    if c["attention_map"]:
        # one heatmap per layer and head, one row per token: past 1,024 rows in all, minutes and GBs to draw
        n_maps = model.config.n_layer * model.config.n_head
        if len(ids) * n_maps > 1024:
            raise SystemExit(f"error: --attention_map draws {model.config.n_layer} x {model.config.n_head} "
                             f"heatmaps of one row per token: use a prompt of at most "
                             f"{max(1, 1024 // n_maps)} tokens with this model (this one has {len(ids)})")
        maps: list[torch.Tensor] = []
        with torch.no_grad(), rt.autocast():
            model(x, attn_maps=maps)
        labels = [tok.decode([i]).replace(" ", "·").replace("\n", "⏎") for i in ids]
        try:
            plot_attention(maps, labels, c["attention_map"])
        except OSError as e:  # a folder that refuses writes even to root (/proc), a full disk
            raise SystemExit(f"error: cannot write {c['attention_map']}: {e.strerror or e}") from None
        print(f"wrote {os.path.abspath(c['attention_map'])}: {len(maps)} layers x {maps[0].size(1)} heads "
              f"over {len(ids)} tokens")
        return

    gen = torch.Generator(device=rt.device).manual_seed(c["seed"])
    settings = {**sampling(c), "temperature": 0.0} if c["greedy"] else sampling(c)
    n_steps = decode_steps(c["num_samples"], c["batch_size"], c["max_new_tokens"])
    compile = decode_compile(c["compile"], rt.device_type, n_steps, log=lambda line: print(line, file=sys.stderr))
    model = rt.decoder(model, compile)  # a compiled step on a CPU with bf16 units reads bf16 weights
    if c["num_samples"] == 1:  # stream the text as it comes
        steps = model.generate(x, c["max_new_tokens"], **settings, eot_id=tok.eot_id, generator=gen,
                               compile=compile)
        print(c["start"], end="", flush=True)
        with rt.autocast(decode=True):
            stream(steps, tok)
        return
    for first in range(0, c["num_samples"], c["batch_size"]):
        n = min(c["batch_size"], c["num_samples"] - first)
        steps = model.generate(x.repeat(n, 1), c["max_new_tokens"], **settings, eot_id=tok.eot_id,
                               generator=gen, compile=compile)
        with rt.autocast(decode=True):
            out = torch.cat([torch.empty(n, 0, dtype=torch.long, device=rt.device), *stoppable(steps)], dim=1).tolist()
        for i, row in enumerate(out, first + 1):
            row = row[: row.index(tok.eot_id)] if tok.eot_id in row else row
            print(f"--- sample {i} ---\n{c['start']}{tok.decode(row)}", flush=True)


if __name__ == "__main__":
    with ctrl_c_ends_quietly():  # one line, exit status 130
        main(configure(globals()))
