"""Write a randomly initialised Hugging Face Llama with a byte-level BPE tokenizer: the base the
fine-tuning benchmark imports (`make bench-finetune`), of the shape that
`../shared/bench/hf_train_ref.py` builds by default.

    python -m experiments.random_hf_model --text=../shared/data/tinyshakespeare.txt \\
        --hf_dir=runs/bench_llama_hf
    python -m experiments.import_checkpoint --hf_dir=runs/bench_llama_hf \\
        --workdir=runs/bench_llama

Defaults: 6 layers, width 512, 8 heads, 4 KV heads, MLP 1408, vocab 8192, context 256, untied
output head (about 26M parameters), drawn as `transformers` initialises a Llama (seed 0) and
saved with `save_pretrained` (float32 safetensors). The tokenizer is a byte-level BPE trained on
`--text` with at most `--vocab` tokens (`<pad>`, `<s>`, `</s>` are ids 0, 1, 2, the config's bos
and eos); a small text may give fewer, and the model's vocabulary stays `--vocab`.
Needs torch, transformers and tokenizers.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from experiments.common import parse_flags, user_errors_as_one_line
from genai_jax.errors import UserError

_HF_DIR = flags.DEFINE_string("hf_dir", None, "the Hugging Face directory to write (new)")
_TEXT = flags.DEFINE_string("text", None, "a text file to train the tokenizer on")
_LAYERS = flags.DEFINE_integer("layers", 6, "transformer blocks")
_DIM = flags.DEFINE_integer("dim", 512, "width")
_HEADS = flags.DEFINE_integer("heads", 8, "query heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "key/value heads")
_MLP = flags.DEFINE_integer("mlp", 1408, "MLP hidden width")
_VOCAB = flags.DEFINE_integer("vocab", 8192, "model vocabulary (the tokenizer's at most)")
_CTX = flags.DEFINE_integer("ctx", 256, "context (max_position_embeddings)")
_SEED = flags.DEFINE_integer("seed", 0, "torch seed of the weights")
flags.mark_flags_as_required(["hf_dir", "text"])


def train_tokenizer(text_file: pathlib.Path, vocab_size: int):
    """A byte-level BPE (`transformers.PreTrainedTokenizerFast`) trained on `text_file`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text_file)], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def random_llama(layers: int, dim: int, heads: int, kv_heads: int, mlp: int, vocab: int,
                 ctx: int, seed: int = 0):
    """A `transformers` Llama with its own random initialisation, float32, untied head."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=ctx,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@user_errors_as_one_line
def main(argv):
    del argv
    out, text = pathlib.Path(_HF_DIR.value), pathlib.Path(_TEXT.value)
    if not text.is_file():
        raise UserError(f"--text {text} is not a file")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--hf_dir {out} is not empty: write into a new directory")
    tokenizer = train_tokenizer(text, _VOCAB.value)
    model = random_llama(_LAYERS.value, _DIM.value, _HEADS.value, _KV_HEADS.value, _MLP.value,
                         _VOCAB.value, _CTX.value, _SEED.value)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a random Llama ({n / 1e6:.1f}M parameters, vocab {_VOCAB.value}; tokenizer "
          f"{len(tokenizer)} tokens) to {out}")


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
