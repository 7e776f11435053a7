"""ivg-kernels: fused GPU kernels for inference-time alignment (Integrated Value Guidance).

Imports without a GPU, a compiler, triton or transformers.
"""
from ._backend import BACKENDS, triton_available
from ._types import SampleOutput
from .attention import paged_decode_attention, paged_prefill_attention, shared_prefix_decode_attention, write_kv
from .block_manager import BlockManager, KVCacheExhausted
from .kv_pool import KVCache, KVCacheGroup, KVPool
from .reference.speculative import SpeculativeOutput
from .sampling import guided_sample
from .speculative import draft_sample, speculative_verify

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BlockManager",
    "KVCache",
    "KVCacheExhausted",
    "KVCacheGroup",
    "KVPool",
    "SampleOutput",
    "SpeculativeOutput",
    "draft_sample",
    "guided_sample",
    "paged_decode_attention",
    "paged_prefill_attention",
    "shared_prefix_decode_attention",
    "speculative_verify",
    "triton_available",
    "write_kv",
    "__version__",
]
