"""IVG as a transformers custom generation method: ``model.generate(..., custom_generate=ivg.CUSTOM_GENERATE,
trust_remote_code=True)`` runs ``custom_generate/generate.py`` of this folder (see docs/api.md)."""
