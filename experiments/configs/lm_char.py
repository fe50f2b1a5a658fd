"""nanoGPT's "baby GPT" CPU recipe: a character-level GPT on a text file of your choice.

4 layers, 4 heads, width 128, block 64, batch 12, dropout 0; AdamW lr 1e-3, betas (0.9, 0.99),
weight decay 0.1, 100 warm-up steps, cosine to 1e-4, grad clip 1.0, 2000 steps; the vocabulary
is the characters of the file; the first 90% of the text trains, the last 10% validates.
One change from nanoGPT's GPT-2 layout: rotary position embeddings instead of a learned
position table (`--config.model.position=learned` restores it); same shape, same step count.

    python -m experiments.train --config=experiments/configs/lm_char.py \\
        --config.data.path=../shared/data/tinyshakespeare.txt --workdir=runs/shakespeare_char

Expect on tiny shakespeare (2 CPU cores, ~1.5 minutes): validation loss 1.77 at step 2000 over
200 random batches (1.774 and 1.768 with seeds 0 and 1; 1.83 already at step 1500), and
Shakespeare-like samples. With learned positions the recipe lands at 1.90, like the PyTorch peer
of the same shape (../shared/bench/torch_gpt_ref.py --text: 1.898) and nanoGPT's published ~1.88
(20 eval batches).
"""

from genai_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(name="text_file", path="", tokenizer="char", validation_fraction=0.1)
    config.model.update(block_size=64, num_layers=4, num_heads=4, embed_dim=128, dropout=0.0,
                        position="rotary")
    config.train.update(steps=2000, batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4,
                        warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=1.0,
                        log_every=100, steps_per_call=10)
    config.eval.update(every=500, steps=200)
    config.checkpoint.every = 1000
    config.sample.update(prompt="\n", max_new_tokens=500, temperature=0.8)
    return config
