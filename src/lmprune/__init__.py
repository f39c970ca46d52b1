"""lmprune: prune pretrained transformer language models and measure what sparsity costs."""

__version__ = "0.1.0"
