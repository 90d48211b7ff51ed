# The course's GPT (model.py, part 1: learned positions, LayerNorm, a GELU MLP, the output layer tied
# to the token table) on the default run's data, shape and budget: the comparison with the Llama of
# config/gutenberg.py, every setting stated (the GPT has no n_kv_head, tie_embeddings or embedding_lr).
# python prepare.py && python train.py config/gpt.py
out_dir = "out-gpt"
data_dir = "data/gutenberg_bpe8192"

arch = "gpt"
n_layer = 3
n_head = 4
n_embd = 256
d_ff = 1024
block_size = 256
dropout = 0.0

dtype = "auto"  # bf16 where the device computes it fast, else float32
optimizer = "auto"  # Muon for the blocks' matrices where bf16 is fast, else AdamW
batch_size = 16
learning_rate = 2e-3
warmup_iters = 50
max_iters = 1500
max_time = 570.0

eval_interval = 150
eval_iters = 10
log_interval = 10
