"""The embedded demo (the README's first command): a teacher trained from scratch, then
a distilled student against the same student trained from scratch, over several seeds,
on generated data.

python -m tinyclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
"""
# The settings live in the package so that the notebook (and any installed copy) reads
# the same ones: tinyclip_jax/demo_config.py.
from tinyclip_jax.demo_config import get_config, model  # noqa: F401
