# A larger GPT for one CUDA GPU (bf16, torch.compile and flash attention switch on by themselves):
# 12 layers of width 768 (GPT-2 small's shape, 92M parameters with the 8k French BPE), 1024-token context.
# python prepare.py && python train.py config/gutenberg_gpu.py
# Several GPUs: torchrun --standalone --nproc_per_node=8 train.py config/gutenberg_gpu.py (the same
# global batch, shared out: 2 GPUs take 2 micro-steps of 16 sequences each, 4 take 1, 8 take 1 of 8)
out_dir = "out-gutenberg-gpu"
data_dir = "data/gutenberg_bpe8192"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.1  # the corpus is small (10.6M tokens): several epochs, so regularise

batch_size = 16
gradient_accumulation_steps = 4  # 4 x 16 x 1024 = 65k tokens per iteration, whatever the number of GPUs
learning_rate = 6e-4
warmup_iters = 200
max_iters = 5000  # about 30 passes over the corpus
weight_decay = 0.1

eval_interval = 250
eval_iters = 50
