# The default run: a small decoder on the French novels, sized for a laptop CPU (2 cores: under 10 minutes).
# python prepare.py && python train.py config/gutenberg.py
# Each choice below was measured against its alternatives in bits per byte on the held-out books, at the
# same 10 minutes or the same FLOPs (python sweep.py; docs/experiments.md has the tables).
out_dir = "out-gutenberg"
data_dir = "data/gutenberg_bpe8192"  # French BPE of 8,192 tokens, about 4 bytes per token

# The Llama-style decoder of model.py, dense (no experts): RMSNorm, RoPE, SwiGLU, grouped-query
# attention, QK norm. It beats the course's GPT of the same width at equal time (config/gpt.py).
# 3 layers of width 256: 7.1M parameters (2.1M of them in the untied token table, below), 33 MFLOPs
# per token. At this budget (a few million tokens) a small model that sees more tokens beats a
# larger one: 3 layers beat 4 and 2 (same matrices, so the same speed per FLOP on any machine).
arch = "llama"
n_layer = 3  # with no_rope_interval=4 (Llama 4's), all three rotate: a fourth would not
n_head = 4
n_kv_head = 2  # 2 query heads share each key/value head
n_embd = 256
d_ff = 1024  # SwiGLU width
moe_every = 0  # dense: no Mixture of Experts (config/llama_moe.py has them)
block_size = 256
dropout = 0.0  # one pass over a fraction of the corpus: nothing to regularise

# bf16 autocast (float32 weights and optimizer) where the device computes bf16 fast: CUDA GPUs, and
# CPUs with bf16 units (AVX512-BF16, AMX; measured at start-up), where matmuls run 4-7x faster than
# in float32 (by their size) and this model's step 2-2.5x, for the same loss per step. Elsewhere
# float32: other CPUs emulate bf16, 100x slower than float32.
dtype = "auto"

# Muon for the blocks' matrices, AdamW for the rest: clearly better than AdamW alone for the same
# compute. torch's Muon orthogonalises in bf16, so "auto" takes it where bf16 is fast and AdamW
# elsewhere. The output layer is untied from the token table, which trains at a 10x learning rate
# (embedding_lr): a lookup table's rows each see few gradients.
optimizer = "auto"
tie_embeddings = False
embedding_lr = 2e-2
batch_size = 16  # 4,096 tokens per iteration
learning_rate = 2e-3  # small models tolerate (and need, with few steps) a high learning rate
warmup_iters = 50
max_iters = 4000  # the cosine schedule ends here, or earlier where fewer fit in max_time (2,596-3,510 on a 2-core AMX CPU)
max_time = 570.0  # a slower machine fits fewer iterations in 9.5 minutes, and its schedule ends there

eval_interval = 150
eval_iters = 10
log_interval = 10
