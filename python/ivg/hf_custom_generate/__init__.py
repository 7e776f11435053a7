"""IVG as a transformers custom generation method: ``model.generate(..., custom_generate=ivg.CUSTOM_GENERATE,
trust_remote_code=True)`` runs ``custom_generate/generate.py`` of this folder (see docs/api.md)."""


class HeldDecoder:
    """The IVG decoder a base model keeps between ``generate`` calls with the same guides, token RM and
    tokenizer (``model._ivg_decoder``), so that its KV pools and CUDA graphs are made once, not at every call
    (as transformers keeps a static cache on the model). ``del model._ivg_decoder`` frees them. A copy of the
    model (``copy.deepcopy``) or a pickle of it holds no decoder: one is made again on first use."""

    __slots__ = ("key", "decoder")

    def __init__(self, key=None, decoder=None):
        self.key, self.decoder = key, decoder

    def __deepcopy__(self, memo):
        return HeldDecoder()

    def __reduce__(self):
        return HeldDecoder, ()
