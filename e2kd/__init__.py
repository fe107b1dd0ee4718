"""e2kd: cached explanation-enhanced knowledge distillation."""

__version__ = "0.4.0"
