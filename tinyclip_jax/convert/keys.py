"""Key names of the OpenAI family of state dicts → OpenAI's own (pure, no tensors
touched): open_clip's and DDP's wrappers, and TinyCLIP's.

TinyCLIP's released `TinyCLIP-auto-*` checkpoints are the physically pruned model
of TinyCLIP's `CLIP`: towers under `image_encoder_without_ddp.visual.*` and
`text_encoder_without_ddp.*` (or `_image_encoder.*`/`_text_encoder.*`, maybe
DDP-wrapped in `module.`), the temperature at `_logit_scale.logit_scale`. Inside
the towers the keys are OpenAI's, with per-layer shapes: in_proj (3·h·64, W'),
c_fc (m, W'), a hidden width W' that need not be a multiple of 64, blocks without
`ln_1`/`attn` or `ln_2`/`mlp` where a sub-layer was pruned, and no keys at all
(a gap in the block numbers) where both were. The model has no empty layers, so
gaps are closed on import. TinyCLIP's masked training checkpoints add the L0
module's mask log α beside the full weights (`split_masks`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from absl import logging

from tinyclip_jax.convert.common import CheckpointError, block_numbers

FORMAT = "an open_clip/OpenAI state dict"  # how messages name the family

# Non-tensor entries of OpenAI's TorchScript state dict, and causal-mask buffers.
DROPPED = frozenset({"input_resolution", "context_length", "vocab_size"})

# Leading prefixes of wrapped layouts → OpenAI's top level; the first match wins.
PREFIXES = (
    ("_image_encoder.module.", ""),  # TinyCLIP (DDP-wrapped towers)
    ("_image_encoder.", ""),
    ("_text_encoder.module.", ""),
    ("_text_encoder.", ""),
    ("_logit_scale.module.", ""),
    ("_logit_scale.", ""),
    ("text.", ""),  # open_clip CustomTextCLIP with its builtin text tower
)

# TinyCLIP's tower prefixes (after `module.` components are dropped) → OpenAI's top level.
IMAGE, TEXT, SCALE = "image_encoder_without_ddp.", "text_encoder_without_ddp.", "_logit_scale."
ALIASES = ((IMAGE, ""), ("_image_encoder.", ""), (TEXT, ""), ("_text_encoder.", ""), (SCALE, ""))
BLOCKS = ("visual.transformer.resblocks.", "transformer.resblocks.")
MASKS = "l0_module"
# TinyCLIP's L0Module parameter names → the mask kinds of inherit/masks.py.
LOGAS = {"hidden_loga": "hidden", "heads_loga": "heads", "intermediate_loga": "intermediate",
         "mha_loga": "mha", "ffn_loga": "ffn"}


# ----------------------------------------------------------------------------- OpenAI


def _rename(key: str) -> str:
  while key.startswith("module."):
    key = key[len("module."):]
  for old, new in PREFIXES:
    if key.startswith(old):
      return new + key[len(old):]
  return key


def inner(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict itself, out of a {'state_dict': ...} wrapper if it has one."""
  if set(state_dict) == {"state_dict"} and isinstance(state_dict["state_dict"], Mapping):
    return state_dict["state_dict"]
  return state_dict


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """OpenAI key names for any accepted layout, without the non-parameter extras."""
  out: dict[str, Any] = {}
  for key, value in inner(state_dict).items():
    name = _rename(str(key))
    if name in DROPPED or name.split(".")[-1] == "attn_mask":
      continue
    if name in out:
      raise CheckpointError(f"keys `{key}` and another one both name `{name}` once prefixes are "
                            "stripped; the checkpoint holds two models, keep only one.")
    out[name] = value
  return out


# ----------------------------------------------------------------------------- TinyCLIP


def unwrap(key: str) -> str:
  """`key` without DDP's `module.` components."""
  return ".".join(p for p in str(key).split(".") if p != "module")


def is_tinyclip(state_dict: Mapping[str, Any]) -> bool:
  """True when the keys use TinyCLIP's tower wrappers."""
  return any(unwrap(k).startswith(tuple(a for a, _ in ALIASES)) for k in inner(state_dict))


def _close_gaps(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
  """Renumbers the blocks `<prefix>N.*` 0, 1, … in order (pruned-away blocks have no keys)."""
  found = block_numbers(sd, prefix)
  new = {old: i for i, old in enumerate(sorted(found))}
  if all(old == i for old, i in new.items()):
    return sd
  gone = sorted(set(range(max(found) + 1)) - found)
  logging.info("blocks %s of `%s` were pruned away entirely; the model drops them", gone, prefix)
  out = {}
  for key, value in sd.items():
    if key.startswith(prefix):
      head, rest = key[len(prefix):].split(".", 1)
      key = f"{prefix}{new[int(head)]}.{rest}"
    out[key] = value
  return out


def tinyclip_to_openai(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A TinyCLIP pruned state dict with OpenAI's key names and consecutive blocks.

  Refuses masked training checkpoints (L0 mask tensors beside the full weights)."""
  sd = inner(state_dict)
  masks = sorted(k for k in sd if MASKS in unwrap(k).split("."))
  if masks:
    raise CheckpointError(
        f"the checkpoint holds L0 mask tensors (`{masks[0]}` and {len(masks) - 1} more), so it "
        "is a masked TinyCLIP training checkpoint rather than a pruned model; masked "
        "checkpoints need the prune step before they can be converted.")
  out: dict[str, Any] = {}
  for key, value in sd.items():
    name = unwrap(key)
    for old, new in ALIASES:
      if name.startswith(old):
        name = new + name[len(old):]
        break
    if name in out:
      raise CheckpointError(f"keys `{key}` and another one both name `{name}` once TinyCLIP's "
                            "wrappers are stripped; the checkpoint holds two models, keep one.")
    out[name] = value
  for prefix in BLOCKS:
    out = _close_gaps(out, prefix)
  return out


def split_masks(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
  """(state dict without L0 tensors, {"visual"|"text": {kind: log α}})."""
  rest, logas = {}, {}
  for key, value in inner(state_dict).items():
    parts = unwrap(key).split(".")
    if MASKS not in parts:
      rest[key] = value
      continue
    name = parts[-1]
    tower = "visual" if parts[0] in ("_image_encoder", "image_encoder_without_ddp") else "text"
    if name in LOGAS:
      logas.setdefault(tower, {})[LOGAS[name]] = np.asarray(value, np.float32)
    elif not name.startswith("lambda_"):
      raise CheckpointError(f"`{key}` is an L0 mask tensor this converter does not know; "
                            f"expected {sorted(LOGAS)} or lambda_1/lambda_2.")
  return rest, logas


def to_tinyclip_key(key: str) -> str:
  """OpenAI's key → the one TinyCLIP's pruned `CLIP` saves."""
  if key == "logit_scale":
    return SCALE + key
  return (IMAGE if key.startswith("visual.") else TEXT) + key
