"""Convert CLIP checkpoints between formats.

  python -m tinyclip_jax.convert --src=KIND:PATH --dst=KIND:PATH \
      [--activation=gelu|quick_gelu] [--overwrite]

Sources: openai (OpenAI's TorchScript .pt or a state dict), open_clip (state dict
.pt/.bin/.safetensors, including TinyCLIP's {'state_dict': ...} files), tinyclip
(TinyCLIP's pruned `TinyCLIP-auto-*` files; open_clip detects them too), hf (a
Hugging Face CLIPModel folder), flax (a tinyclip_jax.model_io folder).
Destinations: flax, hf (a folder that transformers loads offline, with tokenizer
and image-processor files), open_clip (.safetensors, or .pt/.bin via torch.save)
and tinyclip (TinyCLIP's pruned layout, per-layer widths kept). hf and open_clip
hold uniform towers only: pruned towers are padded with zero weights (exact).

Bad input prints one sentence to stderr and exits with code 2; the destination
is only ever created complete (written under a temporary name, then renamed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tinyclip_jax import cli
from tinyclip_jax.cli import UsageError
from tinyclip_jax.models.config import ACTIVATIONS, CLIPConfig
from tinyclip_jax.preprocess import CLIP_MEAN, CLIP_STD

SOURCES = ("openai", "open_clip", "tinyclip", "hf", "flax")
DESTINATIONS = ("flax", "hf", "open_clip", "tinyclip")
# State dicts do not record the activation: OpenAI's models use QuickGELU, models
# trained with open_clip mostly GELU.
DEFAULT_ACTIVATION = {"openai": "quick_gelu", "open_clip": "gelu",
                      "tinyclip": "gelu"}  # auto models are pruned from open_clip's ViT-B/32
OPEN_CLIP_SUFFIXES = (".safetensors", ".pt", ".bin")


USAGE = ("python -m tinyclip_jax.convert --src=KIND:PATH --dst=KIND:PATH "
         "[--activation=gelu|quick_gelu] [--overwrite]")


def _parser() -> argparse.ArgumentParser:
  p = cli.Parser(prog="python -m tinyclip_jax.convert", usage_line=USAGE,
                 description=__doc__.split("\n\n")[0])
  p.add_argument("--src", required=True, help=f"KIND:PATH, KIND in {', '.join(SOURCES)}")
  p.add_argument("--dst", required=True, help=f"KIND:PATH, KIND in {', '.join(DESTINATIONS)}")
  p.add_argument("--activation", choices=ACTIVATIONS, default=None,
                 help="MLP activation of openai/open_clip/tinyclip sources (defaults: "
                      "openai quick_gelu, open_clip and tinyclip gelu)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
  return p


def parse_location(text: str, flag: str, kinds: tuple[str, ...]) -> tuple[str, str]:
  kind, sep, path = text.partition(":")
  if not sep or not kind or not path:
    raise UsageError(f"--{flag}={text!r} is not KIND:PATH; write e.g. --{flag}=flax:/ckpt/model "
                     f"with KIND one of {', '.join(kinds)}.")
  if kind not in kinds:
    raise UsageError(f"--{flag} kind {kind!r} is unknown; use one of {', '.join(kinds)}.")
  return kind, path


# --------------------------------------------------------------------------- reading


def read_source(kind: str, path: str, activation: str | None):
  """(params, config) of the source checkpoint."""
  from tinyclip_jax.convert import io
  if kind == "tinyclip":  # pruned, or masked (pruned here with its L0 masks)
    from tinyclip_jax.convert.tinyclip import from_tinyclip
    return from_tinyclip(io.read_state_dict(path), activation or DEFAULT_ACTIVATION[kind])
  if kind in ("openai", "open_clip"):
    from tinyclip_jax.convert.openai import from_openai
    return from_openai(io.read_state_dict(path), activation or DEFAULT_ACTIVATION[kind])
  if activation is not None:
    raise UsageError(f"--activation applies to openai, open_clip and tinyclip sources only; a "
                     f"{kind} checkpoint records its own activation.")
  if kind == "hf":
    from tinyclip_jax.convert.hf import from_hf
    return from_hf(*io.read_hf_folder(path))
  from tinyclip_jax.model_io import load_model
  return load_model(path)


def describe(config: CLIPConfig) -> str:
  def tower(t):
    heads = t.heads[0] if t.uniform else list(t.heads)
    mlp = t.mlp[0] if t.uniform else list(t.mlp)
    return f"{t.layers} layers x width {t.width} (heads {heads}, mlp {mlp})"
  v, t = config.vision, config.text
  if v.kind == "resnet":
    return (f"vision ResNet stages {list(v.stages)} x width {v.width} at {v.image_size}px "
            f"(attention pool {v.pool_heads} heads); text {tower(t)}, context "
            f"{t.context_length}, vocab {t.vocab_size}; embed {config.embed_dim}; activation "
            f"{config.activation}")
  return (f"vision {tower(v)}, patch {v.patch_size} at {v.image_size}px; text {tower(t)}, "
          f"context {t.context_length}, vocab {t.vocab_size}; embed {config.embed_dim}; "
          f"activation {config.activation}")


# --------------------------------------------------------------------------- writing


def check_destination(kind: str, path: str, overwrite: bool) -> None:
  """Refuses early (before reading the source) what the writers would refuse later."""
  if kind in ("open_clip", "tinyclip"):
    if not path.endswith(OPEN_CLIP_SUFFIXES):
      raise UsageError(f"{kind} destination {path} must end in "
                       f"{', '.join(OPEN_CLIP_SUFFIXES)}.")
    if os.path.isdir(path):
      raise UsageError(f"{kind} destination {path} is a folder; give a file path.")
    if os.path.exists(path) and not overwrite:
      raise UsageError(f"{path} already exists; pass --overwrite to replace it.")
  elif "://" not in path and os.path.exists(path):
    if not os.path.isdir(path):
      raise UsageError(f"{kind} destination {path} is a file; give a folder path.")
    if os.listdir(path) and not overwrite:
      raise UsageError(f"{path} already exists and is not empty; pass --overwrite to replace it.")


def preprocessor_config(image_size: int) -> dict:
  """CLIPImageProcessor settings of OpenAI's eval transform, at the model's image size."""
  return {
      "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
      "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": image_size},
      "resample": 3, "do_center_crop": True,
      "crop_size": {"height": image_size, "width": image_size},
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
  }


def write_hf(path: str, params, config: CLIPConfig, overwrite: bool) -> None:
  from tinyclip_jax import tokenizer
  from tinyclip_jax.convert.hf import to_hf
  from tinyclip_jax.convert.io import write_safetensors_atomic
  from tinyclip_jax.model_io import staging_dir
  state_dict, hf_config = to_hf(params, config)  # refuses unexportable models before writing
  with staging_dir(path, overwrite) as tmp:
    tmp = str(tmp)
    _write_json(os.path.join(tmp, "config.json"), hf_config)
    # transformers refuses safetensors files without a framework tag.
    write_safetensors_atomic(os.path.join(tmp, "model.safetensors"), state_dict,
                             metadata={"format": "pt"})
    tokenizer.write_hf_files(tmp, context_length=config.text.context_length)
    _write_json(os.path.join(tmp, "preprocessor_config.json"),
                preprocessor_config(config.vision.image_size))


def _write_json(path: str, value: dict) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)


def write_open_clip(path: str, params, config: CLIPConfig) -> None:
  from tinyclip_jax.convert.openai import to_open_clip
  _write_state_dict(path, to_open_clip(params, config))


def write_tinyclip(path: str, params, config: CLIPConfig) -> None:
  from tinyclip_jax.convert.tinyclip import to_tinyclip
  # torch files as released: {'state_dict': ...}, which TinyCLIP's loaders unwrap.
  _write_state_dict(path, to_tinyclip(params, config), wrap="state_dict")


def _write_state_dict(path: str, state_dict, wrap: str | None = None) -> None:
  from tinyclip_jax.convert.io import write_safetensors_atomic, write_torch_atomic
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    write_safetensors_atomic(path, state_dict, metadata={"format": "pt"})
  else:
    write_torch_atomic(path, state_dict, wrap=wrap)


def padding_note(kind: str, config: CLIPConfig) -> str | None:
  """What the hf/open_clip writers pad (the same sentence they log), checked early."""
  from tinyclip_jax.convert import pad
  if kind not in ("hf", "open_clip"):
    return None
  fmt = "a Hugging Face CLIPModel" if kind == "hf" else "an open_clip/OpenAI state dict"
  return pad.describe(config, pad.padded_config(config, fmt))


def write_destination(kind: str, path: str, params, config: CLIPConfig, overwrite: bool,
                      source: str) -> None:
  if kind == "flax":
    from tinyclip_jax.model_io import save_model
    save_model(path, params, config, extra={"converted_from": source}, overwrite=overwrite)
  elif kind == "hf":
    write_hf(path, params, config, overwrite)
  elif kind == "tinyclip":
    write_tinyclip(path, params, config)
  else:
    write_open_clip(path, params, config)


# --------------------------------------------------------------------------- main


def run(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  src_kind, src = parse_location(args.src, "src", SOURCES)
  dst_kind, dst = parse_location(args.dst, "dst", DESTINATIONS)
  check_destination(dst_kind, dst, args.overwrite)
  print(f"reading {src_kind} checkpoint {src}", flush=True)
  params, config = read_source(src_kind, src, args.activation)
  print(f"model: {describe(config)}", flush=True)
  note = padding_note(dst_kind, config)
  if note:
    print(note, file=sys.stderr, flush=True)
  write_destination(dst_kind, dst, params, config, args.overwrite, args.src)
  print(f"wrote {dst_kind} checkpoint {dst}", flush=True)


def main(argv: list[str] | None = None) -> int:
  """Runs the conversion; returns the exit code (0, or 2 for bad input)."""
  return cli.run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
