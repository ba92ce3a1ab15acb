"""Evaluation suite: zero-shot classification and image–text retrieval on TFDS
datasets and webdataset shards (tasks.py), CLIP's prompts and class names
(metadata.py), recall@k (retrieval.py). `python -m tinyclip_jax.evaluate` runs it."""
