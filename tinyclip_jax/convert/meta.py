"""What a checkpoint's tensors do not say about its model, and where it is read from.

Tensor shapes fix every width, layer count, MLP width, patch and image size, context
length, vocabulary and embedding width. They do not fix:

  activation     GELU or QuickGELU;
  head size      per tower: attention 1280 channels wide is 20 heads of 64 or 16 of 80;
  eot_token_id   the id the text is pooled at (CLIP's tokenizer ends text with 49407).

These facts are read from what travels with the weights (HF config.json,
open_clip_config.json beside a state dict, a flax model_config.json), from the
command line (--activation, --vision-head-dim, --text-head-dim, --eot-token-id, and
--model=NAME for a known model's head sizes), and only where both are silent,
assumed: GELU (open_clip's default; QuickGELU for openai sources, as every OpenAI CLIP),
64-channel heads, 49407. Every assumption is logged as a warning naming the flag that
overrides it. Sources that contradict each
other are refused. The head size is AMBIGUOUS, and refused rather than assumed, when
nothing records it and either some layer's attention width is not a multiple of 64,
or the tower is a ViT image tower as wide as a known open_clip model with other head
sizes (1280: ViT-H-14, 80; 1408: ViT-g-14, 88; 1664: ViT-bigG-14, 104).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from absl import logging

from tinyclip_jax.cli import UsageError
from tinyclip_jax.convert.common import CheckpointError
from tinyclip_jax.models import zoo
from tinyclip_jax.models.config import (CLIP_EOT, CLIPConfig, ConfigError, default_eot,
                                        text_tower, vision_tower)

# The exact CLIPConfig.to_dict() an export records beside what its format holds (a key
# of HF's config.json and of open_clip_config.json; both formats ignore unknown keys).
RECORD = "tinyclip_jax_config"
HEAD_DIM = 64  # every OpenAI CLIP, open_clip's ViT-B/L and text towers, TinyCLIP
QUICKGELU = "-quickgelu"  # open_clip's name suffix for QuickGELU variants
# open_clip models outside the zoo whose image heads are not 64 channels wide.
OPEN_CLIP = {
    "ViT-H-14": CLIPConfig(1024, vision_tower(1280, 32, 14, head_dim=80),
                           text_tower(1024, 24, heads=16)),
    "ViT-g-14": CLIPConfig(1024, vision_tower(1408, 40, 14, head_dim=88, mlp=6144),
                           text_tower(1024, 24, heads=16)),
    "ViT-bigG-14": CLIPConfig(1280, vision_tower(1664, 48, 14, head_dim=104, mlp=8192),
                              text_tower(1280, 32, heads=20)),
}
# ViT image widths of known models whose heads are not 64 channels: never assumed.
OTHER_HEADS = {c.vision.width: (name, c.vision.head_dim) for name, c in OPEN_CLIP.items()}
FLAGS = {"activation": "--activation", "vision_head_dim": "--vision-head-dim",
         "text_head_dim": "--text-head-dim", "eot_token_id": "--eot-token-id"}


@dataclasses.dataclass(frozen=True)
class Facts:
  """The facts one source states (None: it says nothing), and the source's name."""
  activation: str | None = None
  vision_head_dim: int | None = None
  text_head_dim: int | None = None
  eot_token_id: int | None = None
  source: str = ""

  def stated(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in FLAGS if getattr(self, k) is not None}


def of_config(config: CLIPConfig, source: str) -> Facts:
  return Facts(config.activation, config.vision.head_dim, config.text.head_dim,
               config.text.eot_token_id, source)


def combine(facts: Iterable[Facts]) -> Facts:
  """One Facts from several sources; two sources that state different values for the
  same fact are refused (UsageError), naming both."""
  merged: dict[str, tuple[Any, str]] = {}
  for f in facts:
    for key, value in f.stated().items():
      if key in merged and merged[key][0] != value:
        (old, where) = merged[key]
        raise UsageError(f"{where} says {key} = {old} but {f.source} says {value}; drop or fix "
                         "one of them.")
      merged.setdefault(key, (value, f.source))
  return Facts(**{k: v for k, (v, _) in merged.items()},
               source=", ".join(sorted({w for _, w in merged.values()})))


# ----------------------------------------------------------------------------- named models


def named_config(name: str) -> CLIPConfig:
  """The config of a zoo name or a known open_clip name (with its `-quickgelu`
  variant); UsageError naming the known names otherwise."""
  base = name[:-len(QUICKGELU)] if name.endswith(QUICKGELU) else name
  known = {**zoo.ZOO, **OPEN_CLIP}
  if base not in known:
    raise UsageError(f"--model={name} is not a known model; use one of "
                     f"{', '.join(sorted(known))} (open_clip's `-quickgelu` suffix allowed).")
  return known[base].replace(activation="quick_gelu" if base != name else "gelu")


def named_facts(name: str) -> Facts:
  """Head sizes of a named model; QuickGELU when the name says so (a name without the
  suffix states no activation: OpenAI's weights of the same name are QuickGELU)."""
  c = named_config(name)
  return Facts("quick_gelu" if name.endswith(QUICKGELU) else None, c.vision.head_dim,
               c.text.head_dim, None, f"--model={name}")


