"""LoRA fine-tuning: low-rank adapters (rank 8, alpha 16) on the attention projections of a
pretrained model; the base stays frozen and only the adapters have optimizer state.

As `finetune_full.py` (`config.init_from=W`, the model and tokenizer inherited, your data in
`data.*`), with `model.lora.rank=8`, `.alpha=16`, `.dropout=0`, `.targets="attention"` (q, k, v,
out; "all" adds the MLP's gate, up and down) and a larger learning rate, 1e-3 (cosine to 1e-4).
The base may be kept in bfloat16 (`--config.model.param_dtype=bfloat16`); the adapters are
float32. Export merges the adapters into the weights, or writes them alone as a PEFT adapter
(`experiments.export_checkpoint --adapter_only`).

    python -m experiments.train --config=experiments/configs/finetune_lora.py \\
        --config.init_from=runs/llama_code_hf \\
        --config.data.path=../shared/data/tinyshakespeare.txt \\
        --workdir=runs/ft_lora

Measured: see the README's "Fine-tuning a pretrained model" (the demonstration).
"""

from genai_jax.config import base_config


def get_config():
    config = base_config()
    config.init_from = ""  # required: --config.init_from=WORKDIR
    config.data.update(name="text_file", path="", validation_fraction=0.1)
    config.model.lora.update(rank=8, alpha=16.0, dropout=0.0, targets="attention")
    config.train.update(steps=1000, batch_size=16, learning_rate=1e-3, min_learning_rate=1e-4,
                        warmup_steps=50, b2=0.95, weight_decay=0.1, log_every=50,
                        steps_per_call=10)
    config.eval.update(every=100, steps=20)
    config.checkpoint.every = 500
    config.sample.update(prompt="\n", max_new_tokens=200, temperature=0.8)
    return config
