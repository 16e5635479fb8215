"""loracl: continual learning of pretrained vision transformers and CLIP with low-rank adaptation."""

__version__ = "0.1.0"
