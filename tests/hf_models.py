"""Small Hugging Face models with random weights, saved with `save_pretrained` (safetensors), for
the interop tests. Every parameter is drawn at a scale of 0.2-0.5 (norm weights around 1), so a
wrong layout (a transposed kernel, half-split vs interleaved rotary) changes logits by O(1)."""

from __future__ import annotations

import pathlib

import numpy as np

VOCAB, WIDTH, LAYERS, CONTEXT = 300, 64, 2, 64

CONFIGS = {
    "gpt2": dict(n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_positions=CONTEXT, n_inner=96),
    "llama": dict(hidden_size=WIDTH, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16},
                  tie_word_embeddings=False),
    "mistral": dict(hidden_size=WIDTH, intermediate_size=96, num_hidden_layers=LAYERS,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                    max_position_embeddings=CONTEXT, sliding_window=None,
                    tie_word_embeddings=True),
    "qwen2": dict(hidden_size=WIDTH, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                  tie_word_embeddings=True),
}


def make_model(kind: str, directory: pathlib.Path, *, seed: int = 0, **overrides):
    """A random `kind` model saved in `directory`; returns the torch model (eval mode)."""
    import torch
    import transformers

    config_class = transformers.CONFIG_MAPPING[kind]
    config = config_class(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                          **{**CONFIGS[kind], **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight")
                        else 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tokenizer(directory: pathlib.Path, vocab_size: int = 280) -> None:
    """A byte-level BPE tokenizer trained on a little English, saved next to a model the way
    `transformers` saves one (`tokenizer.json`, `tokenizer_config.json` with a chat template);
    `<s>` and `</s>` are ids 1 and 2, as in the models' configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog.", "def main():\n    return 42\n",
            "Hello, world! Shakespeare wrote plays and sonnets."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
