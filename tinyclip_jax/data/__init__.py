"""Input data: the embedded procedural image-caption dataset (`tinyclip_jax.data.synthetic`)."""
