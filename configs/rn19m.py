"""TinyCLIP ResNet-19M Text-19M ← OpenAI RN50 (LAION-400M) (published: 56.4% top-1).

Stem width 64 → 44, text 12 → 6 layers, by manual inheritance from RN50 (the
teacher is configurable: `--config=configs/rn19m.py:RN101`, with
--config.student.init=scratch since RN101's embedding is 512 wide). The scale is
TinyCLIP's LAION ViT recipe (batch 32,768); BatchNorm trains on the global batch,
so keep microbatch_size=0 (gradient caching refuses BatchNorm students).

python -m tinyclip_jax.main --config=configs/rn19m.py --workdir=gs://bucket/run \\
    --config.teacher.checkpoint=/ckpt/openai-rn50 --config.data.train=...
"""
from tinyclip_jax.train.defaults import paper_recipe


def get_config(teacher: str = "RN50"):
  return paper_recipe(
      teacher or "RN50",
      "TinyCLIP-ResNet-19M-Text-19M",
      batch_size=32768,
      total_steps=24_400,
      warmup=5000,
      teacher_activation="quick_gelu")
