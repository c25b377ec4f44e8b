"""The mode-independent core: what every round shares, records, checkpoint state, sampling.

Nothing here imports LLaMA-Factory or transformers; the modes drive it.
"""
