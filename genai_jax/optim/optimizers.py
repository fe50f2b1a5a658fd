"""Optimizers from the config: AdamW, warm-up + cosine schedule, clipping, decay mask."""

from __future__ import annotations

import jax
import optax

from genai_jax.optim.federated import server_optimizer


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine to `min_learning_rate` at `steps`."""
    warmup = min(train_cfg.warmup_steps, train_cfg.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(train_cfg.steps, warmup + 1), end_value=train_cfg.min_learning_rate)


def decay_mask(params):
    """Weight decay on matrices only: no decay on norm scales and biases (vectors)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW on `learning_rate_schedule`, after global-norm clipping when `grad_clip > 0`; in
    federated training the server's optimizer (`optim.federated.server_optimizer`)."""
    fed = train_cfg.get("federated")
    if fed is not None and fed.clients_per_round > 0:
        return server_optimizer(fed)
    parts = []
    if train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                             eps=1e-8, weight_decay=train_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
