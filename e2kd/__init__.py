"""e2kd: cached explanation-enhanced knowledge distillation."""

__version__ = "0.3.0"