def _shape_fields(config: CLIPConfig) -> dict[str, Any]:
  v, t = config.vision, config.text
  return {"embed_dim": config.embed_dim, "vision kind": v.kind, "vision width": v.width,
          "vision layers": v.layers if v.kind == "vit" else list(v.stages),
          "vision patch": v.patch_size, "image size": v.image_size, "text width": t.width,
          "text layers": t.layers, "context length": t.context_length,
          "vocab size": t.vocab_size}


def check_named(name: str, config: CLIPConfig) -> None:
  """Refuses a --model name whose sizes are not the checkpoint's (per-layer heads and
  MLP widths are not compared: a pruned model keeps its teacher's name)."""
  want, got = _shape_fields(named_config(name)), _shape_fields(config)
  for key in want:
    if want[key] != got[key]:
      raise UsageError(f"--model={name} has {key} {want[key]} but the checkpoint has "
                       f"{got[key]}; it is another model: drop --model or name the right one.")


# ----------------------------------------------------------------------------- assumptions


def head_dim(tower: str, widths: list[int], given: int | None, vit_width: int | None = None) -> int:
  """The head size of a tower whose attention blocks are `widths` channels wide
  (heads * head size; 0 where pruned). `given` is checked; None applies the rule in
  this module's docstring (64, with a warning, or refused when ambiguous)."""
  flag = FLAGS[f"{tower}_head_dim"]
  used = sorted({w for w in widths if w})
  if given is not None:
    bad = [w for w in used if w % given]
    if given <= 0 or bad:
      raise CheckpointError(f"the {tower} tower's attention is {bad or used} channels wide, which "
                            f"does not split into heads of {given}; fix {flag} or the config that "
                            "gave it.")
    return given
  if vit_width in OTHER_HEADS:
    name, other = OTHER_HEADS[vit_width]
    raise CheckpointError(
        f"the {tower} tower is {vit_width} wide like open_clip's {name}, whose heads have {other} "
        f"channels, and nothing records this checkpoint's head size; pass --model={name} or "
        f"{flag}={other} ({flag}={HEAD_DIM} for {vit_width // HEAD_DIM} heads of {HEAD_DIM}), "
        "or put its open_clip_config.json beside the file.")
  odd = [w for w in used if w % HEAD_DIM]
  if odd:
    raise CheckpointError(
        f"the {tower} tower's attention is {odd} channels wide, not a multiple of {HEAD_DIM}, and "
        f"nothing records its head size; pass {flag}=N (or --model=NAME), or put its "
        "open_clip_config.json beside the file.")
  logging.warning("the checkpoint does not record the %s tower's head size; assumed %d channels "
                  "(%s heads); pass %s=N if it differs", tower, HEAD_DIM,
                  [w // HEAD_DIM for w in used], flag)
  return HEAD_DIM


def eot_token_id(vocab_size: int, given: int | None) -> int:
  """`given`, or the vocabulary's default (a warning when the vocabulary has ids above
  CLIP's end of text, whose pooling OpenAI's largest-id rule would move)."""
  if given is not None:
    return given
  eot = default_eot(vocab_size)
  if vocab_size > CLIP_EOT + 1:
    logging.warning("the checkpoint does not record its end-of-text id and its vocabulary has "
                    "%d ids (CLIP's has %d); assumed CLIP's %d, the text is pooled at its first "
                    "occurrence; pass --eot-token-id=N if the tokenizer ends text otherwise",
                    vocab_size, CLIP_EOT + 1, eot)
  return eot


def assumed_activation(default: str, why: str) -> str:
  """`default`, with a warning: the checkpoint and the command line said nothing."""
  logging.warning("the checkpoint does not record its activation; assumed %s (%s); pass "
                  "--activation=%s if it was trained with the other", default, why,
                  "gelu" if default == "quick_gelu" else "quick_gelu")
  return default


# ----------------------------------------------------------------------------- recorded configs


def recorded_config(value: Any, where: str) -> CLIPConfig:
  try:
    return CLIPConfig.from_dict(value)
  except (ConfigError, AttributeError, TypeError) as e:
    raise CheckpointError(f"{where} holds a model config that cannot be read ({e}).") from None


def _first_difference(a: Mapping, b: Mapping, prefix: str = "") -> str:
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, Mapping) and isinstance(y, Mapping):
      found = _first_difference(x, y, f"{prefix}{key}.")
      if found:
        return found
    elif x != y:
      return f"{prefix}{key} {x} where the weights have {y}"
  return ""


def reconcile(params, config: CLIPConfig, recorded: CLIPConfig | None, where: str, fmt: str):
  """(params, config) of the model `recorded` (a config saved beside the weights)
  when the weights are it, or its zero-padded export (cut back to it). Refuses a
  record of another model; keeps the uniform model, with a warning, when the padding
  is no longer zero."""
  from tinyclip_jax.convert import pad  # pylint: disable=import-outside-toplevel
  if recorded is None or recorded == config:
    return params, config
  try:
    padded = pad.padded_config(recorded, fmt)
  except CheckpointError:
    padded = None
  if padded != config:
    diff = _first_difference(recorded.to_dict(), config.to_dict())
    raise CheckpointError(f"{where} records a model with {diff}; it belongs to another "
                          "checkpoint: move it away or give the right one.")
  cut = pad.unpad(params, config, recorded)
  if cut is None:
    logging.warning("%s records a pruned model but the zero padding of these weights is not zero "
                    "any more (trained after export?); kept the padded model", where)
    return params, config
  logging.info("cut the zero-padded export back to the pruned model %s records", where)
  return cut, recorded
