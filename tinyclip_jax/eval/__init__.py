"""Evaluation: encoders and batching shared with `embed` (encode.py); zero-shot
classification (zeroshot.py) and image–text retrieval (retrieval.py) tasks, named by
tasks.py, with CLIP's prompts and class names (metadata.py); the periodic evaluation
of training (suite.py). `python -m tinyclip_jax.evaluate` runs the tasks on a
checkpoint."""
