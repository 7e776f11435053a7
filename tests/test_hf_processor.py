"""IVGLogitsProcessor inside transformers' generate(): greedy matches the IVG decoder's EFT; beam search
matches a processor that recomputes the guides from scratch at every step."""
import pytest
import torch

from ivg.decoder import IVGDecoder
from ivg.hf_processor import IVGLogitsProcessor
from ivg.options import DecodeOptions

from .decoder_fixtures import ivg_models


class _FromScratch:
    """The obviously correct processor: full forwards of every row at every step."""

    def __init__(self, tuned, ref, beta):
        self.tuned, self.ref, self.beta = tuned, ref, beta

    @torch.no_grad()
    def __call__(self, ids, scores):
        t = torch.log_softmax(self.tuned(ids).logits[:, -1].float(), -1)
        r = torch.log_softmax(self.ref(ids).logits[:, -1].float(), -1)
        return scores + self.beta * (t - r).to(scores.dtype)


def _models():
    return ivg_models("llama", dtype=torch.float32)


def test_greedy_generate_matches_the_decoder():
    m = _models()
    g = m.guides[0]
    prompt = m.tokenizer("the movie was", add_special_tokens=False)["input_ids"]
    proc = IVGLogitsProcessor([(g.tuned, g.ref, g.beta)])
    out = m.base.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, logits_processor=[proc],
                          eos_token_id=None, pad_token_id=0)
    ours = IVGDecoder(m).generate([prompt], DecodeOptions(mode="eft", temperature=0.0, max_new_tokens=12,
                                                          eos_token_ids=()))
    assert out[0, len(prompt):].tolist() == ours[0].beams[0].tokens


def test_beam_search_follows_reordered_beams():
    m = _models()
    g = m.guides[0]
    prompt = torch.tensor([m.tokenizer("a good film", add_special_tokens=False)["input_ids"]] * 2)
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0,
              num_return_sequences=3)
    proc = IVGLogitsProcessor([(g.tuned, g.ref, g.beta)])
    fast = m.base.generate(prompt, logits_processor=[proc], **kw)
    slow = m.base.generate(prompt, logits_processor=[_FromScratch(g.tuned, g.ref, g.beta)], **kw)
    assert torch.equal(fast, slow)
    assert proc.reorders > 0, "the test did not exercise a beam reordering"


