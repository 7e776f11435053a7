"""ivg: the Integrated Value Guidance decoder on top of ivg_kernels (the decoder is its own issue)."""
from ivg_kernels import guided_sample

__version__ = "0.1.0"
__all__ = ["guided_sample", "__version__"]
