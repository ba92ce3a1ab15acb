"""The base training config. Every field a run can set lives here with its default;
files in configs/ start from `base_config()` and override a few fields, and the
command line overrides any of them (`--config.batch_size=4096`). A field that is
not here is an error, so typos fail before anything compiles."""
from __future__ import annotations

import ml_collections

from tinyclip_jax.data import synthetic
from tinyclip_jax.models import CLIPConfig, ConfigError, text_tower, vision_tower, zoo


def model_spec(model: str = "", checkpoint: str = "") -> ml_collections.ConfigDict:
  """Which model: a zoo name, or `custom` sizes, optionally with a checkpoint."""
  return ml_collections.ConfigDict({
      "model": model,            # zoo name, e.g. "ViT-B-16"; "" to use `custom`
      "checkpoint": checkpoint,  # flax model folder (see tinyclip_jax.convert); "" = none
      "activation": "",          # override: "gelu" or "quick_gelu"; "" = model's own
      "custom": ml_collections.ConfigDict({
          "embed_dim": 0, "image_size": 224, "patch_size": 32, "vision_width": 0,
          "vision_layers": 0, "text_width": 0, "text_layers": 0, "text_heads": 0,
          "head_dim": 64, "context_length": 77, "vocab_size": 49408, "activation": "gelu",
      }),
  })


