# The Llama-4-style decoder with a Mixture of Experts, sized for a CPU (2 cores: under 10 minutes).
# The fields of the notebook's Config class, under this project's names:
#   d_model -> n_embd, n_layers -> n_layer, n_heads -> n_head, block_size, RMS eps -> norm_eps,
#   RoPE theta -> rope_theta, vocab_size (from the data), local experts -> n_expert,
#   experts per token -> n_expert_per_token, learning rate, batch size, eval interval.
# python prepare.py && python train.py config/llama_moe.py
out_dir = "out-llama-moe"
data_dir = "data/gutenberg_bpe8192"
arch = "llama"

n_embd = 256  # d_model
n_layer = 4
n_head = 4
n_kv_head = 2  # grouped-query attention: 2 query heads per key/value head
block_size = 256
norm_eps = 1e-5
rope_theta = 10000.0
no_rope_interval = 4  # the 4th layer has no RoPE (iRoPE)
qk_norm = True

n_expert = 4  # in every layer: a router, 4 SwiGLU experts and 1 shared expert
n_expert_per_token = 1
d_expert = 512  # each expert (and the shared one) is a SwiGLU of width 512: a token uses 2 of them,
moe_every = 1  # as many active weights as a dense SwiGLU of width 1024 (--moe_every=0 --d_ff=1024)
aux_loss_coef = 0.01
z_loss_coef = 0.001

batch_size = 16
learning_rate = 2e-3
warmup_iters = 50
max_iters = 400
max_time = 570.0
eval_interval = 100
eval_iters = 10
log_interval = 10
