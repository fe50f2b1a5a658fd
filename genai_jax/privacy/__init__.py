"""Privacy: the accountant of differentially private training (`accounting`). DP-SGD's
per-example clipping and noise are in `genai_jax.optim.dp`, its Poisson-sampled batches in
`genai_jax.data.private`."""
