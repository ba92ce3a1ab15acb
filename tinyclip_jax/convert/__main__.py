"""Convert CLIP checkpoints between formats.

  python -m tinyclip_jax.convert --src=KIND:PATH --dst=KIND:PATH [--overwrite] \
      [--activation=gelu|quick_gelu] [--vision-head-dim=N] [--text-head-dim=N]
      [--eot-token-id=N] [--model=NAME] [--open-clip-config=PATH]

Sources: openai (OpenAI's TorchScript .pt or a state dict), open_clip (state dict
.pt/.bin/.safetensors, including TinyCLIP's {'state_dict': ...} files), tinyclip
(TinyCLIP's pruned `TinyCLIP-auto-*` files; open_clip detects them too), hf (a
Hugging Face CLIPModel folder), flax (a tinyclip_jax.model_io folder).
Destinations: flax, hf (a folder that transformers loads offline, with tokenizer
and image-processor files), open_clip (.safetensors, or .pt/.bin via torch.save)
and tinyclip (TinyCLIP's pruned layout, per-layer widths kept). hf and open_clip
hold uniform towers only: pruned towers are padded with zero weights (exact).

What tensors cannot hold (activation, head sizes, the end-of-text id the text is
pooled at, per-layer widths of a padded model) travels with every export: hf in
config.json, open_clip and tinyclip in open_clip_config.json beside the file (open_clip's
own hub format, plus the exact config under `tinyclip_jax_config`), flax in
model_config.json. State-dict imports read that file when it is there (or the one
--open-clip-config names); the flags state these facts for files that come without
it, --model names a known model for its head sizes; what nobody states is assumed
with a warning, or refused when ambiguous (see tinyclip_jax/convert/meta.py).

Bad input prints one sentence to stderr and exits with code 2; the destination
is only ever created complete (written under a temporary name, then renamed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from absl import logging

from tinyclip_jax import cli, paths, storage
from tinyclip_jax.cli import UsageError
from tinyclip_jax.models.config import ACTIVATIONS, CLIP_EOT, CLIPConfig
from tinyclip_jax.preprocess import CLIP_MEAN, CLIP_STD

SOURCES = ("openai", "open_clip", "tinyclip", "hf", "flax")
DESTINATIONS = ("flax", "hf", "open_clip", "tinyclip")
STATE_DICT_SOURCES = ("openai", "open_clip", "tinyclip")
# State dicts do not record the activation: OpenAI's models use QuickGELU, models
# trained with open_clip mostly GELU (open_clip's default; TinyCLIP's auto models are
# pruned from open_clip's ViT-B/32). For openai it is a fact of the kind, not assumed.
DEFAULT_ACTIVATION = {"open_clip": ("gelu", "open_clip's default"),
                      "tinyclip": ("gelu", "open_clip's default, which TinyCLIP trains with")}
OPEN_CLIP_SUFFIXES = (".safetensors", ".pt", ".bin")


USAGE = ("python -m tinyclip_jax.convert --src=KIND:PATH --dst=KIND:PATH [--overwrite] "
         "[--activation=gelu|quick_gelu] [--vision-head-dim=N] [--text-head-dim=N] "
         "[--eot-token-id=N] [--model=NAME] [--open-clip-config=PATH]")
FACT_FLAGS = ("activation", "vision_head_dim", "text_head_dim", "eot_token_id", "model",
              "open_clip_config")


def _parser() -> argparse.ArgumentParser:
  p = cli.Parser(prog="python -m tinyclip_jax.convert", usage_line=USAGE,
                 description=__doc__.split("\n\n")[0])
  p.add_argument("--src", required=True, help=f"KIND:PATH, KIND in {', '.join(SOURCES)}")
  p.add_argument("--dst", required=True, help=f"KIND:PATH, KIND in {', '.join(DESTINATIONS)}")
  p.add_argument("--activation", choices=ACTIVATIONS, default=None,
                 help="MLP activation of openai/open_clip/tinyclip sources (defaults: "
                      "openai quick_gelu, open_clip and tinyclip gelu)")
  p.add_argument("--vision-head-dim", type=int, default=None,
                 help="channels per attention head of the image tower (open_clip's head_width)")
  p.add_argument("--text-head-dim", type=int, default=None,
                 help="channels per attention head of the text tower (width // heads)")
  p.add_argument("--eot-token-id", type=int, default=None,
                 help="the id the tokenizer ends text with; the text is pooled at it (49407)")
  p.add_argument("--model", default=None,
                 help="a known model (zoo or open_clip name, e.g. ViT-H-14) for its head sizes")
  p.add_argument("--open-clip-config", default=None,
                 help="open_clip_config.json of a state dict (default: the one beside it)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
  return p


def parse_location(text: str, flag: str, kinds: tuple[str, ...]) -> tuple[str, str]:
  kind, sep, path = text.partition(":")
  if not sep or not kind or not path:
    raise UsageError(f"--{flag}={text!r} is not KIND:PATH; write e.g. --{flag}=flax:/ckpt/model "
                     f"with KIND one of {', '.join(kinds)}.")
  if kind not in kinds:
    raise UsageError(f"--{flag} kind {kind!r} is unknown; use one of {', '.join(kinds)}.")
  return kind, paths.resolve(path)


# --------------------------------------------------------------------------- reading


def read_source(kind: str, path: str, args: argparse.Namespace):
  """(params, config) of the source checkpoint."""
  if kind in STATE_DICT_SOURCES:
    return read_state_dict_source(kind, path, args)
  given = [f for f in FACT_FLAGS if getattr(args, f, None) is not None]
  if given:
    flag = "--" + given[0].replace("_", "-")
    raise UsageError(f"{flag} applies to openai, open_clip and tinyclip sources only; a "
                     f"{kind} checkpoint records its own activation, head sizes and end-of-text "
                     "id.")
  from tinyclip_jax.convert import io
  if kind == "hf":
    from tinyclip_jax.convert.hf import from_hf
    return from_hf(*io.read_hf_folder(path))
  from tinyclip_jax.model_io import load_model
  return load_model(path)


def _stated_facts(args: argparse.Namespace, doc, where: str | None):
  """The facts the command line, a named model and open_clip_config.json state."""
  from tinyclip_jax.convert import meta, sidecar
  parts = [meta.Facts(args.activation, args.vision_head_dim, args.text_head_dim,
                      args.eot_token_id, "the command line")]
  if args.model:
    parts.append(meta.named_facts(args.model))
  if doc is not None:
    parts.append(sidecar.facts(doc, where))
  return meta.combine(parts)


def read_state_dict_source(kind: str, path: str, args: argparse.Namespace):
  """An openai/open_clip/tinyclip state dict, with the facts it does not hold."""
  from tinyclip_jax.convert import io, meta, openai, sidecar
  state_dict = io.read_state_dict(path)
  where = args.open_clip_config or sidecar.beside(path)
  if args.open_clip_config is None and not os.path.isfile(where):
    where = None
  doc = sidecar.read(where) if where else None
  facts = _stated_facts(args, doc, where)
  act = facts.activation
  if act is None:  # every OpenAI CLIP is QuickGELU; other state dicts: assumed, with a warning
    act = "quick_gelu" if kind == "openai" else meta.assumed_activation(*DEFAULT_ACTIVATION[kind])
  kw = dict(vision_head_dim=facts.vision_head_dim, text_head_dim=facts.text_head_dim,
            eot_token_id=facts.eot_token_id)
  if kind == "tinyclip":  # pruned, or masked (pruned here with its L0 masks)
    from tinyclip_jax.convert.tinyclip import from_tinyclip_with_masks
    params, config, logas = from_tinyclip_with_masks(state_dict, act, **kw)
    if logas:
      params, config = prune_masked(params, config, logas)
  else:
    params, config = openai.from_openai(state_dict, act, **kw)
  if args.model:
    meta.check_named(args.model, config)
  if doc is None:
    return params, config
  sidecar.check(doc, config, where)
  return meta.reconcile(params, config, sidecar.recorded(doc, where), where, openai.FORMAT)


def prune_masked(params, config: CLIPConfig, logas):
  """The masked model of a TinyCLIP training checkpoint → the pruned model TinyCLIP
  evaluates (its masks' deterministic gates)."""
  from tinyclip_jax.inherit import prune
  params, config = prune.prune_deterministic(params, config, logas)
  v, t = config.vision, config.text
  logging.info("applied the checkpoint's L0 masks: vision width %d heads %s mlp %s; text width %d "
               "heads %s mlp %s", v.width, list(v.heads), list(v.mlp), t.width, list(t.heads),
               list(t.mlp))
  return params, config


def describe(config: CLIPConfig) -> str:
  def tower(t):
    heads = t.heads[0] if t.uniform else list(t.heads)
    mlp = t.mlp[0] if t.uniform else list(t.mlp)
    return f"{t.layers} layers x width {t.width} (heads {heads} of {t.head_dim}, mlp {mlp})"
  v, t = config.vision, config.text
  text = (f"text {tower(t)}, context {t.context_length}, vocab {t.vocab_size}, end of text "
          f"{t.eot_token_id}; embed {config.embed_dim}; activation {config.activation}")
  if v.kind == "resnet":
    return (f"vision ResNet stages {list(v.stages)} x width {v.width} at {v.image_size}px "
            f"(attention pool {v.pool_heads} heads of {v.head_dim}); {text}")
  return f"vision {tower(v)}, patch {v.patch_size} at {v.image_size}px; {text}"


# --------------------------------------------------------------------------- writing


def check_destination(kind: str, path: str, overwrite: bool) -> None:
  """Refuses early (before reading the source) what the writers would refuse later,
  for local and gs:// destinations alike."""
  if kind in ("open_clip", "tinyclip"):
    if not path.endswith(OPEN_CLIP_SUFFIXES):
      raise UsageError(f"{kind} destination {path} must end in "
                       f"{', '.join(OPEN_CLIP_SUFFIXES)}.")
    if storage.isdir(path):
      raise UsageError(f"{kind} destination {path} is a folder; give a file path.")
    if storage.exists(path) and not overwrite:
      raise UsageError(f"{path} already exists; pass --overwrite to replace it.")
  elif storage.exists(path):
    if not storage.isdir(path):
      raise UsageError(f"{kind} destination {path} is a file; give a folder path.")
    if storage.listdir(path) and not overwrite:
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
  if config.text.eot_token_id != CLIP_EOT:
    logging.warning("the tokenizer files written are CLIP's, which end text with %d, but the model "
                    "pools the text at %d; ship the model's own tokenizer with it", CLIP_EOT,
                    config.text.eot_token_id)
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


def write_open_clip(path: str, params, config: CLIPConfig, overwrite: bool) -> None:
  from tinyclip_jax.convert import pad, sidecar
  from tinyclip_jax.convert.openai import FORMAT, to_open_clip
  state_dict = to_open_clip(params, config)  # pruned towers zero-padded
  doc = sidecar.document(pad.padded_config(config, FORMAT), config)
  _write_with_sidecar(path, state_dict, doc, overwrite)


def write_tinyclip(path: str, params, config: CLIPConfig, overwrite: bool) -> None:
  from tinyclip_jax.convert import sidecar
  from tinyclip_jax.convert.tinyclip import to_tinyclip
  # torch files as released: {'state_dict': ...}, which TinyCLIP's loaders unwrap.
  _write_with_sidecar(path, to_tinyclip(params, config), sidecar.document(config, config),
                      overwrite, wrap="state_dict")


def _write_with_sidecar(path: str, state_dict, doc: dict, overwrite: bool,
                        wrap: str | None = None) -> None:
  """The weights, then open_clip_config.json beside them (one per folder: an existing
  one of another model is only replaced with --overwrite)."""
  from tinyclip_jax.convert import sidecar
  from tinyclip_jax.convert.io import atomic_write
  side = sidecar.beside(path)
  text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
  if os.path.exists(side) and not overwrite:
    with open(side) as f:
      if f.read() != text:
        raise UsageError(f"{side} already exists and describes another model; export into a "
                         "folder of its own or pass --overwrite to replace it.")
  _write_state_dict(path, state_dict, wrap)
  try:
    atomic_write(side, lambda f: f.write(text.encode()))
  except BaseException:
    os.remove(path)
    raise


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
    write_tinyclip(path, params, config, overwrite)
  else:
    write_open_clip(path, params, config, overwrite)


# --------------------------------------------------------------------------- main


def run(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  src_kind, src = parse_location(args.src, "src", SOURCES)
  dst_kind, dst = parse_location(args.dst, "dst", DESTINATIONS)
  check_destination(dst_kind, dst, args.overwrite)
  print(f"reading {src_kind} checkpoint {src}", flush=True)
  with storage.local_copy(src, keep_url=src_kind == "flax") as local_src:  # gs://: fetched
    params, config = read_source(src_kind, local_src, args)
  print(f"model: {describe(config)}", flush=True)
  note = padding_note(dst_kind, config)  # refuses what cannot be padded, before writing
  with storage.staged_output(dst, folder=dst_kind == "hf", keep_url=dst_kind == "flax") as out:
    write_destination(dst_kind, out, params, config, args.overwrite, args.src)
  if note:  # after writing: a refused write prints its one sentence only
    print(note, file=sys.stderr, flush=True)
  print(f"wrote {dst_kind} checkpoint {dst}", flush=True)


def main(argv: list[str] | None = None) -> int:
  """Runs the conversion; returns the exit code (0, or 2 for bad input)."""
  return cli.run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
