"""ivg-kernels: fused GPU kernels for inference-time alignment (Integrated Value Guidance).

Imports without a GPU, a compiler, triton or transformers.
"""
from ._backend import BACKENDS, triton_available
from ._types import SampleOutput
from .sampling import guided_sample

__version__ = "0.1.0"

__all__ = ["BACKENDS", "SampleOutput", "guided_sample", "triton_available", "__version__"]
