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
  c.demo = ml_collections.ConfigDict({"teacher_steps": 900, "teacher_lr": 2e-3})
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
  # The released recipes fix τ=50 for teachers whose own learned scale is 100 (OpenAI,
  # LAION). This demo's teacher learns τ≈14.5 (CLIP's start, 1/0.07, barely moves in
  # 900 steps), so its affinities are taken at that temperature: at 50 the targets
  # would be near one-hot and carry little of the teacher's similarity structure.
  c.loss.student_scale = 15.0
  c.loss.teacher_scale = 15.0
  c.batch_size = 64
  c.text_buckets = ()  # the generated captions fill most of the 32-token context
  c.log_every = 25
  c.eval_every = 25
  c.checkpoint_every = 1000
  c.keep_checkpoints = 1
  c.eval.num_examples = 1024  # 16 per class; fewer makes the curves noisy
  c.data.prefetch = 2
  return c
