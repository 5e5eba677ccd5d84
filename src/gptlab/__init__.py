"""gptlab: reproduce GPT-2 from scratch in PyTorch, and go beyond it."""

__version__ = "0.1.0"
