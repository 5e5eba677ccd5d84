"""Evaluations of any gptlab model: HellaSwag (``hellaswag.py``) and validation loss (``loss.py``).

Submodules are imported on use so ``import gptlab.evals`` stays cheap.
"""
