"""Data sets (TFDS data sources) and the input pipeline (batches of numpy arrays).

The names below are imported when first used (PEP 562), so that importing one module of the
package (e.g. `genai_jax.data.prepare` in `prepare_data`'s worker processes) does not import
the pipeline, Grain and JAX with it.
"""

import importlib

_EXPORTS = {
    "eval_batches": "genai_jax.data.lm_batches", "sequential_batches": "genai_jax.data.lm_batches",
    "Batches": "genai_jax.data.loader", "Pipeline": "genai_jax.data.pipeline",
    "build": "genai_jax.data.pipeline", "TextData": "genai_jax.data.text",
    "load_text": "genai_jax.data.text", "DataError": "genai_jax.errors",
    "HFTokenizer": "genai_jax.tokenization", "Tokenizer": "genai_jax.tokenization",
    "load_tokenizer": "genai_jax.tokenization", "make_tokenizer": "genai_jax.tokenization",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def defaults(modality: str) -> dict:
    """The `data.*` config keys of a data modality ("text" or "image")."""
    # workers: reader processes (0: a thread of the training process); prefetch: stacks of
    # batches read ahead (per worker). The defaults suit a 2-core machine.
    # Privacy audits (`experiments.privacy_audit`): nonmember_fraction of the training units
    # (windows, images) held out at random as non-members, at most max_members of the rest
    # trained on (0: all).
    common = dict(path="", data_dir="", validation_fraction=0.1, workers=0, prefetch=2,
                  nonmember_fraction=0.0, max_members=0)
    if modality == "text":
        return dict(name="stdlib_code", tokenizer="byte", train_split="train",
                    eval_split="validation", text_key="text", packing=False, mixture="",
                    # canaries random secrets, each written into canary_repeats training windows
                    canaries=0, canary_repeats=1, **common)
    # name: "digits" (embedded), "mnist_idx" / "image_folder" (data.path), a toy
    # ("ring8", "moons", "swiss_roll"), or a TFDS catalog name ("mnist", "cifar10", ...).
    # random_crop: pixels of zero padding to crop from at random (0: off); random_flip: flip
    # horizontally half the time (off: wrong for digits). Training batches only.
    return dict(name="digits", train_split="train", eval_split="test", image_key="image",
                label_key="label", num_points=20_000, random_crop=0, random_flip=False,
                **common)


__all__ = ["Batches", "DataError", "HFTokenizer", "Pipeline", "TextData", "Tokenizer", "build",
           "defaults", "eval_batches", "load_text", "load_tokenizer", "make_tokenizer",
           "sequential_batches"]
