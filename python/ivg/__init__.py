"""ivg: the Integrated Value Guidance decoder on top of ivg_kernels (docs/api.md lists every public name)."""
from ivg_kernels import guided_sample

__version__ = "0.1.0"

# The folder to pass as ``model.generate(..., custom_generate=CUSTOM_GENERATE, trust_remote_code=True)``.
CUSTOM_GENERATE = __import__("os").path.join(__import__("os").path.dirname(__file__), "hf_custom_generate")

# Hugging Face integration (needs transformers): imported on first use, so `import ivg` stays light.
_LAZY = {
    "PagedModel": "paged_model", "model_from_config": "model_families", "register_attention": "paged_attention",
    "IVGDecoder": "decoder", "GenerationResult": "decoder", "NaiveDecoder": "naive",
    "IVGModels": "models", "GuidePair": "models", "TokenRewardModel": "models",
    "DecodeOptions": "options", "IVGLogitsProcessor": "hf_processor",
}

__all__ = ["guided_sample", "generate", "CUSTOM_GENERATE", *_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


def generate(prompts, **kwargs):
    """Decode prompts with IVG and its relatives; see :func:`ivg.api.generate`."""
    from .api import generate as _generate

    return _generate(prompts, **kwargs)
