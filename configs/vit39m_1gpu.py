"""TinyCLIP ViT-39M/16 Text-19M ← ViT-B/16 at the paper's global batch (16,384) on ONE
accelerator, through gradient caching (microbatch_size): the loss still compares every
image with every caption of the 16,384-pair batch, exactly as on 16 GPUs.

Step time (estimated, not measured: no accelerator was available to this project when
this was written): 92.6 GFLOP per pair for the one-shot step (student fwd+bwd 6·N·T,
teacher fwd 2·N·T) plus 17.8 GFLOP for the second student forward of gradient caching,
× 16,384 pairs = 1.81 PFLOP per step; at 30–40% MFU of an H100's 989 TFLOP/s bf16 peak
that is 4.6–6.1 s per step, ~29–39 h for the recipe's 22,900 steps (the paper: 35 h on
16 V100s).

python -m tinyclip_jax.main --config=configs/vit39m_1gpu.py --workdir=gs://bucket/run \\
    --config.teacher.checkpoint=/ckpt/openai-vit-b-16 --config.data.train=...
"""
from tinyclip_jax.train.defaults import paper_recipe


def get_config():
  c = paper_recipe("ViT-B-16", "TinyCLIP-ViT-39M-16-Text-19M", batch_size=16384,
                   total_steps=22_900, warmup=2000, teacher_activation="quick_gelu")
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.microbatch_size = 512  # 32 microbatches per step; raise it if memory allows
  c.remat = True
  return c
