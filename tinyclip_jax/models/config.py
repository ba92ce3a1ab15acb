"""Model configuration: the shapes of a CLIP model, per layer.

Per-layer head counts and MLP widths are part of the config because automatic
weight inheritance produces layers of different widths (a 0 means the whole
sub-layer was pruned away). Configs are frozen dataclasses that round-trip
through JSON, so a checkpoint folder carries its own model definition.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

ACTIVATIONS = ("gelu", "quick_gelu")
CLIP_EOT = 49407  # <|endoftext|> of CLIP's tokenizer (tinyclip_jax.tokenizer), 49408 ids


def default_eot(vocab_size: int) -> int:
  """The end-of-text id a vocabulary of `vocab_size` ids pools at when nothing says:
  CLIP's 49407 when the vocabulary holds it (49408 ids, or more with added tokens);
  the last id of a smaller (toy) vocabulary, where OpenAI's largest-id rule agrees."""
  return CLIP_EOT if vocab_size > CLIP_EOT else vocab_size - 1


class ConfigError(ValueError):
  """A model config that cannot describe a CLIP model."""


def _as_tuple(value: int | Sequence[int], layers: int, name: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * layers
  value = tuple(int(v) for v in value)
  if len(value) != layers:
    raise ConfigError(f"{name} has {len(value)} entries but the tower has {layers} layers; "
                      f"give one entry per layer or a single int.")
  return value


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer tower (vision or text).

  width: residual stream width. heads[i]: attention heads of layer i (0: the
  attention sub-layer was pruned). mlp[i]: hidden units of layer i's MLP (0:
  pruned). head_dim: channels per head (64 for every CLIP model).
  """
  width: int
  heads: tuple[int, ...]
  mlp: tuple[int, ...]
  head_dim: int = 64

  def __post_init__(self):
    object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
    object.__setattr__(self, "mlp", tuple(int(m) for m in self.mlp))
    if len(self.heads) != len(self.mlp):
      raise ConfigError(f"heads has {len(self.heads)} layers but mlp has {len(self.mlp)}; "
                        "give one entry per layer in both.")
    if self.width <= 0 or self.head_dim <= 0:
      raise ConfigError(f"width ({self.width}) and head_dim ({self.head_dim}) must be positive.")
    if any(h < 0 for h in self.heads) or any(m < 0 for m in self.mlp):
      raise ConfigError("head counts and MLP widths must be >= 0 (0 means pruned).")

  @property
  def layers(self) -> int:
    return len(self.heads)

  @property
  def uniform(self) -> bool:
    """True when every layer has the same heads and MLP width (HF-exportable)."""
    return len(set(self.heads)) <= 1 and len(set(self.mlp)) <= 1


VISION_KINDS = ("vit", "resnet")
RESNET_STRIDE = 32  # stem 4 × three stride-2 stages: the attention pool sees image_size / 32


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
  """A ViT (kind 'vit': heads/mlp per layer, patch_size) or OpenAI's modified ResNet
  (kind 'resnet': `stages` bottleneck blocks per stage, `width` the stem width,
  heads = mlp = (), patch_size = 32, the total stride). JSON without `kind` is a ViT."""
  image_size: int = 224
  patch_size: int = 32
  kind: str = "vit"
  stages: tuple[int, ...] = ()

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "stages", tuple(int(n) for n in self.stages))
    if self.kind not in VISION_KINDS:
      raise ConfigError(f"vision kind {self.kind!r} is unknown; use one of {VISION_KINDS}.")
    if self.kind == "resnet":
      self._check_resnet()
    elif self.stages:
      raise ConfigError(f"vision stages {list(self.stages)} are given for a ViT tower; stages "
                        "describe ResNet towers only (set kind='resnet' or drop stages).")
    if self.image_size % self.patch_size:
      raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size "
                        f"{self.patch_size}; pick sizes that tile the image.")

  def _check_resnet(self):
    if len(self.stages) != 4 or min(self.stages) <= 0:
      raise ConfigError(f"ResNet stages {list(self.stages)} must be 4 positive block counts, "
                        "e.g. (3, 4, 6, 3) for RN50.")
    if self.heads or self.mlp:
      raise ConfigError("a ResNet vision tower has no transformer layers; leave heads and mlp "
                        "empty (its attention pool has width * 32 // head_dim heads).")
    if self.patch_size != RESNET_STRIDE:
      raise ConfigError(f"a ResNet vision tower has patch_size {RESNET_STRIDE} (its total "
                        f"stride), not {self.patch_size}; set patch_size={RESNET_STRIDE}.")
    if self.width % 2 or (self.width * 32) % self.head_dim:
      raise ConfigError(f"ResNet width {self.width} must be even with width * 32 a multiple of "
                        f"head_dim {self.head_dim}; pick e.g. 64, 56 or 44.")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def pool_width(self) -> int:
    """ResNet: channels of the last stage, which the attention pool attends over."""
    return self.width * 32

  @property
  def pool_heads(self) -> int:
    return self.pool_width // self.head_dim


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerConfig):
  """eot_token_id: the text is pooled at the FIRST position holding this id (the rule
  of transformers' CLIPTextTransformer; position 0 when a row has none). None (the
  default) means `default_eot(vocab_size)`: 49407 for CLIP's vocabulary, extended or
  not, so token ids above it do not move the pooling position as OpenAI's largest-id
  rule would."""
  vocab_size: int = 49408
  context_length: int = 77
  eot_token_id: int | None = None

  def __post_init__(self):
    super().__post_init__()
    eot = default_eot(self.vocab_size) if self.eot_token_id is None else int(self.eot_token_id)
    if not 0 <= eot < self.vocab_size:
      raise ConfigError(f"eot_token_id {eot} is outside the vocabulary of {self.vocab_size} ids; "
                        "give the id the tokenizer ends every text with.")
    object.__setattr__(self, "eot_token_id", eot)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  embed_dim: int
  vision: VisionConfig
  text: TextConfig
  activation: str = "gelu"

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f"activation {self.activation!r} is unknown; use one of {ACTIVATIONS}.")

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for tower in ("vision", "text"):
      d[tower]["heads"] = list(d[tower]["heads"])
      d[tower]["mlp"] = list(d[tower]["mlp"])
    d["vision"]["stages"] = list(d["vision"]["stages"])
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    try:
      return cls(embed_dim=int(d["embed_dim"]), vision=VisionConfig(**d["vision"]),
                 text=TextConfig(**d["text"]), activation=d.get("activation", "gelu"))
    except (KeyError, TypeError) as e:
      raise ConfigError(f"model config is malformed ({e}); expected the fields of "
                        "CLIPConfig.to_dict().") from e

  @classmethod
  def from_json(cls, text: str) -> "CLIPConfig":
    return cls.from_dict(json.loads(text))


def tower(width: int, layers: int, heads: int | Sequence[int] | None = None,
          mlp: int | Sequence[int] | None = None, head_dim: int = 64, cls=TowerConfig, **kw):
  """Builds a tower config; heads default to width // head_dim, mlp to 4 * width."""
  heads = width // head_dim if heads is None else heads
  mlp = 4 * width if mlp is None else mlp
  return cls(width=width, heads=_as_tuple(heads, layers, "heads"),
             mlp=_as_tuple(mlp, layers, "mlp"), head_dim=head_dim, **kw)


def vision_tower(width, layers, patch_size, image_size=224, **kw) -> VisionConfig:
  return tower(width, layers, cls=VisionConfig, patch_size=patch_size, image_size=image_size, **kw)


def resnet_tower(width: int, stages: Sequence[int], image_size: int = 224,
                 head_dim: int = 64) -> VisionConfig:
  """OpenAI's modified ResNet image tower: stem width `width`, blocks per stage."""
  return VisionConfig(width=width, heads=(), mlp=(), head_dim=head_dim, image_size=image_size,
                      patch_size=RESNET_STRIDE, kind="resnet", stages=tuple(stages))


def text_tower(width, layers, context_length=77, vocab_size=49408, eot_token_id=None,
               **kw) -> TextConfig:
  return tower(width, layers, cls=TextConfig, context_length=context_length,
               vocab_size=vocab_size, eot_token_id=eot_token_id, **kw)
