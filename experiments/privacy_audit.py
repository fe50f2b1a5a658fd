"""Audit what a trained model leaks about its training data:
`python -m experiments.privacy_audit --workdir=DIR [--reference=DIR2]`. Prints one JSON line
(also written to DIR/privacy_audit.json) and draws DIR/privacy_audit.png.

- Membership inference (`genai_jax.privacy.audit`): the run must have held out a random
  share of its training windows or images (`--config.data.nonmember_fraction=0.5` when
  training); the audit compares the loss on up to `--max_examples` members and as many
  non-members (ROC AUC, true-positive rate at 1% false positives), and, with `--reference`,
  the loss ratio against a reference model (trained without these members; same family and
  tokenizer). A language model's loss is a window's; an image family's, its held-out
  evaluation of the image alone (the VAE's NLL bound, the diffusion loss over 16 timesteps,
  the GAN discriminator's logit).
- Canary exposure, for language models trained with `data.canaries` (and
  `data.canary_repeats`).
The run's epsilon (DP-SGD runs) and its held-out metrics are reported beside them: a
canary repeated R times is protected only as a group of R units (about R x epsilon).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from absl import app, flags, logging

from experiments.common import load_workdir_config, parse_flags, user_errors_as_one_line
from genai_jax import models
from genai_jax.errors import UserError
from genai_jax.privacy import audit
from genai_jax.train import prepare, read_metrics
from genai_jax.train.trainer import PRIVACY_FILE

_WORKDIR = flags.DEFINE_string("workdir", None, "a directory written by experiments.train")
_REFERENCE = flags.DEFINE_string("reference", None, "the workdir of a reference model trained "
                                 "without the audited members (same tokenizer): calibrates the "
                                 "membership scores by its loss")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 2000, "member and non-member windows each")
flags.mark_flags_as_required(["workdir"])


def scorer_of(workdir: str):
    """The scorer of the run in `workdir` (`audit.LMScorer`, or `audit.ImageScorer` for an
    image family), and the run (prepared read-only, one device)."""
    config = load_workdir_config(workdir)
    with config.unlocked():
        config.mesh.update(data=1, fsdp=1, tensor=1)
    run = prepare(config, workdir, read_only=True)
    if run.start_step == 0:
        raise UserError(f"{workdir} has no trained checkpoint to audit")
    if models.modality(config.model.family) != "text":
        return audit.ImageScorer(config.model.family, run.family, run.state), run
    tokenizer = run.pipeline.info["tokenizer"]
    return audit.LMScorer(config, run.family.export_params(run.state), tokenizer), run


def audit_run(workdir: str, reference: str | None, max_examples: int) -> tuple[dict, dict]:
    """(the JSON report, the curves to plot)."""
    scorer, run = scorer_of(workdir)
    info, config = run.pipeline.info, run.config
    report, curves = {"workdir": workdir, "step": run.start_step}, {}
    split = info.get("audit")
    if split is None:
        raise UserError(f"{workdir} trained on random windows of its data, with no fixed "
                        "members to audit: train with --config.data.nonmember_fraction=0.5 "
                        "(and data.canaries=N for canary exposure)")
    if len(split["nonmembers"]):
        members, nonmembers = audit.sample_members(split["members"], split["nonmembers"],
                                                   max_examples, config.seed)
        units = split["units"]
        if isinstance(scorer, audit.LMScorer):
            windows = lambda indices: [units[int(i)] for i in indices]
        else:  # images, with their positions in the training split
            windows = lambda indices: {**units.get(np.asarray(indices)),
                                       "index": np.asarray(indices, np.int32)}
        loss_in = scorer.example_losses(windows(members))
        loss_out = scorer.example_losses(windows(nonmembers))
        result = audit.roc(-loss_in, -loss_out)
        curves["loss"] = result.pop("curve")
        result.update(member_loss=float(loss_in.mean()), nonmember_loss=float(loss_out.mean()))
        report["membership"] = result
        if reference:
            ref, ref_run = scorer_of(reference)
            if ref_run.config.model.family != config.model.family:
                raise UserError(f"--reference={reference} holds a "
                                f"{ref_run.config.model.family!r} model, {workdir} a "
                                f"{config.model.family!r} one: their losses do not compare")
            if isinstance(ref, audit.LMScorer) and (ref.tokenizer.vocab_size
                                                    != scorer.tokenizer.vocab_size):
                raise UserError(f"--reference={reference} has another tokenizer than "
                                f"{workdir}: its losses do not compare")
            calibrated = audit.roc(ref.example_losses(windows(members)) - loss_in,
                                   ref.example_losses(windows(nonmembers)) - loss_out)
            curves["calibrated"] = calibrated.pop("curve")
            report["membership_calibrated"] = calibrated
    if split.get("canaries"):
        exposures = [scorer.exposure(s) for s in split["canaries"]]
        report["canaries"] = {"count": len(exposures), "repeats": config.data.canary_repeats,
                              "candidates": audit.CANDIDATES,
                              "mean_exposure_bits": float(np.mean(exposures)),
                              "exposure_bits": [round(e, 3) for e in exposures]}
    privacy_file = pathlib.Path(workdir) / PRIVACY_FILE
    if privacy_file.exists():
        plan = json.loads(privacy_file.read_text())
        eps = run.privacy.epsilon(run.start_step)
        report["privacy"] = {"epsilon": eps, "delta": plan["delta"],
                             "accountant": plan["accountant"],
                             "matches_accountant": plan["matches_accountant"]}
        if "canaries" in report:  # a secret in R units is protected as a group of R
            report["privacy"]["canary_group_epsilon_bound"] = config.data.canary_repeats * eps
    else:
        report["privacy"] = None
    evals = [m for m in read_metrics(pathlib.Path(workdir)) if "eval/loss" in m]
    if evals:  # the held-out figures of the last evaluation
        report["eval_loss"] = evals[-1]["eval/loss"]
        for key in ("bits_per_byte", "nll_nats", "classifier_frechet"):
            if f"eval/{key}" in evals[-1]:
                report[f"eval_{key}"] = evals[-1][f"eval/{key}"]
    return report, curves


def plot(report: dict, curves: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    ax = axes[0]
    for name, (fpr, tpr) in curves.items():
        key = "membership" if name == "loss" else "membership_calibrated"
        ax.plot(fpr, tpr, label=f"{name} (AUC {report[key]['auc']:.3f})")
    chance = np.logspace(-3, 0, 50)
    ax.plot(chance, chance, "k:", lw=0.8, label="chance")
    ax.set(xscale="log", xlim=(1e-3, 1), xlabel="false-positive rate",
           ylabel="true-positive rate", title="membership inference")
    ax.legend(loc="lower right")
    ax = axes[1]
    if "canaries" in report:
        values = report["canaries"]["exposure_bits"]
        ax.bar(range(len(values)), values)
        ax.axhline(np.log2(audit.CANDIDATES), color="k", ls=":", lw=0.8)
        ax.set(ylim=(0, 21), xlabel="canary", ylabel="exposure (bits)",
               title=f"canary exposure, {report['canaries']['repeats']} repeats each")
    else:
        ax.axis("off")
    eps = (report.get("privacy") or {}).get("epsilon")
    fig.suptitle(f"{report['workdir']} at step {report['step']}" +
                 (f", epsilon {eps:.2f}" if eps is not None else ", not private"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@user_errors_as_one_line
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    report, curves = audit_run(_WORKDIR.value, _REFERENCE.value, _MAX_EXAMPLES.value)
    workdir = pathlib.Path(_WORKDIR.value)
    if jax.process_index() == 0:
        (workdir / "privacy_audit.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(report, curves, workdir / "privacy_audit.png")
        print(json.dumps(report))


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
