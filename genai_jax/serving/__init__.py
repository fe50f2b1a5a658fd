"""Serving: `jax.export` artifacts of the samplers, their loader, the HTTP server, its metrics.

Nothing imported here imports flax or the model code (`genai_jax.models`, `genai_jax.nn`): a
process that serves an export runs the compiled functions alone. Writing an export
(`genai_jax.serving.export`) is the one part that needs the models.
"""
