"""The privacy accountant of a DP-SGD (or DP-FedAvg) run, on Google's `dp-accounting`.

A run of `train.steps` steps, each a Gaussian mechanism of noise multiplier sigma over a batch
that holds each of the N privacy units (`genai_jax.data.private`) independently with
probability q = train.batch_size / N (Poisson sampling), is the event
`SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)`; its epsilon at `train.privacy.delta`
comes from the RDP accountant (`rdp`) or the privacy-loss-distribution one (`pld`, tighter,
slower). Shuffled fixed-size batches (`sampling='shuffle'`) are accounted the same way, which
their sampling does not justify: the figure is then labelled as not matching the guarantee.
User-level DP-FedAvg (`genai_jax.optim.federated`) is the same event with clients as the units,
rounds as the steps and q = clients_per_round / num_clients.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

from genai_jax.config_checks import ConfigError

# The largest noise multiplier a target epsilon is solved for: beyond it, training is noise.
MAX_NOISE_MULTIPLIER = 1000.0
# TensorFlow Privacy's RDP orders (its `compute_dp_sgd_privacy`).
TF_PRIVACY_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def _event(q: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)),
        steps)


def _accountant(kind: str):
    return rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()


def epsilon(q: float, noise_multiplier: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `steps` Poisson-sampled Gaussian steps (inf without noise)."""
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = _accountant(accountant)
    acc.compose(_event(q, noise_multiplier, steps))
    return float(acc.get_epsilon(delta))


def classic_rdp_epsilon(q: float, noise_multiplier: float, steps: int, delta: float,
                        orders=TF_PRIVACY_ORDERS) -> float:
    """Epsilon as TensorFlow Privacy's `compute_dp_sgd_privacy` computed it: RDP at its orders,
    converted with `min(rdp - log(delta) / (order - 1))` (dp-accounting's own conversion is
    tighter). For comparison with its published tables."""
    acc = rdp.RdpAccountant(list(orders))
    acc.compose(_event(q, noise_multiplier, steps))
    return float(np.min(acc.rdp - math.log(delta) / (acc.orders - 1)))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A DP-SGD run's privacy: its mechanism and what it spends."""

    units: int  # N: the privacy units sampled from
    expected_batch: int  # train.batch_size: q * N
    steps: int
    noise_multiplier: float
    clip_norm: float
    delta: float
    accountant: str
    sampling: str
    mechanism: str = "DP-SGD"  # or "DP-FedAvg": units are clients, steps rounds

    @property
    def sampling_rate(self) -> float:
        return self.expected_batch / self.units

    @property
    def matches_accountant(self) -> bool:
        """Poisson sampling is what the accountant assumes; shuffled batches are not."""
        return self.sampling == "poisson"

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a frozen dataclass, few distinct steps
    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon spent after `steps` steps (default: the whole run)."""
        return epsilon(self.sampling_rate, self.noise_multiplier,
                       self.steps if steps is None else steps, self.delta, self.accountant)

    def describe(self, steps: int | None = None) -> str:
        """One line: the mechanism and the epsilon after `steps` steps (default: all)."""
        steps = self.steps if steps is None else steps
        label = "" if self.matches_accountant else (
            " (accounted as Poisson sampling, which fixed-size samples are not: no guarantee)")
        what = "rounds" if self.mechanism == "DP-FedAvg" else "steps"
        return (f"epsilon {self.epsilon(steps):.3f} at delta {self.delta:g} ({self.accountant}) "
                f"after {steps} {what} of {self.mechanism} with noise multiplier "
                f"{self.noise_multiplier:.4g}, clip norm {self.clip_norm:g}, q = "
                f"{self.expected_batch}/{self.units} = {self.sampling_rate:.3g}{label}")


def plan(train_cfg, units: int, clients_per_round: int = 0) -> Plan:
    """The Plan of `train.privacy` over `units` privacy units: the noise multiplier given, or
    the smallest one that meets `target_epsilon` over `train.steps`; a given noise multiplier
    that would overspend a target epsilon is refused (one line), as is a target no noise
    multiplier up to MAX_NOISE_MULTIPLIER meets. With `clients_per_round` the run is
    DP-FedAvg: the units are clients, a step a round that samples that many of them."""
    p, steps, batch = train_cfg.privacy, train_cfg.steps, train_cfg.batch_size
    if clients_per_round:
        batch = clients_per_round
    elif batch > units:
        raise ConfigError(f"train.batch_size={batch} exceeds the {units} privacy units of the "
                          "training data: DP-SGD samples a fraction of them per step")
    q = batch / units
    noise = p.noise_multiplier
    if noise is None:
        noise = _solve_noise(q, steps, p.target_epsilon, p.delta, p.accountant)
    out = Plan(units, batch, steps, float(noise), p.clip_norm, p.delta, p.accountant,
               p.sampling, "DP-FedAvg" if clients_per_round else "DP-SGD")
    if p.target_epsilon is not None and out.epsilon() > p.target_epsilon * (1 + 1e-6):
        raise ConfigError(
            f"train.privacy.target_epsilon={p.target_epsilon} is exceeded: "
            f"{steps} steps at noise multiplier {noise} spend epsilon {out.epsilon():.3f}: "
            "raise the noise multiplier (or leave it unset to solve for it), or train fewer "
            "steps")
    return out


def _solve_noise(q: float, steps: int, target: float, delta: float, kind: str) -> float:
    if epsilon(q, MAX_NOISE_MULTIPLIER, steps, delta, kind) > target:
        raise ConfigError(
            f"train.privacy.target_epsilon={target} is out of reach: {steps} steps at "
            f"q = {q:.3g} spend more even at noise multiplier {MAX_NOISE_MULTIPLIER:g}: "
            "train fewer steps, with a smaller train.batch_size or more data")
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(kind), lambda sigma: _event(q, sigma, steps), target, delta,
        dp_accounting.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER), tol=1e-4))
