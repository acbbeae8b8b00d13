"""hybridtune: fine-tune Hugging Face models with hybrid strategies, measured side by side."""

__version__ = "0.1.0"
