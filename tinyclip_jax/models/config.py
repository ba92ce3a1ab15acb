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


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
  image_size: int = 224
  patch_size: int = 32

  def __post_init__(self):
    super().__post_init__()
    if self.image_size % self.patch_size:
      raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size "
                        f"{self.patch_size}; pick sizes that tile the image.")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerConfig):
  vocab_size: int = 49408
  context_length: int = 77


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


def text_tower(width, layers, context_length=77, vocab_size=49408, **kw) -> TextConfig:
  return tower(width, layers, cls=TextConfig, context_length=context_length,
               vocab_size=vocab_size, **kw)
