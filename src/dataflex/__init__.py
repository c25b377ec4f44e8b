"""DataFlex: dynamic training-data selection for LLaMA-Factory supervised fine-tuning."""

__version__ = "0.1.0"
