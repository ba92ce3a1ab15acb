"""Checkpoint maps between foreign CLIP formats and the canonical params (pure numpy;
torch is never imported here — reading and writing files is the I/O layer's job)."""
from tinyclip_jax.convert.hf import from_hf, to_hf
from tinyclip_jax.convert.openai import from_openai, to_open_clip
from tinyclip_jax.convert.tinyclip import from_tinyclip, from_tinyclip_with_masks, to_tinyclip
from tinyclip_jax.models.params import CheckpointError, check_params, flatten, unflatten