def test_sampling_adds_the_log_ratio():
    m = _models()
    g = m.guides[0]
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    scores = torch.randn(2, m.base.config.vocab_size)
    proc = IVGLogitsProcessor([(g.tuned, g.ref, g.beta)], token_rm=m.token_rm, token_rm_weight=0.5)
    got = proc(ids, scores.clone())
    with torch.no_grad():
        t = torch.log_softmax(g.tuned(ids).logits[:, -1].float(), -1)
        r = torch.log_softmax(g.ref(ids).logits[:, -1].float(), -1)
        q = m.token_rm(input_ids=ids).logits[:, -1].float()
    torch.testing.assert_close(got, scores + g.beta * (t - r) + 0.5 * q, rtol=1e-5, atol=1e-5)
    ids2 = torch.cat([ids, torch.tensor([[9], [10]])], 1)  # incremental step
    got2 = proc(ids2, scores.clone())
    with torch.no_grad():
        t = torch.log_softmax(g.tuned(ids2).logits[:, -1].float(), -1)
        r = torch.log_softmax(g.ref(ids2).logits[:, -1].float(), -1)
        q = m.token_rm(input_ids=ids2).logits[:, -1].float()
    torch.testing.assert_close(got2, scores + g.beta * (t - r) + 0.5 * q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_the_left_padding_is_masked(family):
    """``pad_token_id`` marks a left-padded batch's leading pads; the same id inside a prompt (an EOS that
    doubles as the pad, between chat turns) or drawn later is a token the base attends to, so the guides
    attend to it too (every occurrence was masked before). Each row against its own unpadded forwards. (GPT-2
    looks its positions up in a table: the pads' positions must be valid ones too.)"""
    m = ivg_models(family, dtype=torch.float32)
    g = m.guides[0]
    pad = 5
    rows = [[3, 4, 6], [3, pad, 4, 6], [7, pad]]
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    scores = torch.randn(len(rows), m.base.config.vocab_size)
    proc = IVGLogitsProcessor([(g.tuned, g.ref, g.beta)], token_rm=m.token_rm, token_rm_weight=0.5, pad_token_id=pad)
    got = proc(ids, scores.clone())
    step = torch.tensor([[8], [pad], [9]])  # one incremental step, a drawn pad id among them
    got2 = proc(torch.cat([ids, step], 1), scores.clone())
    for i, r in enumerate(rows):
        for out, toks in ((got, r), (got2, r + step[i].tolist())):
            alone = _FromScratch(g.tuned, g.ref, g.beta)(torch.tensor([toks]), scores[i:i + 1].clone())
            with torch.no_grad():
                q = m.token_rm(input_ids=torch.tensor([toks])).logits[:, -1].float()
            torch.testing.assert_close(out[i:i + 1], alone + 0.5 * q, rtol=1e-5, atol=1e-5)


def test_processor_needs_a_guide():
    with pytest.raises(ValueError, match="guides: expected at least one"):
        IVGLogitsProcessor([])


def test_bad_arguments_are_named():
    """A NaN beta or weight made every score NaN, and a vocab_size past the logits a shape error inside
    generate(); each is named now."""
    m = _models()
    g = m.guides[0]
    with pytest.raises(ValueError, match=r"guides\[0\] beta=nan: expected a finite number"):
        IVGLogitsProcessor([(g.tuned, g.ref, float("nan"))])
    with pytest.raises(ValueError, match=r"guides\[0\]: expected a \(tuned, ref, beta\) triple"):
        IVGLogitsProcessor([(g.tuned, g.ref)])
    with pytest.raises(ValueError, match=r"token_rm_weight=inf: expected a finite number"):
        IVGLogitsProcessor([], token_rm=m.token_rm, token_rm_weight=float("inf"))
    with pytest.raises(ValueError, match=r"vocab_size=0: expected None or an int >= 1"):
        IVGLogitsProcessor([(g.tuned, g.ref, 1.0)], vocab_size=0)
    proc = IVGLogitsProcessor([(g.tuned, g.ref, 1.0)], vocab_size=m.base.config.vocab_size + 1)
    with pytest.raises(ValueError, match=rf"vocab_size={m.base.config.vocab_size + 1}: expected at most"):
        proc(torch.tensor([[3, 4]]), torch.zeros(1, m.base.config.vocab_size))
    # a guide list that is not a list, and call arguments that are not [batch, ...] tensors of one batch, failed with
    # Python's or torch's own errors ("'NoneType' object is not iterable", "tuple index out of range")
    for guides in (None, 1.5, g.tuned):
        with pytest.raises(ValueError, match=r"guides=\w+: expected a list of \(tuned, ref, beta\) triples"):
            IVGLogitsProcessor(guides)
    proc, v = IVGLogitsProcessor([(g.tuned, g.ref, 1.0)]), m.base.config.vocab_size
    for ids in (None, torch.tensor(3), torch.tensor([3, 4]), torch.tensor([[3.0, 4.0]])):
        with pytest.raises(ValueError, match=r"input_ids: expected an integer tensor \[batch, length\]"):
            proc(ids, torch.zeros(1, v))
    for scores in (None, torch.zeros(v), torch.zeros(2, v), torch.zeros(1, v, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"scores: expected a float tensor \[1, vocab\] \(input_ids' rows\)"):
            proc(torch.tensor([[3, 4]]), scores)
    assert proc(torch.tensor([[3, 4]]), torch.zeros(1, v)).shape == (1, v)


def test_a_batch_that_does_not_continue_the_last_one_starts_afresh():
    """Rows one token longer than the last call's, of which one continues no row of it (the next ``generate``
    call, say, with prompts one token longer): the caches are built again from scratch, not reordered."""
    m = _models()
    g = m.guides[0]
    proc = IVGLogitsProcessor([(g.tuned, g.ref, g.beta)])
    scores = torch.randn(2, m.base.config.vocab_size)
    proc(torch.tensor([[3, 4, 5], [6, 7, 8]]), scores.clone())
    ids = torch.tensor([[6, 7, 8, 9], [11, 12, 13, 14]])  # row 0 continues the old row 1; row 1 continues none
    got = proc(ids, scores.clone())
    torch.testing.assert_close(got, _FromScratch(g.tuned, g.ref, g.beta)(ids, scores.clone()), rtol=1e-5, atol=1e-5)
    assert proc.reorders == 0


def test_columns_past_vocab_size_are_ruled_out_and_the_full_width_is_allowed():
    """``vocab_size`` below the scores' width: the base's columns past it get -inf (tokens no guide scores);
    ``vocab_size`` equal to the narrowest width is allowed and changes nothing."""
    m = _models()
    g = m.guides[0]
    v = m.base.config.vocab_size
    ids, scores = torch.tensor([[3, 4, 5]]), torch.randn(1, v)
    full = IVGLogitsProcessor([(g.tuned, g.ref, g.beta)])(ids, scores.clone())
    assert torch.equal(IVGLogitsProcessor([(g.tuned, g.ref, g.beta)], vocab_size=v)(ids, scores.clone()), full)
    cut = IVGLogitsProcessor([(g.tuned, g.ref, g.beta)], vocab_size=v - 3)(ids, scores.clone())
    assert torch.isneginf(cut[:, v - 3:]).all()
    add = torch.log_softmax(g.tuned(ids).logits[:, -1, :v - 3].float(), -1) - torch.log_softmax(
        g.ref(ids).logits[:, -1, :v - 3].float(), -1)
    torch.testing.assert_close(cut[:, :v - 3], scores[:, :v - 3] + g.beta * add.detach(), rtol=1e-5, atol=1e-5)
