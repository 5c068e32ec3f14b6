"""edgeinspect: industrial visual inspection from training to the factory line."""

__version__ = "0.1.0"
