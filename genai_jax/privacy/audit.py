"""Privacy audits of a trained model: what it leaks about the data it was trained on.

- Membership inference by loss: a model fits the windows it trained on better than windows it
  never saw. The members and non-members are privacy units of the same training split, split
  at random before training (`data.nonmember_fraction`, `genai_jax.data.private.split_units`),
  so the only difference between them is membership. Scores: minus the loss, or, given a
  reference model trained without them, the reference's loss minus the target's (the
  calibrated attack of Carlini et al., "Membership Inference Attacks From First Principles",
  2022, in its simplest form). Reported: ROC AUC and the true-positive rate at 1% false
  positives. A language model's loss is a window's next-token loss (`LMScorer`); an image
  family's, its own held-out evaluation of the image alone (`ImageScorer`).
- Canary exposure (Carlini et al., "The Secret Sharer", 2019): `data.canaries` random secrets
  "my PIN is d d d d d d" were written into `data.canary_repeats` training windows each; the
  audit ranks each secret's likelihood among all 10^6 candidates of its format. Exposure =
  log2(10^6) - log2(rank): ~1 bit for a secret the model did not learn, log2(10^6) = 19.9 for
  one it ranks first.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn import metrics as sk_metrics

from genai_jax.data.private import CANARY_DIGITS, CANARY_PREFIX
from genai_jax.errors import UserError
from genai_jax.models import lm
from genai_jax.models.transformer import Transformer, init_cache

CANDIDATES = 10 ** CANARY_DIGITS


def roc(member_scores, nonmember_scores) -> dict:
    """ROC AUC and the true-positive rate at a false-positive rate of at most 1% of a score
    that is higher for members."""
    scores = np.concatenate([member_scores, nonmember_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)
    return {"auc": float(sk_metrics.roc_auc_score(labels, scores)),
            "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max(initial=0.0)),
            "members": len(member_scores), "nonmembers": len(nonmember_scores),
            "curve": (fpr, tpr)}


@dataclasses.dataclass
class LMScorer:
    """What a trained LM (the parameters it evaluates with) makes of given tokens: windows'
    losses and canary candidates' log-likelihoods, on one device, compiled once per shape."""

    config: object
    params: object
    tokenizer: object
    chunk: int = 1024
    _scores: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        cfg = dataclasses.replace(lm.model_config(self.config, self.tokenizer.vocab_size),
                                  lora=None, lora_targets=())
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
        self.params = jax.device_get(self.params)

        def logprobs(params, inputs, positions=None, segment_ids=None):
            logits, _ = nnx.merge(graphdef, params)(inputs, positions=positions,
                                                    segment_ids=segment_ids)
            return jax.nn.log_softmax(logits.astype(jnp.float32))

        def nll(params, inputs, targets, positions, segment_ids):
            lp = logprobs(params, inputs, positions, segment_ids)
            return -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]

        def extend(params, tokens, start, cache):
            """Log-probabilities after `tokens` `[rows, n]` at positions start.., each row
            continuing its own cached context."""
            positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            logits, cache = nnx.merge(graphdef, params)(tokens, positions=positions,
                                                        cache=cache)
            return jax.nn.log_softmax(logits.astype(jnp.float32)), cache

        self._nll, self._extend = jax.jit(nll), jax.jit(extend)
        self._empty_cache = lambda rows, length: init_cache(cfg, rows, length)

    def example_losses(self, examples: list[dict]) -> np.ndarray:
        """Each window's mean next-token loss (over its `loss_mask` when packed)."""
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        nll = []
        for i in range(0, len(batch["inputs"]), self.chunk):
            rows = {k: jnp.asarray(v[i:i + self.chunk]) for k, v in batch.items()}
            nll.append(np.asarray(self._nll(self.params, rows["inputs"], rows["targets"],
                                            rows.get("positions"), rows.get("segment_ids"))))
        nll = np.concatenate(nll)
        mask = batch.get("loss_mask", np.ones_like(nll))
        return (nll * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)

    def exposure(self, secret: str) -> float:
        """Exposure in bits of `secret` ("d d d d d d") among all CANDIDATES secrets of its
        format after CANARY_PREFIX, from every candidate's log-likelihood."""
        scores = self.candidate_scores()
        index = int("".join(secret.split()))
        rank = 1 + int(np.sum(scores > scores[index]))
        return math.log2(CANDIDATES) - math.log2(rank)

    def candidate_scores(self) -> np.ndarray:
        """The log-likelihood `[10^6]` of each secret (candidate i: the digits of i) after
        CANARY_PREFIX, digits and spaces included: a function of the model alone, computed
        once. The candidates form a tree: the prefix is read once, then every partial secret
        grows by each digit and a space from its cached context, depth first, `chunk` rows at
        a time (1 + 10 + ... + 10^5 rows of two tokens); the last position's distribution
        scores the sixth digit."""
        if self._scores is None:
            digits = np.array([self._token(str(d)) for d in range(10)], np.int32)
            space = self._token(" ")
            prefix = np.asarray(self.tokenizer.encode(CANARY_PREFIX, "the canary prefix"),
                                np.int32)
            cache = self._empty_cache(1, len(prefix) + 2 * CANARY_DIGITS)
            lp, cache = self._extend(self.params, prefix[None], 0, cache)
            self._scores = self._grow(np.zeros(1), np.asarray(lp)[:, -1], cache, 0,
                                      len(prefix), digits, space)
        return self._scores

    def _grow(self, scores, next_lp, cache, depth, start, digits, space) -> np.ndarray:
        """The candidates below partial secrets of `depth` digits (and spaces) at position
        `start`, with log-likelihoods `scores` `[rows]`, next-token log-probabilities `next_lp`
        `[rows, vocab]` and KV `cache`, in order."""
        if depth == CANARY_DIGITS - 1:
            return (scores[:, None] + next_lp[:, digits]).ravel()  # the last digit
        out, step = [], max(self.chunk // 10, 1)
        for i in range(0, len(scores), step):
            part = slice(i, i + step)
            rows = len(scores[part])
            tokens = np.stack([np.tile(digits, rows), np.full(rows * 10, space)], 1)
            child = jax.tree.map(lambda c, p=part: jnp.repeat(c[p], 10, axis=0), cache)
            lp, child = self._extend(self.params, tokens, start, child)
            lp = np.asarray(lp)
            grown = (scores[part, None] + next_lp[part][:, digits]).ravel() + lp[:, 0, space]
            out.append(self._grow(grown, lp[:, 1], child, depth + 1, start + 2, digits, space))
        return np.concatenate(out)

    def _token(self, char: str) -> int:
        ids = self.tokenizer.encode(char, "a canary")
        if len(ids) != 1:
            raise UserError(f"canary exposure needs a tokenizer that encodes each digit and "
                            f"the space alone (byte, char): this one encodes {char!r} as "
                            f"{list(ids)}")
        return int(ids[0])


# The held-out metric of `Family.eval_step` an image family's membership is scored by (one
# example at a time), whether it is higher for members, and how many copies of the example
# one evaluation sees: the VAE's importance-weighted NLL bound (its draws are the example's
# own, by `index`); the diffusion loss over 16 timesteps spread over the schedule (eval_step
# spreads its batch's rows over them); the GAN discriminator's logit on the real image.
IMAGE_SCORES = {"vae": ("nll_nats", False, 1), "diffusion": ("loss", False, 16),
                "gan": ("d_real", True, 1)}


@dataclasses.dataclass
class ImageScorer:
    """What a trained image model makes of given training images: a membership loss per
    image (lower: more member-like), from the family's own held-out evaluation of that image
    alone (`IMAGE_SCORES`), `chunk` images per compiled call on one device."""

    family_name: str
    family: object  # genai_jax.models.Family
    state: object
    chunk: int = 64

    def __post_init__(self):
        from genai_jax import parallel

        metric, higher_is_member, copies = IMAGE_SCORES[self.family_name]
        sign = -1.0 if higher_is_member else 1.0

        def one(example):
            rows = jax.tree.map(lambda x: jnp.repeat(x[None], copies, axis=0), example)
            with parallel.unconstrained():  # a batch of one example's copies
                return sign * self.family.eval_step(self.state, rows)[metric]

        self._losses = jax.jit(jax.vmap(one))

    def example_losses(self, examples: dict) -> np.ndarray:
        """`examples`: `{"x", "label", "index"}` arrays of images (index: each one's position
        in the training split, which the VAE draws its noise from)."""
        n = len(examples["x"])
        out = []
        for i in range(0, n, self.chunk):
            rows = {k: np.asarray(v[i:i + self.chunk]) for k, v in examples.items()}
            short = self.chunk - len(rows["x"])  # one compiled shape: pad the last chunk
            rows = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) if short else v
                    for k, v in rows.items()}
            out.append(np.asarray(self._losses(rows))[:self.chunk - short])
        return np.concatenate(out).astype(np.float64)


def sample_members(members: np.ndarray, nonmembers: np.ndarray, limit: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Equal numbers (at most `limit`) of member and non-member units, drawn at random."""
    n = min(len(members), len(nonmembers), limit)
    rng = np.random.default_rng([seed, 0x41554454])
    return (np.sort(rng.choice(members, n, replace=False)),
            np.sort(rng.choice(nonmembers, n, replace=False)))
