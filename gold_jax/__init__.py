"""gold_jax: General Online Logit Distillation (GOLD) in JAX/Flax."""

__version__ = "0.1.0"
