# The course's exact settings (TP, part 3): GPT-2 tokenizer, 2 layers, d_model 256, 4 heads, d_ff 512,
# 128-token windows, batch 32, AdamW at lr 1e-3 (constant: no warmup, no decay), no dropout.
# Here with the residual connections and LayerNorms the course's model lacks.
# python prepare.py --tokenizer=gpt2 && python train.py config/tp_seed.py
out_dir = "out-tp-seed"
data_dir = "data/gutenberg_gpt2"

n_layer = 2
n_head = 4
n_embd = 256
d_ff = 512
block_size = 128
dropout = 0.0
bias = True  # the course's nn.Linear layers have biases

batch_size = 32
learning_rate = 1e-3
min_lr = 1e-3  # a constant learning rate, as in the course
warmup_iters = 0
weight_decay = 0.01  # torch.optim.AdamW's default
max_iters = 100_000
max_time = 600.0  # 10 minutes, for comparisons at a fixed budget

eval_interval = 200
eval_iters = 10
