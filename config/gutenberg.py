# The default run: a small GPT on the French novels, sized for a laptop CPU (2 cores: under 10 minutes).
# python prepare.py && python train.py config/gutenberg.py
out_dir = "out-gutenberg"
data_dir = "data/gutenberg_bpe8192"  # French BPE of 8,192 tokens, about 4 bytes per token

# 4 layers of width 256: about 5.3M parameters, 35 MFLOPs per token, about 4,500 tokens/s on 2 cores.
# At this budget (a few million tokens) a small model trained on more tokens beats a larger one.
n_layer = 4
n_head = 4
n_embd = 256
block_size = 256
dropout = 0.0  # one pass over a fraction of the corpus: nothing to regularise

batch_size = 16  # 4,096 tokens per iteration
learning_rate = 2e-3  # small models tolerate (and need, with few steps) a high learning rate
warmup_iters = 50
max_iters = 500  # the cosine schedule ends here: about 8 minutes on 2 cores
max_time = 570.0  # and on a slower machine the run stops cleanly after 9.5 minutes anyway

eval_interval = 150
eval_iters = 10
log_interval = 10
