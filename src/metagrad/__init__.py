"""metagrad: fast, correct gradient-based meta-learning for few-shot vision."""

__version__ = "0.1.0"
