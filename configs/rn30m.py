"""TinyCLIP ResNet-30M Text-29M ← OpenAI RN50 (LAION-400M) (published: 59.1% top-1).

The released model was inherited from RN50 (same stages, stem width 64 → 56, text
12 → 9 layers). TinyCLIP publishes no ResNet script; the scale here is its LAION
ViT recipe (32 GPUs × 1024 = batch 32,768). Another teacher:
`--config=configs/rn30m.py:RN101` (its 512-wide embedding cannot seed this 1024-wide
student: add --config.student.init=scratch).

python -m tinyclip_jax.convert --src=openai:RN50.pt --dst=flax:/ckpt/openai-rn50
python -m tinyclip_jax.main --config=configs/rn30m.py --workdir=gs://bucket/run \\
    --config.teacher.checkpoint=/ckpt/openai-rn50 --config.data.train=...
"""
from tinyclip_jax.train.defaults import paper_recipe


def get_config(teacher: str = "RN50"):
  return paper_recipe(
      teacher or "RN50",
      "TinyCLIP-ResNet-30M-Text-29M",
      batch_size=32768,
      total_steps=24_400,
      warmup=5000,
      teacher_activation="quick_gelu")
