"""ivg: the Integrated Value Guidance decoder on top of ivg_kernels (the decoder is its own issue)."""
from ivg_kernels import guided_sample

__version__ = "0.1.0"
__all__ = ["guided_sample", "__version__"]

# Hugging Face integration (needs transformers); imported lazily so `import ivg` stays light.
def __getattr__(name):
    if name in ("PagedModel", "model_from_config", "register_attention"):
        from . import paged_model

        return getattr(paged_model, name)
    raise AttributeError(name)
