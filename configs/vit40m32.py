"""TinyCLIP ViT-40M/32 Text-19M ← ViT-B/32 (LAION-400M, GELU) (published: 59.8% top-1).

Released scale: 32 GPUs × 1024 = batch 32,768. Set total_steps to your sample budget.
"""
from tinyclip_jax.train.defaults import paper_recipe


def get_config():
  return paper_recipe("ViT-B-32", "TinyCLIP-ViT-40M-32-Text-19M", batch_size=32768,
                total_steps=24_400, warmup=5000, teacher_activation="gelu")
