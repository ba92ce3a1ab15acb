"""Automatic weight inheritance, ViT-B/32 → 25% of its parameters in three stages
(100→75, 75→50, 50→25), as TinyCLIP's auto models (LAION-400M; published ImageNet
top-1: ViT-63M/32 Text-31M 63.9, ViT-45M/32 Text-18M 61.4, ViT-22M/32 Text-10M 53.7).

Each stage copies its starting model (the teacher, then the previous stage's pruned
student), learns hard-concrete masks over hidden dims, heads and MLP units while
distilling, prunes at masks.prune_step and distils on. Sparsity is one number over
both towers (joint) and is measured against the teacher throughout, so the
targets are 0.25, 0.5 and 0.75: the released names (63+31, 45+18, 22+10 of ViT-B/32's
88+38 M) are 75%, 50% and 25% of the pair, with the towers pruned unevenly.

The per-stage step counts below are this project's choice (the released scripts'
exact schedules are not part of the paper); override them per stage here.

python -m tinyclip_jax.main --config=configs/auto_vit_b32_25pct.py --workdir=gs://bucket/auto \\
    --config.teacher.checkpoint=/ckpt/openai-vit-b-32 --config.data.train=...
"""
import ml_collections

from tinyclip_jax.train.defaults import paper_recipe


def stage(name, start, target, total_steps=20_000, warmup=4_000, prune_step=5_000):
  return ml_collections.ConfigDict({
      "name": name, "total_steps": total_steps,
      "masks": {"start_sparsity": start, "target_sparsity": target,
                "sparsity_warmup": warmup, "prune_step": prune_step}})


def get_config():
  c = paper_recipe("ViT-B-32", "ViT-B-32", batch_size=32_768, total_steps=20_000, warmup=2000,
                   teacher_activation="quick_gelu")
  c.student.activation = "quick_gelu"
  c.student.init = "inherit"          # stage 1 starts as a copy of the teacher
  c.masks.enabled = True
  c.masks.kinds = ("hidden", "heads", "intermediate")
  c.masks.joint = True
  c.stages = (stage("75pct", 0.0, 0.25), stage("50pct", 0.25, 0.5), stage("25pct", 0.5, 0.75))
  return c
