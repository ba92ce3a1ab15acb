"""The embedded demo (the README's first command): teacher from scratch, then a
distilled student vs. the same student trained from scratch, on generated data.

python -m tinyclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
"""
import ml_collections

from tinyclip_jax.train.defaults import base_config


def model(width, layers, text_width, text_layers):
  return dict(embed_dim=64, image_size=32, patch_size=8, vision_width=width,
              vision_layers=layers, text_width=text_width, text_layers=text_layers,
              text_heads=0, head_dim=32, context_length=32, vocab_size=49408, activation="gelu")


def get_config():
  c = base_config()
  c.demo = ml_collections.ConfigDict({"teacher_steps": 600, "teacher_lr": 2e-3})
  c.teacher.model = ""
  c.teacher.custom.update(model(128, 4, 128, 4))
  c.student.model = ""
  c.student.custom.update(model(64, 2, 64, 2))
  c.student.init = "inherit"
  # Students: the same optimizer, data and steps for the distilled and scratch runs.
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.05
  c.total_steps = 300
  c.batch_size = 64
  c.log_every = 25
  c.eval_every = 25
  c.checkpoint_every = 1000
  c.keep_checkpoints = 1
  c.eval.num_examples = 512
  c.data.prefetch = 2
  return c
