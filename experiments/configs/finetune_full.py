"""Full fine-tuning: every weight of a pretrained model trained on your text.

`config.init_from=W` names the model: a genai_jax workdir, trained (`experiments.train`) or
imported from Hugging Face (`experiments.import_checkpoint`). The run inherits its `model.*` keys
and its tokenizer; set `data.*` to your data: a text file (`data.name=text_file`, the default
here) or instruction data (`data.name=instructions`, JSONL of prompt/completion or chat
messages, packed windows, the loss on completions only). AdamW lr 1e-4 (betas 0.9, 0.95, weight
decay 0.1), 50 warm-up steps, cosine to 1e-5, batch 16, 1000 steps.

    python -m experiments.train --config=experiments/configs/finetune_full.py \\
        --config.init_from=runs/llama_code_hf \\
        --config.data.path=../shared/data/tinyshakespeare.txt \\
        --workdir=runs/ft_full

Measured: see the README's "Fine-tuning a pretrained model" (the demonstration).
"""

from genai_jax.config import base_config


def get_config():
    config = base_config()
    config.init_from = ""  # required: --config.init_from=WORKDIR
    config.data.update(name="text_file", path="", validation_fraction=0.1)
    config.train.update(steps=1000, batch_size=16, learning_rate=1e-4, min_learning_rate=1e-5,
                        warmup_steps=50, b2=0.95, weight_decay=0.1, log_every=50,
                        steps_per_call=10)
    config.eval.update(every=100, steps=20)
    config.checkpoint.every = 500
    config.sample.update(prompt="\n", max_new_tokens=200, temperature=0.8)
    return config
