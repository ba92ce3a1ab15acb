"""TinyCLIP's pruned (auto weight inheritance) state dicts ↔ canonical params.

The released `TinyCLIP-auto-*` checkpoints are the physically pruned model of
TinyCLIP's `CLIP`: towers under `image_encoder_without_ddp.visual.*` and
`text_encoder_without_ddp.*` (or `_image_encoder.*`/`_text_encoder.*`, maybe
DDP-wrapped in `module.`), the temperature at `_logit_scale.logit_scale`. Inside
the towers the keys are OpenAI's, with per-layer shapes: in_proj (3·h·64, W'),
c_fc (m, W'), a hidden width W' that need not be a multiple of 64, blocks without
`ln_1`/`attn` or `ln_2`/`mlp` where a sub-layer was pruned, and no keys at all
(a gap in the block numbers) where both were. The model has no empty layers, so
gaps are closed on import.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from absl import logging

from tinyclip_jax.convert.common import (CheckpointError, block_numbers, check_params, flatten,
                                         from_canonical)

# Tower prefixes (after `module.` components are dropped) → OpenAI's top level.
IMAGE, TEXT, SCALE = "image_encoder_without_ddp.", "text_encoder_without_ddp.", "_logit_scale."
ALIASES = ((IMAGE, ""), ("_image_encoder.", ""), (TEXT, ""), ("_text_encoder.", ""), (SCALE, ""))
BLOCKS = ("visual.transformer.resblocks.", "transformer.resblocks.")
MASKS = "l0_module"


def _unwrap(key: str) -> str:
  return ".".join(p for p in str(key).split(".") if p != "module")


def _inner(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  if set(state_dict) == {"state_dict"} and isinstance(state_dict["state_dict"], Mapping):
    return state_dict["state_dict"]
  return state_dict


def is_tinyclip(state_dict: Mapping[str, Any]) -> bool:
  """True when the keys use TinyCLIP's tower wrappers."""
  return any(_unwrap(k).startswith(tuple(a for a, _ in ALIASES)) for k in _inner(state_dict))


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


def openai_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A TinyCLIP pruned state dict with OpenAI's key names and consecutive blocks.

  Refuses masked training checkpoints (L0 mask tensors beside the full weights)."""
  sd = _inner(state_dict)
  masks = sorted(k for k in sd if MASKS in _unwrap(k).split("."))
  if masks:
    raise CheckpointError(
        f"the checkpoint holds L0 mask tensors (`{masks[0]}` and {len(masks) - 1} more), so it "
        "is a masked TinyCLIP training checkpoint rather than a pruned model; masked "
        "checkpoints need the prune step before they can be converted.")
  out: dict[str, Any] = {}
  for key, value in sd.items():
    name = _unwrap(key)
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


# TinyCLIP's L0Module parameter names → the mask kinds of inherit/masks.py.
LOGAS = {"hidden_loga": "hidden", "heads_loga": "heads", "intermediate_loga": "intermediate",
         "mha_loga": "mha", "ffn_loga": "ffn"}


def split_masks(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
  """(state dict without L0 tensors, {"visual"|"text": {kind: log α}})."""
  rest, logas = {}, {}
  for key, value in _inner(state_dict).items():
    parts = _unwrap(key).split(".")
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


def _prune_masked(params, config, logas):
  """The masked model → the pruned one, with the reference's deterministic gates."""
  from tinyclip_jax.inherit import masks, prune  # pylint: disable=import-outside-toplevel
  valid = {}
  for tower, kinds in logas.items():
    cfg = getattr(config, masks.TOWERS[tower])
    names = [k for k in ("hidden", "heads", "intermediate") if k in kinds]
    v = masks.tower_valid(cfg, names + (["layer"] if {"mha", "ffn"} & set(kinds) else []))
    valid[tower] = {k: v[k] for k in kinds}
    for k, loga in kinds.items():
      if loga.shape != v[k].shape:
        raise CheckpointError(f"the {tower} `{k}` mask has shape {loga.shape} but the model's "
                              f"{tower} tower needs {v[k].shape}; the masks belong to another model.")
  gates = masks.deterministic_gates(logas, valid)
  gates = {t: {k: np.asarray(z) for k, z in g.items()} for t, g in gates.items()}
  pruned, pruned_cfg = prune.prune(params, config, gates)
  logging.info("applied the checkpoint's L0 masks: vision width %d heads %s mlp %s; text width %d "
               "heads %s mlp %s", pruned_cfg.vision.width, list(pruned_cfg.vision.heads),
               list(pruned_cfg.vision.mlp), pruned_cfg.text.width, list(pruned_cfg.text.heads),
               list(pruned_cfg.text.mlp))
  return pruned, pruned_cfg


def from_tinyclip(state_dict: Mapping[str, Any], activation: str, **facts) -> tuple[dict, Any]:
  """(params, config) of the pruned heterogeneous model in a TinyCLIP state dict
  (any layout `from_openai` reads is accepted too; `facts`: its head sizes and
  end-of-text id keywords). A masked training checkpoint (full weights + L0 mask
  log α) is pruned with the masks' deterministic gates, as TinyCLIP evaluates it."""
  from tinyclip_jax.convert.openai import from_openai
  rest, logas = split_masks(state_dict)
  params, config = from_openai(rest, activation, **facts)
  if logas:
    params, config = _prune_masked(params, config, logas)
  return params, config


def _wrap(key: str) -> str:
  if key == "logit_scale":
    return SCALE + key
  return (IMAGE if key.startswith("visual.") else TEXT) + key


def to_tinyclip(params: Mapping[str, Any], config) -> dict[str, np.ndarray]:
  """TinyCLIP's pruned state dict (float32) for any model, per-layer widths included:
  what TinyCLIP's pruned `CLIP(...).state_dict()` holds, exactly (no padding). A
  ResNet image tower has no per-layer widths: its open_clip keys, wrapped."""
  from tinyclip_jax.convert.openai import _entries
  if config.vision.kind == "resnet":
    from tinyclip_jax.convert import resnet  # pylint: disable=import-outside-toplevel
    return {_wrap(key): value for key, value in resnet.to_open_clip(params, config).items()}
  check_params(params, config)
  flat = flatten(params)
  return {
      _wrap(key): from_canonical(layout, flat[path]) for key, path, layout, _ in _entries(config)
  }
