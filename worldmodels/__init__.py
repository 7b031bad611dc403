"""World Models (Ha & Schmidhuber, 2018) in PyTorch on gymnasium's CarRacing-v3."""

__version__ = "0.1.0"
