"""The embedded demo with a per-sample teacher cache: the demo's training set written
as shards, the teacher's embeddings of K crops of every image stored once, and two
students (manual and automatic inheritance) distilled from that cache beside the same
two students computing the teacher themselves (tinyclip_jax/demo_cache.py).

python -m tinyclip_jax.main --config=configs/demo.py --workdir=/tmp/demo        # first
python -m tinyclip_jax.main --config=configs/demo_cache.py --workdir=/tmp/demo  # DIR/cache

Without the first command it trains the demo's teacher itself. The settings are
tinyclip_jax/demo_config.py's `cached`.
"""
from configs import demo
from tinyclip_jax import demo_config


def get_config():
  return demo_config.cached(demo.get_config())
