"""TinyCLIP ViT-39M/16 Text-19M ← ViT-B/16 on YFCC-15M (published: 63.5% ImageNet top-1).

Released run: 16 GPUs × 1024 = batch 16,384, 25 epochs of YFCC-15M ≈ 22,900 steps.
python -m tinyclip_jax.main --config=configs/vit39m.py --workdir=gs://bucket/run \\
    --config.teacher.checkpoint=/ckpt/openai-vit-b-16 --config.data.train=...
"""
from tinyclip_jax.train.defaults import paper_recipe


def get_config():
  return paper_recipe("ViT-B-16", "TinyCLIP-ViT-39M-16-Text-19M", batch_size=16384,
                total_steps=22_900, warmup=2000, teacher_activation="quick_gelu")
