"""TinyCLIP distillation in JAX."""
