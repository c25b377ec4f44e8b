"""The mode-independent core: the cross-rank protocol, rounds, records, checkpoint state, sampling.

Nothing here imports LLaMA-Factory or transformers; the trainer mixin drives it.
"""
