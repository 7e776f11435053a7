"""ivg: the Integrated Value Guidance decoder on top of ivg_kernels (the decoder is its own issue)."""
from ivg_kernels import guided_sample

__version__ = "0.1.0"
__all__ = ["guided_sample", "__version__"]

# Hugging Face integration (needs transformers); imported lazily so `import ivg` stays light.
def __getattr__(name):
    if name in ("PagedModel", "model_from_config", "register_attention"):
        from . import paged_model

        return getattr(paged_model, name)
    if name in ("IVGDecoder", "GenerationResult"):
        from . import decoder

        return getattr(decoder, name)
    if name == "NaiveDecoder":
        from .naive import NaiveDecoder

        return NaiveDecoder
    if name in ("IVGModels", "GuidePair", "TokenRewardModel"):
        from . import models

        return getattr(models, name)
    if name == "DecodeOptions":
        from .options import DecodeOptions

        return DecodeOptions
    if name == "IVGLogitsProcessor":
        from .hf_processor import IVGLogitsProcessor

        return IVGLogitsProcessor
    raise AttributeError(name)


def generate(prompts, **kwargs):
    """Decode prompts with IVG and its relatives; see :func:`ivg.api.generate`."""
    from .api import generate as _generate

    return _generate(prompts, **kwargs)
