"""e2kd: cached explanation-enhanced knowledge distillation."""

__version__ = "0.2.0"
