"""Named model sizes, under the names users know from open_clip and TinyCLIP."""
from __future__ import annotations

from tinyclip_jax.models.config import (CLIPConfig, ConfigError, resnet_tower, text_tower,
                                        vision_tower)


def _clip(embed_dim, vision, text, activation="gelu"):
  return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, activation=activation)


# Vision: width, layers, patch. Text: width, layers, heads (head dim 64 except where
# the text width forces otherwise). OpenAI's own checkpoints use QuickGELU; the
# converter takes the activation from the checkpoint's origin.
# The TinyCLIP names count vision params and text params without the token
# embedding: 61M/32 is 12 layers of 640, Text-29M is 9 layers of 512, 40M/32 is
# 12 layers of 512 (TinyCLIP's released model configs; tests/test_models.py checks
# every name against its count).
ZOO: dict[str, CLIPConfig] = {
    "ViT-B-32": _clip(512, vision_tower(768, 12, 32), text_tower(512, 12, heads=8)),
    "ViT-B-16": _clip(512, vision_tower(768, 12, 16), text_tower(512, 12, heads=8)),
    "ViT-L-14": _clip(768, vision_tower(1024, 24, 14), text_tower(768, 12, heads=12)),
    "TinyCLIP-ViT-61M-32-Text-29M": _clip(512, vision_tower(640, 12, 32),
                                          text_tower(512, 9, heads=8)),
    "TinyCLIP-ViT-40M-32-Text-19M": _clip(512, vision_tower(512, 12, 32),
                                          text_tower(512, 6, heads=8)),
    "TinyCLIP-ViT-39M-16-Text-19M": _clip(512, vision_tower(512, 12, 16),
                                          text_tower(512, 6, heads=8)),
    "TinyCLIP-ViT-8M-16-Text-3M": _clip(512, vision_tower(256, 10, 16),
                                        text_tower(256, 3, heads=4)),
    # ResNets: stem width and bottleneck blocks per stage; the attention pool has
    # width * 32 // 64 heads. TinyCLIP's ResNet students keep RN50's stages and
    # embedding width and narrow the stem (56: 30M image params, 44: 19M).
    "RN50": _clip(1024, resnet_tower(64, (3, 4, 6, 3)), text_tower(512, 12, heads=8)),
    "RN101": _clip(512, resnet_tower(64, (3, 4, 23, 3)), text_tower(512, 12, heads=8)),
    "TinyCLIP-ResNet-30M-Text-29M": _clip(1024, resnet_tower(56, (3, 4, 6, 3)),
                                          text_tower(512, 9, heads=8)),
    "TinyCLIP-ResNet-19M-Text-19M": _clip(1024, resnet_tower(44, (3, 4, 6, 3)),
                                          text_tower(512, 6, heads=8)),
}


def get(name: str, **overrides) -> CLIPConfig:
  """The zoo config `name`; `overrides` replace top-level fields (e.g. activation)."""
  if name not in ZOO:
    raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(ZOO))}.")
  return ZOO[name].replace(**overrides) if overrides else ZOO[name]
