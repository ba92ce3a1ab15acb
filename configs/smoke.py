"""Smoke run: a tiny teacher (random unless teacher.checkpoint is set) distilled into a
tiny student on the embedded data, through the same code path as the paper configs.

python -m tinyclip_jax.main --config=configs/smoke.py --workdir=/tmp/smoke
"""
from tinyclip_jax.train.defaults import base_config


def tiny(width, layers, text_width, text_layers, image_size=32):
  return dict(embed_dim=32, image_size=image_size, patch_size=8, vision_width=width,
              vision_layers=layers, text_width=text_width, text_layers=text_layers,
              text_heads=0, head_dim=32, context_length=32, vocab_size=49408, activation="gelu")


def get_config():
  c = base_config()
  c.teacher.model = ""
  c.teacher.custom.update(tiny(64, 4, 64, 4))
  c.student.model = ""
  c.student.custom.update(tiny(32, 2, 32, 2))
  c.student.init = "inherit"
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 2
  c.total_steps = 6
  c.batch_size = 16
  # One full-length step: its generated captions fill most of the 32-token context,
  # and the tests that start from this config compile the step once.
  c.text_buckets = ()
  c.log_every = 2
  c.eval_every = 3
  c.checkpoint_every = 3
  c.eval.num_examples = 64
  c.eval.batch_size = 64
  return c
