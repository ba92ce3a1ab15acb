"""The embedded demo's automatic-inheritance path: the demo's teacher is copied into a
teacher-sized student that learns structure masks (hidden dims, heads, MLP units)
while distilling, is pruned at masks.prune_step and distilled on.

python -m tinyclip_jax.main --config=configs/demo.py --workdir=/tmp/demo       # first
python -m tinyclip_jax.main --config=configs/demo_auto.py --workdir=/tmp/demo  # adds "auto"

Without the first command it trains the demo's teacher itself.
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.demo.auto = True
  # The student starts as a copy of the teacher (demo.stages sets its size from
  # teacher.custom, after any --config overrides).
  c.student.init = "inherit"
  c.masks.enabled = True
  c.masks.kinds = ("hidden", "heads", "intermediate")
  c.masks.start_sparsity = 0.0
  c.masks.target_sparsity = 0.5   # half of the teacher's attention + MLP parameters
  c.masks.sparsity_warmup = 100
  c.masks.prune_step = 150
  # The released runs use 0.02 / -0.02 over thousands of masked steps; the demo has
  # 150, so log α and λ move 5x faster (at 0.02 no gate closes before the prune step).
  c.masks.lr = 0.1
  c.masks.lambda_lr = -0.1
  # Kept widths rounded to the mesh (a no-op on the default data-parallel mesh): on an
  # fsdp/tensor mesh the pruned widths (98 and 103 here) would otherwise be replicated.
  c.masks.round_to = -1
  c.total_steps = 300             # half the students' steps: it is teacher-sized until the prune
  return c
