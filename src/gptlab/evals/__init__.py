"""Evaluations of any gptlab model: HellaSwag (``hellaswag.py``) and validation loss (``loss.py``); the
evaluations run during training are a registry (``registry.py``: how to add one), ``samples.py`` among them.

Submodules are imported on use so ``import gptlab.evals`` stays cheap (no torch); the reference
numbers below live here so ``gptlab plot`` can draw them without importing torch.
"""

# Completion-style HellaSwag of OpenAI's GPT-2 weights on the full val split (10,042 examples), scored
# as gptlab.evals.hellaswag does (build-nanogpt's hellaswag.py reports 124M acc 0.2859 / acc_norm 0.2955
# and 1558M acc 0.3842 / acc_norm 0.4893). EleutherAI's harness scores multiple-choice style and reports
# different numbers (124M acc_norm 0.3114): do not compare across the two.
GPT2_HELLASWAG_ACC_NORM: dict[str, float] = {
    "gpt2": 0.2955,  # 124M
    "gpt2-medium": 0.375,  # 350M
    "gpt2-large": 0.432,  # 774M
    "gpt2-xl": 0.489,  # 1558M
}
GPT2_HELLASWAG_ACC: dict[str, float] = {"gpt2": 0.2859, "gpt2-xl": 0.3842}
# GPT-3 paper (Brown et al. 2020, appendix table H.1), zero-shot HellaSwag: the usual "same size,
# trained on 300B tokens" line in GPT-2 reproduction charts.
GPT3_HELLASWAG_ACC_NORM: dict[str, float] = {
    "gpt3-125m": 0.337,
    "gpt3-350m": 0.436,
    "gpt3-760m": 0.510,
    "gpt3-1.3b": 0.547,
}
