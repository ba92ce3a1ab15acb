"""The parameter tree as everyone outside the model sees it: its shapes, a flat
'/'-joined view, and the strict check that a tree is exactly the tree a config
builds (the load error names the first offending leaf)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tinyclip_jax.models.clip import param_shapes

SEP = "/"


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model (or is not a supported CLIP at all)."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts → {'visual/layers_0/ln_1/scale': leaf, ...}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{SEP}{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten`: '/'-joined keys → plain nested dicts."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split(SEP)
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in getattr(x, "shape", np.shape(x)))


def is_resnet_params(params: Mapping[str, Any]) -> bool:
  """True when the image tower of `params` is a ResNet (it has an attention pool)."""
  return "attnpool" in (params.get("visual") or {})


def kind_mismatch(params: Mapping[str, Any], config) -> str | None:
  """One sentence when `params` and `config` disagree on the image tower's kind or
  the ResNet's stages (before the key-by-key comparison, which would list symptoms)."""
  has_resnet = is_resnet_params(params)
  if has_resnet != (config.vision.kind == "resnet"):
    have, want = ("a ResNet", "a ViT") if has_resnet else ("a ViT", "a ResNet")
    return (f"the weights have {have} image tower but the config describes {want} one; pair "
            "the checkpoint with the config it was converted with (its model_config.json).")
  if has_resnet:
    visual = params["visual"]
    stages = [
        sum(1 for k in visual if k.startswith(f"layer{s}_")) for s in range(
            1, 1 + max([int(k[5:].split("_")[0]) for k in visual if k.startswith("layer")] or [0]))
    ]
    if tuple(stages) != tuple(config.vision.stages):
      return (f"the weights have ResNet stages {stages} but the config says "
              f"{list(config.vision.stages)}; fix the config's stages to match the checkpoint.")
  return None


def check_params(params: Mapping[str, Any], config) -> None:
  """Raises CheckpointError unless `params` has exactly the leaves and shapes that
  `param_shapes(config)` has (dtypes are not checked)."""
  mismatch = kind_mismatch(params, config)
  if mismatch:
    raise CheckpointError(mismatch)
  want = {k: tuple(v.shape) for k, v in flatten(param_shapes(config)).items()}
  got = {k: _shape(v) for k, v in flatten(params).items()}
  problems = []
  for key in sorted(want.keys() - got.keys()):
    problems.append(f"param `{key}` is missing (the config expects shape {want[key]}, the "
                    "checkpoint has none); convert a checkpoint of this model or fix the config")
  for key in sorted(got.keys() - want.keys()):
    problems.append(f"param `{key}` with shape {got[key]} is not used by the config (which "
                    "expects no such param, shape None); drop it or fix the config")
  for key in sorted(k for k in want.keys() & got.keys() if want[k] != got[k]):
    problems.append(f"param `{key}` has shape {got[key]} but the config expects {want[key]}; "
                    "fix the config or the checkpoint so they describe the same model")
  if problems:
    more = f" ({len(problems) - 1} more problems follow the same pattern)"
    raise CheckpointError(problems[0] + (more if len(problems) > 1 else "") + ".")
