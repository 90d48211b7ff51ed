# DPO on the default model with self-play pairs (SPIN): the model learns to prefer the books' true
# continuations to its own samples. About 5 minutes on 2 CPU cores, pairs included (docs/experiments.md).
# python train.py config/gutenberg.py && python dpo.py config/dpo_gutenberg.py
# The loss settings are dpo.py's defaults, the best of the sweep in docs/experiments.md: 32-token prompts and
# 192-token completions, beta 0.03, learning rate 3e-4, 16 pairs a step. More pairs is what still helps:
# held out 0.82 from 1,500 pairs and 150 steps; from 3,000 pairs and 250 steps, 0.903 (5:07, 6.7 GB peak).
init_from = "out-gutenberg"
out_dir = "out-gutenberg-dpo"
make_pairs = 3000  # and 300 held out, from the validation books

dtype = "auto"  # as config/gutenberg.py: bf16 autocast where the device computes bf16 fast, else float32

max_iters = 250  # 4,000 pairs drawn at random (with replacement): about 1.3 passes
max_time = 300.0  # seconds of training (the steps that fit are counted early, the schedule ends there): under 10 minutes in all
eval_interval = 50
log_interval = 10