def ensemble_member(model: str = "", checkpoint: str = "",
                    scale: float = 50.0) -> ml_collections.ConfigDict:
  """A teacher of an ensemble beside the primary one (config.teacher):
  `c.teacher.ensemble.NAME = ensemble_member(checkpoint=DIR, scale=100.0)`, or with
  `custom` sizes. `scale`: its fixed logit scale τ (the primary's is loss.teacher_scale)."""
  m = model_spec(model, checkpoint)
  m.scale = float(scale)
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.teacher = model_spec("ViT-B-16")
  # More teachers beside config.teacher, by name (ensemble_member()): the affinity
  # targets become the mean of the teachers' softmax distributions (losses.py). The
  # student inherits from config.teacher alone, and mask sparsity is measured against
  # it. Empty = one teacher.
  c.teacher.ensemble = ml_collections.ConfigDict()
  # Precomputed teacher embeddings (python -m tinyclip_jax.cache_teacher): the run
  # reads them instead of running the teacher; "" = run the teacher.
  c.teacher.cache = ""
  c.student = model_spec("TinyCLIP-ViT-39M-16-Text-19M")
  # How the student starts: "inherit" (manual weight inheritance from the teacher),
  # "scratch" (random init), or "checkpoint" (student.checkpoint as is).
  c.student.init = "inherit"
  # With init="inherit": the model folder to inherit from instead of the teacher
  # (a previous stage's student in progressive manual inheritance); "" = the teacher.
  c.student.inherit_from = ""

  c.loss = ml_collections.ConfigDict({
      "alpha": 1.0,            # share of affinity mimicking vs. the hard CLIP loss
      "distill_weight": 1.0,   # w
      "image_image": 0.0,      # weights of the optional terms (0 = off)
      "text_text": 0.0,
      "embedding": 0.0,
      "student_scale": 50.0,   # τ_s; learned from here when learn_scale
      "teacher_scale": 50.0,   # τ_t
      "learn_scale": False,
      "max_scale": 100.0,      # clamp of a learned τ_s, as CLIP
  })

  c.optimizer = ml_collections.ConfigDict({
      "lr": 1e-4, "warmup_steps": 2000, "end_lr": 0.0, "b1": 0.9, "b2": 0.98,
      "eps": 1e-6, "weight_decay": 0.2, "grad_clip": 5.0,
  })

  c.total_steps = 100_000
  c.batch_size = 1024          # global
  # Rows each device pushes through the towers at once; 0 = its whole share of the
  # batch. Smaller values trade one extra student forward for memory, exactly
  # (gradient caching: the loss still sees the whole global batch).
  c.microbatch_size = 0
  # Text lengths the steps are compiled for: each batch's tokens are cut to the
  # smallest that holds its longest caption (exact: the text towers attend causally
  # and pool at the end-of-text token). None = (16, 24, 32, 48, 77) cut to the model's
  # text context length, which is always the last; a list: strictly increasing, the
  # last equal to the context length; () = off (every batch at the context length).
  c.text_buckets = ml_collections.FieldReference(None, field_type=tuple)
  c.seed = 0
  c.log_every = 50
  c.eval_every = 2000
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  # A folder (local or gs://) for XLA's persistent compilation cache: a restart after a
  # preemption, or a stage with the shapes of an earlier one, loads its executables
  # instead of compiling them again. "" = off (the demo uses WORKDIR/compile_cache).
  c.compile_cache = ""
  c.max_nonfinite = 10         # stop after this many non-finite losses in a row

  # Automatic weight inheritance: learn hard-concrete structure masks while
  # distilling, then prune at `prune_step` and keep distilling the smaller model.
  c.masks = ml_collections.ConfigDict({
      "enabled": False,
      "towers": ("visual", "text"),
      # any of "hidden", "heads", "intermediate", "layer" (whole attention / MLP
      # sub-layers); TinyCLIP's released runs learn the first three.
      "kinds": ("hidden", "heads", "intermediate"),
      "start_sparsity": 0.0,     # target sparsity ramps linearly from here...
      "target_sparsity": 0.25,   # ...to here (fraction of the teacher's prunable params)
      "sparsity_warmup": 1000,   # ...over these many steps
      "prune_step": 2000,        # fix the gates, prune, continue without masks
      "joint": False,            # one sparsity over both towers (λs averaged)
      "lr": 0.02,                # Adam on log α
      "lambda_lr": -0.02,        # Adam ascent on λ₁, λ₂
      # Round the kept hidden width, heads and MLP units (per layer) to a multiple, so
      # the pruned model shards: 0 = off, -1 = the size of the mesh axis each is
      # sharded over (hidden: fsdp; heads, MLP: tensor), N > 0 = a multiple of N. The
      # highest-scoring gates are kept; an int field (-1 as mesh.*'s "from the devices").
      "round_to": 0,
  })
  # Progressive stages: a tuple of ConfigDicts, each overriding fields of this
  # config (plus `name` and `from_stage`); stage k starts from stage from_stage's
  # final student (default k-1) and distils from the same teacher. See
  # configs/auto_vit_b32_25pct.py. Empty = a single run.
  c.stages = ()

  # A jax.profiler trace of steps start_step … start_step+num_steps-1 into WORKDIR/profile
  # (process 0; open with TensorBoard's profile plugin or Perfetto). 0 = off.
  c.profile = ml_collections.ConfigDict({"start_step": 0, "num_steps": 0})

  c.mesh = ml_collections.ConfigDict({
      "data": -1, "fsdp": 1, "tensor": 1,
      # Parameters whose dims the mesh does not divide are replicated (parallel.py);
      # at setup and at the prune step a run reports them, and past this fraction of
      # the parameter bytes it warns, or stops with replication='error'. 0.05: a model
      # the mesh divides reports 0, non-dividing biases and norms stay under 1%,
      # while one non-dividing width replicates whole matrices (a third or more).
      "max_replicated_fraction": 0.05,
      "replication": "warn",
  })
  # The towers' compute dtype (models/precision.py): "auto" = bfloat16 on GPU/TPU and
  # float32 on CPU, or "float32" / "bfloat16" anywhere. Parameters, optimizer state,
  # embeddings and the loss are float32 whatever this says.
  c.precision = "auto"
  c.remat = False
  # Each run of identical layers (uniform towers) runs as one lax.scan, so compile time
  # stops growing with depth (L/14 teachers: ~2x faster to compile); stored parameters
  # stay per layer. Same values as unrolled (benchmarks/README.md: compile time).
  c.scan_layers = False

  c.data = ml_collections.ConfigDict({
      # "synthetic" (the embedded generated dataset), "webdataset" (tar shards),
      # "tfrecord" (img2dataset TFRecord shards) or "tfds" (a prepared TFDS dataset).
      "kind": "synthetic",
      # Shard pattern(s) for webdataset/tfrecord: braces and globs, local or gs://,
      # several joined by '::', e.g. "gs://bucket/laion/{00000..41455}.tar".
      "train": "",
      "tfds_name": "",          # e.g. "coco_captions"
      "tfds_split": "train",
      "data_dir": "",           # TFDS data_dir; "" = TFDS's default
      "image_key": "image",     # TFDS features of the image and caption(s)
      "text_key": "captions/text",
      "seed": 0,
      "max_objects": 2,         # synthetic only
      "object_scale": 1.0,      # synthetic only: object radii × this (data/synthetic.py)
      "captions": "full",       # synthetic only: "full" or "objects" (data/synthetic.py)
      "backgrounds": synthetic.BACKGROUNDS,  # synthetic only: the backgrounds drawn from
      "centred": False,         # synthetic only: one object is drawn in the centre cell
      # webdataset/tfrecord: the caption is KEY.txt; a sample without one takes this
      # field of KEY.json ('a/b' for nested fields; "" = never read the JSON).
      "caption_key": "caption",
      # Stop (exit 2, skip counts by reason) when this many records in a row on any
      # host gave no usable sample; 0 = never. Warn when the usable fraction of the
      # records read so far falls below min_usable_fraction.
      "stall_records": 10_000,
      "min_usable_fraction": 0.5,
      "prefetch": 2,            # batches made ahead on a host thread
      "shuffle_buffer": 10_000,     # records, within a window of shards
      "shards_per_window": 8,       # shards read interleaved (and shuffled together)
      "num_parallel_calls": -1,     # decode/augment threads; -1 = tf.data AUTOTUNE
      "threads": 0,                 # tf.data private thread pool; 0 = shared default
      "min_image_size": 16,         # shorter side below this: skipped as tiny_image
      "max_image_pixels": 50_000_000,  # more pixels: skipped as huge_image (never decoded)
      # Opt-in, changes pixels: decode a JPEG at 1/r of its size (r in 2, 4, 8, at most
      # this) where its crop stays >= r × the image size; 1 = the exact decoding rule.
      "jpeg_scale": 1,
      # open_clip's train augmentation: RandomResizedCrop(scale, ratio), bicubic.
      "crop_scale_min": 0.9, "crop_scale_max": 1.0,
      "crop_ratio_min": 3 / 4, "crop_ratio_max": 4 / 3,
      # K > 0: each sample has K fixed crops drawn from its key and augment_seed, and
      # every epoch uses one of them, drawn from (seed, epoch, key): crops that no
      # process count or position changes, as a per-sample teacher cache stores them
      # (python -m tinyclip_jax.cache_teacher --augmentations=K). With teacher.cache,
      # 0 = the cache's K. 0 without a cache: a fresh crop per sample and epoch.
      "augmentations": 0,
      "augment_seed": 0,
  })
  c.eval = ml_collections.ConfigDict({
      # The periodic evaluations, comma-separated ("" = none): synthetic (zero-shot on
      # the generated labelled split), cifar10, cifar100, imagenet2012, imagenet_v2
      # (zero-shot), coco_captions (retrieval), wds:PATTERN (retrieval on webdataset
      # shards), folder:PATH (zero-shot); NAME:SPLIT picks a split.
      "tasks": "synthetic",
      "num_examples": 512,     # of the synthetic task
      "batch_size": 256,
      "data_dir": "",          # TFDS data_dir of the eval datasets
      "max_examples": 0,       # per task; 0 = the whole split
  })
  return c


