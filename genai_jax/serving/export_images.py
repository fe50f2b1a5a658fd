"""Exports of the image families' samplers (in progress on the images-export branch)."""

from __future__ import annotations

from genai_jax.errors import UserError


def export_image_family(run, out, platforms) -> dict:
    raise UserError(f"{run.config.model.family!r} runs do not export yet: only language models")
