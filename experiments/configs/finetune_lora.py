"""LoRA fine-tuning: low-rank adapters (rank 8, alpha 16) on the attention projections of a
pretrained model; the base stays frozen and only the adapters have optimizer state.

As `finetune_full.py` (`config.init_from=W`, the model and tokenizer inherited, your data in
`data.*`), with `model.lora.rank=8`, `.alpha=16`, `.dropout=0`, `.targets="attention"` (q, k, v,
out; "all" adds the MLP's gate, up and down) and a larger learning rate, 1e-3 (cosine to 1e-4).
`model.lora.modules_to_save` ("embed", "head"; PEFT's `modules_to_save`) trains those modules
whole beside the adapters: what a base needs on text unlike its own (the README's
demonstration, a code model fine-tuned on Shakespeare, uses `targets="all"`,
`modules_to_save="embed,head"` and lr 3e-3). The base may be kept in bfloat16
(`--config.model.param_dtype=bfloat16`); the adapters and saved modules are float32. Export
merges the adapters into the weights, or writes them (and the saved modules) alone as a PEFT
adapter (`experiments.export_checkpoint --adapter_only`).

    python -m experiments.train --config=experiments/configs/finetune_lora.py \\
        --config.init_from=runs/llama_code_hf \\
        --config.data.path=../shared/data/tinyshakespeare.txt \\
        --workdir=runs/ft_lora

Measured: see the README's "Fine-tuning a pretrained model" (the demonstration).
"""

from experiments.configs import finetune_full


def get_config():
    config = finetune_full.get_config()
    config.model.lora.update(rank=8, alpha=16.0, dropout=0.0, targets="attention")
    config.train.update(learning_rate=1e-3, min_learning_rate=1e-4)
    return config
