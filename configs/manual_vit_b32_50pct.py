"""Manual weight inheritance in two stages, ViT-B/32 → ~75% → ~50%, as the released
progressive scripts: stage 1 cuts TinyCLIP ViT-61M/32 Text-29M out of the teacher,
stage 2 cuts TinyCLIP ViT-40M/32 Text-19M out of stage 1's student; both distil
from the original teacher (LAION-400M; published ImageNet top-1 62.4 and 59.8 for the
released single-stage-named models).

The per-stage step counts are this project's choice; override them per stage here.

python -m tinyclip_jax.main --config=configs/manual_vit_b32_50pct.py --workdir=gs://bucket/manual \\
    --config.teacher.checkpoint=/ckpt/openai-vit-b-32 --config.data.train=...
"""
import ml_collections

from tinyclip_jax.train.defaults import paper_recipe


def get_config():
  c = paper_recipe("ViT-B-32", "TinyCLIP-ViT-61M-32-Text-29M", batch_size=32_768,
                   total_steps=20_000, warmup=2000, teacher_activation="quick_gelu")
  c.student.activation = "quick_gelu"
  c.stages = (
      ml_collections.ConfigDict({"name": "75pct"}),
      # student.init='inherit' in a later stage: cut the smaller model from the
      # previous stage's student (not from the teacher).
      ml_collections.ConfigDict({"name": "50pct", "student": {
          "model": "TinyCLIP-ViT-40M-32-Text-19M", "init": "inherit"}}),
  )
  return c
