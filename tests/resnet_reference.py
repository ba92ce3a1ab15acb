"""A minimal PyTorch OpenAI-style CLIP with a modified-ResNet image tower: the
independent reference for ResNet towers (open_clip cannot be imported here).

Module and buffer names follow OpenAI's `clip/model.py` (`ModifiedResNet`,
`Bottleneck`, `AttentionPool2d`), so `state_dict()` has exactly the keys of OpenAI's
and open_clip's RN checkpoints, BatchNorm running statistics included. The
attention pool runs `F.multi_head_attention_forward` with separate q/k/v
projections, as OpenAI's does.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_reference import TextCLIP


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride > 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(
          OrderedDict([("-1", nn.AvgPool2d(stride)),
                       ("0", nn.Conv2d(inplanes, planes * 4, 1, stride=1, bias=False)),
                       ("1", nn.BatchNorm2d(planes * 4))]))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(self.avgpool(out)))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class AttentionPool2d(nn.Module):

  def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
    super().__init__()
    self.positional_embedding = nn.Parameter(
        torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
    self.k_proj = nn.Linear(embed_dim, embed_dim)
    self.q_proj = nn.Linear(embed_dim, embed_dim)
    self.v_proj = nn.Linear(embed_dim, embed_dim)
    self.c_proj = nn.Linear(embed_dim, output_dim)
    self.num_heads = num_heads

  def forward(self, x):
    x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + self.positional_embedding[:, None, :].to(x.dtype)
    x, _ = F.multi_head_attention_forward(
        query=x[:1],
        key=x,
        value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=self.num_heads,
        q_proj_weight=self.q_proj.weight,
        k_proj_weight=self.k_proj.weight,
        v_proj_weight=self.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=self.c_proj.weight,
        out_proj_bias=self.c_proj.bias,
        use_separate_proj_weight=True,
        training=self.training,
        need_weights=False)
    return x.squeeze(0)


class ModifiedResNet(nn.Module):

  def __init__(self, layers, output_dim: int, heads: int, image_size: int, width: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(width // 2)
    self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width // 2)
    self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
    self.bn3 = nn.BatchNorm2d(width)
    self.avgpool = nn.AvgPool2d(2)
    self._inplanes = width
    self.layer1 = self._make_layer(width, layers[0])
    self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
    self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
    self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
    self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)

  def _make_layer(self, planes, blocks, stride=1):
    layers = [Bottleneck(self._inplanes, planes, stride)]
    self._inplanes = planes * Bottleneck.expansion
    layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
      x = F.relu(bn(conv(x)))
    x = self.avgpool(x)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.attnpool(x)


class CLIP(TextCLIP):
  """OpenAI's CLIP with a ResNet image tower: `encode_image(NCHW)`, `encode_text(ids)`."""

  def __init__(self,
               embed_dim,
               image_size,
               vision_layers,
               vision_width,
               context_length,
               vocab_size,
               text_width,
               text_layers,
               text_heads,
               quick_gelu=True,
               eot_token_id=49407):
    super().__init__(
        ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64, image_size,
                       vision_width), embed_dim, context_length, vocab_size, text_width,
        text_layers, text_heads, 4 * text_width, quick_gelu, eot_token_id)

  @classmethod
  def from_config(cls, config) -> "CLIP":
    """From a `tinyclip_jax` CLIPConfig with a ResNet vision tower and a uniform text tower."""
    v, t = config.vision, config.text
    return cls(
        config.embed_dim,
        v.image_size,
        v.stages,
        v.width,
        t.context_length,
        t.vocab_size,
        t.width,
        t.layers,
        t.heads[0],
        quick_gelu=config.activation == "quick_gelu",
        eot_token_id=t.eot_token_id)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Every parameter and BatchNorm running statistic random (variances positive), so
  evaluation mode really uses the running statistics; returns the model in eval mode.
  Matrices get std fan_in^-1/2 so activations stay O(1) through the blocks."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      std = p[0].numel()**-0.5 if p.ndim > 1 else 0.2
      p.copy_(torch.randn(p.shape, generator=g) * std)
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.add_(1.0)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
        m.num_batches_tracked.fill_(7)
  return model.eval()