def has_model(spec: ml_collections.ConfigDict) -> bool:
  return bool(spec.model or spec.checkpoint or spec.custom.vision_width)


def ensemble_names(config: ml_collections.ConfigDict) -> list[str]:
  """The ensemble members' names in member order (sorted; the primary comes before)."""
  return sorted(config.teacher.get("ensemble") or {})


def build_model_config(spec: ml_collections.ConfigDict, what: str) -> CLIPConfig:
  """CLIPConfig from a model spec (zoo name or custom sizes)."""
  if spec.model:
    cfg = zoo.get(spec.model)
  else:
    m = spec.custom
    if min(m.embed_dim, m.vision_width, m.vision_layers, m.text_width, m.text_layers) <= 0:
      raise ConfigError(f"{what}.model is empty and {what}.custom is incomplete; set "
                        f"{what}.model to a zoo name or fill {what}.custom's sizes.")
    cfg = CLIPConfig(
        m.embed_dim,
        vision_tower(m.vision_width, m.vision_layers, m.patch_size, image_size=m.image_size,
                     head_dim=m.head_dim),
        text_tower(m.text_width, m.text_layers, heads=m.text_heads or None, head_dim=m.head_dim,
                   context_length=m.context_length, vocab_size=m.vocab_size),
        activation=m.activation)
  return cfg.replace(activation=spec.activation) if spec.activation else cfg


# TinyCLIP's released distillation recipes (manual inheritance): AdamW β=(0.9, 0.98),
# ε=1e-6, weight decay 0.2 (not on biases, norms, logit scale), lr 1e-4 with linear
# warm-up then cosine decay, global-norm clipping 5, logit scale fixed to 50 for
# student and teacher, pure affinity mimicking (α=1, w=1).
def paper_recipe(teacher: str, student: str, *, batch_size: int, total_steps: int,
                 warmup: int, teacher_activation: str):
  c = base_config()
  c.teacher.model = teacher
  c.teacher.activation = teacher_activation
  c.teacher.checkpoint = ""   # set to the converted teacher: --config.teacher.checkpoint=DIR
  c.student.model = student
  c.student.init = "inherit"
  c.loss.alpha = 1.0
  c.loss.distill_weight = 1.0
  c.loss.student_scale = 50.0
  c.loss.teacher_scale = 50.0
  c.loss.learn_scale = False
  c.optimizer.update(lr=1e-4, warmup_steps=warmup, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                     grad_clip=5.0)
  c.batch_size = batch_size
  c.total_steps = total_steps
  c.precision = "auto"        # bfloat16 on the accelerators these recipes are for
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 1000
  c.data.kind = "webdataset"
  c.data.train = ""           # --config.data.train="gs://bucket/yfcc15m/{00000..01499}.tar"
  return c
