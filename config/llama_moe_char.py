# The Llama-MoE of config/llama_moe.py with the notebook's tokenizer: one token per character (318 of them).
# python prepare.py --tokenizer=char && python train.py config/llama_moe_char.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "llama_moe.py")).read())  # every setting of llama_moe.py, then:
out_dir = "out-llama-moe-char"
data_dir = "data/gutenberg_char"  # python prepare.py --tokenizer=char
