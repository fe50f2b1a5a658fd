"""The input pipeline the trainer drives: training batches by step, fixed evaluation batches,
and what the model needs to know about the data."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from genai_jax.config_checks import federated_enabled, privacy_enabled
from genai_jax.data import federated, instructions, lm_batches, private, shards
from genai_jax.data.images import Augment, image_batches, load_images
from genai_jax.data.images import eval_batches as image_eval_batches
from genai_jax.data.loader import Batches
from genai_jax.data.text import prepared_text
from genai_jax.tokenization.tokenizers import (
    DataError,
    end_of_document,
    load_tokenizer,
    make_tokenizer,
    parse_spec,
)

IMAGE_INFO_FILE = "data_info.json"  # the example shape and classes a saved image model expects


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """`train` gives the global batch of each step (`loader.Batches`: `batch(step,
    process_index, process_count)` for one, `iterator(...)` to read ahead); `eval` is a fixed
    list of global batches; `info` is what the model family needs (e.g. the tokenizer)."""

    train: Batches
    eval: list[dict]
    info: dict

    def save(self, workdir: pathlib.Path) -> None:
        if "tokenizer" in self.info:
            self.info["tokenizer"].save(workdir)
        if "shape" in self.info:
            (workdir / IMAGE_INFO_FILE).write_text(json.dumps(_shape_info(self.info)) + "\n")


def build(config, modality: str, workdir: pathlib.Path | None = None,
          batch_multiple: int = 1) -> Pipeline:
    """The pipeline for `config`; a tokenizer saved in `workdir` is reused (resume), else that
    of the run `config.init_from` names (fine-tuning keeps its base model's tokenizer).

    In `units_mode` (DP-SGD, a privacy audit's split or canaries) training draws from fixed
    privacy units (`genai_jax.data.private`), under DP-SGD in Poisson-sampled batches padded to
    a multiple of `batch_multiple` rows; `info` then has their number (`privacy_units`) and
    the audit's split (`audit`). In federated training (`train.federated`) a step is a round
    of the clients' rows (`genai_jax.data.federated`: client slots a multiple of
    `batch_multiple`); `info["federated"]` describes them, `privacy_units` is the number of
    clients (DP-FedAvg's unit) and `examples_per_step` the examples of a round."""
    if modality == "image":
        return _image_pipeline(config, workdir, batch_multiple)
    if modality != "text":
        raise DataError(f"no input pipeline for data of modality {modality!r}")
    saved = None
    for directory in (workdir, config.get("init_from")):
        if directory and saved is None:
            saved = load_tokenizer(pathlib.Path(directory))
    eval_batch = config.eval.batch_size or config.train.batch_size
    if units_mode(config) and (config.data.name == "instructions" or config.data.mixture):
        raise DataError("DP-SGD and privacy audits (train.privacy, data.nonmember_fraction, "
                        "data.max_members, data.canaries) train on fixed windows of one token "
                        "stream: data.name='instructions' and data.mixture are not supported yet")
    if federated_enabled(config) and (config.data.name == "instructions"
                                      or config.data.mixture):
        raise DataError("federated training partitions one token stream into clients: "
                        "data.name='instructions' and data.mixture are not supported yet")
    if config.data.name == "instructions":
        return _instruction_pipeline(config, saved, eval_batch)
    if config.data.name == "array_record":
        return _text_units(config, _array_record_pipeline(config, saved, eval_batch),
                           batch_multiple)
    if config.data.mixture:
        raise DataError("data.mixture mixes prepared directories: set "
                        "data.name='array_record' (experiments.prepare_data writes them)")
    # A text file, the embedded corpus or a TFDS set: tokenised once into the cache, read from
    # there as prepared shards are.
    return _text_units(config, _token_pipeline(
        config, saved, eval_batch, [(str(prepared_text(config.data, saved)), 1.0)]),
        batch_multiple)


def units_mode(config) -> bool:
    """Whether training draws from fixed privacy units (`genai_jax.data.private`): under
    DP-SGD, and for a privacy audit's member / non-member split and canaries (federated
    training draws from its clients instead)."""
    if federated_enabled(config):
        return False
    d = config.data
    return privacy_enabled(config) or bool(d.get("nonmember_fraction") or d.get("max_members")
                                          or d.get("canaries"))


def _text_units(config, pipeline: Pipeline, batch_multiple: int) -> Pipeline:
    """`pipeline` training on fixed units of its training stream: in federated training, the
    rounds of the clients it is partitioned into; when `units_mode`, non-overlapping windows
    (`private.WindowUnits`): the members of an audit split, canaries written into some,
    sampled by DP-SGD's batches or shuffled epoch by epoch."""
    if not units_mode(config) and not federated_enabled(config):
        return pipeline
    if "train_tokens" not in pipeline.info:
        raise DataError("DP-SGD, privacy audits and federated training train on fixed units of "
                        "a token stream: raw text tokenised on the fly is not supported yet "
                        "(prepare the data with a tokenizer)")
    d, block, info = config.data, config.model.block_size, pipeline.info
    if federated_enabled(config):
        clients = federated.text_clients(config, info["train_tokens"], info["tokenizer"],
                                         info["end_of_document"])
        return _rounds_of(config, pipeline, clients, batch_multiple)
    tokens = info["train_tokens"]
    members, nonmembers = private.split_units(len(tokens) // (block + 1), d.nonmember_fraction,
                                              d.max_members, config.seed)
    secrets = private.canary_secrets(d.canaries, config.seed)
    tokenizer = info["tokenizer"]
    patches = private.canary_patches(
        secrets, lambda text: tokenizer.encode(text, "a canary"), members, d.canary_repeats,
        block, config.seed) if secrets else None
    units = private.WindowUnits(tokens, block, info["end_of_document"], patches)
    audit = {"units": units, "members": members, "nonmembers": nonmembers, "canaries": secrets}
    return dataclasses.replace(pipeline, train=_unit_batches(
        config, private.Subset(units, members), batch_multiple), info={
        **info, "privacy_units": len(members), "audit": audit})


def _rounds_of(config, pipeline: Pipeline, clients, batch_multiple: int, augment=None
               ) -> Pipeline:
    """`pipeline` training on the rounds of `clients` (`federated.client_batches`)."""
    train, fed = federated.client_batches(clients, config, batch_multiple, augment)
    return dataclasses.replace(pipeline, train=train, info={
        **pipeline.info, "federated": fed, "privacy_units": fed["num_clients"],
        "examples_per_step": fed["examples_per_round"]})


def _unit_batches(config, units, batch_multiple: int, augment=None) -> Batches:
    """DP-SGD's batches of `units`, or, for a non-private run, every unit once per epoch in a
    seeded order (`image_batches` does that for any examples)."""
    if privacy_enabled(config):
        return private.private_batches(units, config.train.privacy, config.train.batch_size,
                                       config.train.steps, config.seed, batch_multiple, augment)
    return image_batches(units, config.train.batch_size, config.seed, augment)


def _instruction_pipeline(config, tokenizer, eval_batch: int) -> Pipeline:
    """Packed instruction windows (`genai_jax.data.instructions`) from the JSONL at data.path."""
    if tokenizer is None:
        tokenizer = instructions.new_tokenizer(config.data.tokenizer, config.data.path)
    data = instructions.load_instructions(config.data, tokenizer, config.model.block_size,
                                          config.seed)
    return Pipeline(
        train=instructions.packed_batches(data.train, config.train.batch_size, config.seed),
        eval=instructions.eval_batches(data.validation, eval_batch, config.eval.steps),
        info={"tokenizer": tokenizer, "bytes_per_token": data.bytes_per_token,
              "validation_windows": data.validation})


def _array_record_pipeline(config, saved, eval_batch: int) -> Pipeline:
    """Windows of the token streams `experiments.prepare_data` wrote to data.path (or to each
    directory of `data.mixture`, drawn in its proportions), read from the shards as they are
    needed (`shards.TokenStream`)."""
    sources = _mixture(config.data) if config.data.mixture else [(config.data.path, 1.0)]
    if len(sources) == 1:
        directory = _directory(sources[0][0])
        index = shards.read_index(directory)
        if index["kind"] == "raw_text":
            return _raw_text_pipeline(config, saved, eval_batch, directory, index)
    return _token_pipeline(config, saved, eval_batch, sources)


def _token_pipeline(config, saved, eval_batch: int, sources: list[tuple[str, float]]
                    ) -> Pipeline:
    """Windows of the token streams of prepared directories `[(DIR, weight), ...]`, drawn in
    their proportions."""
    streams, weights, bytes_per_token, fingerprints = [], [], 0.0, set()
    for path, weight in sources:
        directory, index, tokenizer = _prepared(config, path, saved)
        fingerprints.add(index["tokenizer_sha256"])
        split_streams = {s: shards.TokenStream(directory, index, s) for s in shards.SPLITS}
        for stream in split_streams.values():
            stream.check()
        streams.append(split_streams)
        weights.append(weight)
        validation = index["splits"]["validation"]
        bytes_per_token += weight * validation["bytes"] / validation["tokens"]
    if len(fingerprints) > 1:
        raise DataError(f"the directories of data.mixture={config.data.mixture!r} were "
                        "tokenised with different vocabularies: prepare them with one tokenizer")
    end = index["end_of_document"] if config.data.packing else None
    if config.data.packing and end is None:
        raise DataError(f"data.packing=true needs an end-of-document token, and the "
                        f"{config.data.tokenizer!r} tokenizer has none")
    block, batch = config.model.block_size, config.train.batch_size
    windows = lambda split, size, seed: lm_batches.mixture(
        [s[split] for s in streams], weights, size, block, seed, end)
    return Pipeline(
        train=windows("train", batch, config.seed),
        eval=lm_batches.eval_batches(windows("validation", eval_batch, config.seed + 1),
                                     config.eval.steps),
        info={"tokenizer": saved or tokenizer, "bytes_per_token": bytes_per_token / sum(weights),
              # the whole streams of one source (not a mixture): experiments.evaluate reads
              # the held-out one, DP-SGD samples windows of the training one
              **({"validation_tokens": streams[0]["validation"],
                  "train_tokens": streams[0]["train"], "end_of_document": end}
                 if len(streams) == 1 else {})})


def _raw_text_pipeline(config, saved, eval_batch: int, directory: pathlib.Path,
                       index: dict) -> Pipeline:
    """Windows tokenised on the fly (`lm_batches.TokenizedWindow`, in the data workers) from
    the raw text records of a `prepare_data --tokenizer=none` directory."""
    if parse_spec(config.data.tokenizer)[0] in ("char", "bpe"):
        raise DataError(f"data.tokenizer={config.data.tokenizer!r} is built from the data, so "
                        f"it cannot tokenise {directory} on the fly: prepare the data with "
                        f"--tokenizer={config.data.tokenizer}, or use byte, gpt2 or hf:DIR")
    tokenizer = saved or make_tokenizer(config.data.tokenizer, b"", f"data.path {directory}")
    end = end_of_document(tokenizer)
    if end is None:
        raise DataError(f"the {config.data.tokenizer!r} tokenizer has no end-of-document token")
    records = {split: shards.TextRecords(directory, index, split) for split in shards.SPLITS}
    for split_records in records.values():
        split_records.check()
    block, batch = config.model.block_size, config.train.batch_size

    windows = lambda split, size, seed: lm_batches.tokenized_windows(
        records[split], tokenizer, size, block, seed, end, config.data.packing)
    # Bits per byte needs the validation split's bytes per token: from its first MB of text.
    n_bytes = n_tokens = 0
    for i in range(len(records["validation"])):
        text, ends = records["validation"][i]
        n_bytes += len(text) + ends
        n_tokens += len(tokenizer.encode(text, "the validation split")) + ends
        if n_bytes > 1 << 20:
            break
    return Pipeline(train=windows("train", batch, config.seed),
                    eval=lm_batches.eval_batches(windows("validation", eval_batch,
                                                         config.seed + 1), config.eval.steps),
                    info={"tokenizer": tokenizer, "bytes_per_token": n_bytes / n_tokens})


def _directory(path: str) -> pathlib.Path:
    if not path:
        raise DataError("data.name='array_record' needs data.path: pass "
                        "--config.data.path=DIR (written by experiments.prepare_data)")
    return pathlib.Path(path).expanduser()


def _mixture(data_cfg) -> list[tuple[str, float]]:
    """`data.mixture="DIR:WEIGHT,DIR:WEIGHT,..."` -> [(DIR, weight), ...]."""
    sources = []
    for part in (p.strip() for p in data_cfg.mixture.split(",") if p.strip()):
        path, sep, weight = part.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not path or not value > 0:
            raise DataError(f"data.mixture part {part!r} is not DIR:WEIGHT with a positive "
                            "weight (e.g. data.mixture=/data/web:0.7,/data/code:0.3)")
        sources.append((path, value))
    if not sources:
        raise DataError(f"data.mixture={data_cfg.mixture!r} names no directory")
    return sources


def _prepared(config, path: str, saved):
    """(directory, index, tokenizer) of a prepared directory, checked against the config's
    tokenizer and the run's saved one."""
    directory = _directory(path)
    index = shards.read_index(directory)
    if index["kind"] != "text":
        raise DataError(f"{directory} holds {index['kind']} data, not tokenised text "
                        "(raw text is read alone, not in a data.mixture)")
    if config.data.tokenizer != index["tokenizer"]:
        raise DataError(f"{directory} was tokenised with {index['tokenizer']!r} and the config "
                        f"has data.tokenizer={config.data.tokenizer!r}: set "
                        f"--config.data.tokenizer={index['tokenizer']} or prepare the data again")
    tokenizer = load_tokenizer(directory)
    if tokenizer is None:
        raise DataError(f"{directory} has no tokenizer files: prepare the data again")
    if saved is not None and shards.tokenizer_sha256(saved) != index["tokenizer_sha256"]:
        raise DataError(f"{directory} was tokenised with another {index['tokenizer']!r} "
                        "tokenizer than this run's (another vocabulary): use the data the run "
                        "was trained on, or a new --workdir")
    return directory, index, tokenizer


def _shape_info(info: dict) -> dict:
    return {"shape": list(info["shape"]), "num_classes": info["num_classes"]}


def _image_pipeline(config, workdir: pathlib.Path | None, batch_multiple: int) -> Pipeline:
    data = load_images(config.data, config.seed)
    saved = workdir / IMAGE_INFO_FILE if workdir else None
    if saved and saved.exists():
        expected, found = json.loads(saved.read_text()), _shape_info(data.info)
        if expected != found:
            raise DataError(f"workdir {workdir} holds a model of examples {expected}, and "
                            f"{data.description} gives {found}: use a new --workdir or the "
                            "data it was trained on")
    eval_batch = config.eval.batch_size or config.train.batch_size
    augment = None
    if config.data.random_crop or config.data.random_flip:
        if data.kind != "image":
            raise DataError(f"data.random_crop / data.random_flip augment images, and "
                            f"{data.description} holds 2-D points")
        augment = Augment(config.data.random_crop, config.data.random_flip)
    info = data.info
    eval_ = image_eval_batches(data.validation, eval_batch, config.eval.steps)
    if federated_enabled(config):
        return _rounds_of(config, Pipeline(None, eval_, info),
                          federated.image_clients(config, data.train), batch_multiple, augment)
    if units_mode(config):  # the privacy unit: an image
        members, nonmembers = private.split_units(
            len(data.train), config.data.nonmember_fraction, config.data.max_members,
            config.seed)
        train = _unit_batches(config, private.Subset(data.train, members), batch_multiple,
                              augment)
        info = {**info, "privacy_units": len(members), "audit": {
            "units": data.train, "members": members, "nonmembers": nonmembers}}
    else:
        train = image_batches(data.train, config.train.batch_size, config.seed, augment)
    return Pipeline(train=train, eval=eval_, info=info)
