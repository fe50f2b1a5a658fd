"""The serving benchmark's model: a GPT-2 of 6 layers, width 384, 6 heads, context 256, trained
briefly on tiny shakespeare, exported to Hugging Face format for the `transformers` peer.

GPT-2's layout exactly (learned positions, LayerNorm, GELU with the tanh approximation, biases,
tied head), so `experiments.export_checkpoint` writes it as `GPT2LMHeadModel`. The tokenizer is
a byte-level BPE of 2048 tokens trained on the training split (`bpe:2048`, seconds to build)
rather than GPT-2's own 50,257: with GPT-2's vocabulary the tied head (19.3M weights) would be
larger than the six blocks (10.6M) and take most of each training and decode step, and the few
minutes of training here would barely touch its rows. The benchmark decodes random token ids
with `ignore_eos`, so the loss only needs to be a trained model's, not a good one. AdamW lr 1e-3,
batch 8 x 256, 300 steps.

    python -m experiments.train --config=experiments/configs/gpt2_serve.py \\
        --config.data.path=../shared/data/tinyshakespeare.txt --workdir=runs/serve_gpt2
    python -m experiments.export_checkpoint --workdir=runs/serve_gpt2 --hf_dir=runs/serve_gpt2_hf
    python -m experiments.serve_bench --workdir=runs/serve_gpt2 --clients=16 --prompt_tokens=32 \\
        --max_tokens=64 --peer=../shared/bench/hf_generate_ref.py --hf_dir=runs/serve_gpt2_hf

(`make bench-serve` runs all three.) Measured on 2 cores of an AMD EPYC (Zen 4): 1.44 s per
step alone (~7 minutes; 12 when the machine was shared), validation loss 4.71 nats per token at
step 300 (20 batches). Serving 16 concurrent streamed clients (12eb95d and e4a3508, two runs):
1,212 and 1,020 tokens/s, against `transformers` `generate`'s 105 and 119 one request at a time
(11.5x, 8.6x) and 679 and 757 for all 16 in one padded batch (1.79x, 1.35x); see the README.
"""

from genai_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(name="text_file", path="", tokenizer="bpe:2048", validation_fraction=0.1)
    config.model.update(block_size=256, num_layers=6, num_heads=6, embed_dim=384, dropout=0.0,
                        position="learned", norm="layernorm", mlp="gelu_tanh", use_bias=True,
                        tie_embeddings=True)
    config.train.update(steps=300, batch_size=8, learning_rate=1e-3, min_learning_rate=1e-4,
                        warmup_steps=30, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=1.0,
                        log_every=50, steps_per_call=10)
    config.eval.update(every=300, steps=20)
    config.checkpoint.every = 300
    config.sample.update(prompt="\n", max_new_tokens=100, temperature=0.8)
    return config
