"""Weight inheritance: cutting a student's initial params out of a teacher's."""
from tinyclip_jax.inherit.manual import (InheritError, inherit, student_config_from,
                                         uniform_layer_indices)

__all__ = ["InheritError", "inherit", "student_config_from", "uniform_layer_indices"]
