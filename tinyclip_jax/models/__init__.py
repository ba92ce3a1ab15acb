"""CLIP models: config, Flax modules, named sizes."""
from tinyclip_jax.models.clip import (CLIP, count_params, init_params, l2_normalize, merge_stats,
                                     param_shapes, split_stats, variables)
from tinyclip_jax.models.config import (CLIPConfig, ConfigError, TextConfig, TowerConfig,
                                        VisionConfig, resnet_tower, text_tower,
                                        vision_tower)
from tinyclip_jax.models import zoo
