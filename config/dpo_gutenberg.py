# DPO on the default model with self-play pairs (SPIN): the model learns to prefer the books' true
# continuations to its own samples. About 4 minutes on 2 CPU cores, pairs included (docs/experiments.md).
# python train.py config/gutenberg.py && python dpo.py config/dpo_gutenberg.py
# The loss settings are dpo.py's defaults, the best of the sweep in docs/experiments.md: 32-token prompts and
# 192-token completions, beta 0.03, learning rate 3e-4, 16 pairs a step (held out 0.82 on the default model).
init_from = "out-gutenberg"
out_dir = "out-gutenberg-dpo"
make_pairs = 1500  # and 150 held out, from the validation books

dtype = "auto"  # as config/gutenberg.py: bf16 autocast where the device computes bf16 fast, else float32

max_iters = 150  # 2,400 pairs drawn at random (with replacement): about 1.6 passes
max_time = 240.0  # seconds of training (the steps that fit are counted early, the schedule ends there): under 10 minutes in all
eval_interval = 50
log_interval = 10
