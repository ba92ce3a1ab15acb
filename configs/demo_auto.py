"""The embedded demo's automatic-inheritance path: the demo's teacher is copied into a
teacher-sized student that learns structure masks (hidden dims, heads, MLP units)
while distilling, is pruned at masks.prune_step and distilled on.

python -m tinyclip_jax.main --config=configs/demo.py --workdir=/tmp/demo       # first
python -m tinyclip_jax.main --config=configs/demo_auto.py --workdir=/tmp/demo  # adds "auto"

Without the first command it trains the demo's teacher itself. The settings are
tinyclip_jax/demo_config.py's `auto`.
"""
from configs import demo
from tinyclip_jax import demo_config


def get_config():
  return demo_config.auto(demo.get_config())
