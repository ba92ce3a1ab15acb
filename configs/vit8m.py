"""TinyCLIP ViT-8M/16 Text-3M ← ViT-B/16 on YFCC-15M (published: 41.1% ImageNet top-1).

Same recipe as ViT-39M/16: batch 16,384, 25 epochs of YFCC-15M ≈ 22,900 steps.
"""
from tinyclip_jax.train.defaults import paper_recipe


def get_config():
  return paper_recipe("ViT-B-16", "TinyCLIP-ViT-8M-16-Text-3M", batch_size=16384,
                total_steps=22_900, warmup=2000, teacher_activation="quick_gelu")
