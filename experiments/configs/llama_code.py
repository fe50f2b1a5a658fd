"""A small Llama-style model with its own BPE tokenizer, pretrained on the embedded code corpus
(this interpreter's standard library): the base model of the fine-tuning demonstration.

RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention (4 heads, 2 KV heads), no biases,
untied head: the layout of Llama, so it exports as one (`experiments.export_checkpoint`). Width
192, 4 layers, MLP 512, context 128 (2.4M parameters with the embeddings). The tokenizer is a
byte-level BPE of 2048 tokens trained on the training split (`bpe:2048`, saved in the workdir as
`tokenizer.json`). AdamW lr 2e-3 (betas 0.9, 0.95), batch 16, 1000 steps.

    python -m experiments.train --config=experiments/configs/llama_code.py --workdir=runs/llama_code

See the README's "Fine-tuning a pretrained model" for the whole demonstration and its figures.
"""

from genai_jax.config import base_config


def get_config():
    config = base_config()
    config.data.update(name="stdlib_code", tokenizer="bpe:2048")
    config.model.update(block_size=128, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=192,
                        mlp_dim=512, mlp="swiglu", norm="rmsnorm", position="rotary",
                        use_bias=False, tie_embeddings=False)
    config.train.update(steps=1000, batch_size=16, learning_rate=2e-3, min_learning_rate=2e-4,
                        warmup_steps=100, b2=0.95, log_every=50, steps_per_call=10)
    config.eval.update(every=500, steps=20)
    config.checkpoint.every = 500
    config.sample.update(prompt="def ", max_new_tokens=100, temperature=0.8)
    return config
