"""The paged IVG decoder against the naive baseline (float64, same seeds), and its contracts."""
from collections import Counter

import warnings

import pytest
import torch

from ivg.decoder import IVGDecoder
from ivg.models import GuidePair, IVGModels
from ivg.naive import NaiveDecoder
from ivg.options import DecodeOptions

from .decoder_fixtures import EOS, char_tokenizer, ivg_models, with_graph_buffers

PROMPTS = ["the movie was", "a", "it is a truly wonderful day, and"]  # ragged
MODES = ["plain", "eft", "tokenrm", "cbs", "ivg", "bon", "won"]


def _opts(mode, **kw):
    base = dict(mode=mode, width=2, successors=3, chunk_len=4, n=5, max_new_tokens=14, seed=11, temperature=1.0,
                num_return=2 if mode in ("cbs", "ivg", "bon", "won") else 1)
    base.update(kw)
    return DecodeOptions(**base)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request):
    return ivg_models(request.param)


def _same(a, b, tol=1e-9):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x.beams) == len(y.beams)
        for bx, by in zip(x.beams, y.beams):
            assert bx.tokens == by.tokens, f"{x.prompt!r}: {bx.tokens} != {by.tokens}"
            assert bx.text == by.text
            for f in ("score", "implicit_value", "explicit_value"):
                u, v = getattr(bx, f), getattr(by, f)
                assert (u is None) == (v is None), f
                if u is not None:
                    assert abs(u - v) <= tol * max(1.0, abs(v)), f"{f}: {u} vs {v}"


@pytest.mark.parametrize("mode", MODES)
def test_paged_matches_naive(models, mode):
    opts = _opts(mode)
    paged = IVGDecoder(models, backend="reference").generate(PROMPTS, opts)
    naive = NaiveDecoder(models).generate(PROMPTS, opts)
    _same(paged, naive)
    assert all(r.beams[0].tokens for r in paged)


@pytest.mark.parametrize("mode", ["ivg", "bon"])
def test_shared_prefix_attention_matches_naive(models, mode, monkeypatch):
    """Decode steps through shared-prefix attention (forced on, blocks of 4 tokens: the test prompts
    are short) give the naive baseline's tokens and values; so does forcing it off."""
    from ivg_kernels.reference import attention as ref

    naive = NaiveDecoder(models).generate(PROMPTS, _opts(mode))
    calls, real = [], ref.shared_prefix_decode_attention_ref
    monkeypatch.setattr(ref, "shared_prefix_decode_attention_ref", lambda *a, **k: calls.append(1) or real(*a, **k))
    for shared in (True, False):
        dec = IVGDecoder(models, backend="reference", block_size=4, shared_prefix=shared)
        _same(dec.generate(PROMPTS, _opts(mode)), naive)
        assert bool(calls) == shared, "the shared-prefix path was not taken" if shared else "it was taken"
        calls.clear()
    with pytest.raises(ValueError, match="shared_prefix='yes'"):
        IVGDecoder(models, shared_prefix="yes")


def test_block_size_by_default_and_any_block_size_gives_the_same_results(models):
    """``block_size=None``: ``CPU_BLOCK_SIZE`` for models on the CPU, 16 elsewhere; every block size gives the same
    tokens and values (the one of the other device's default too); a bad one is refused by name."""
    from ivg.decoder import CPU_BLOCK_SIZE

    dec = IVGDecoder(models)
    assert dec.block_size == (CPU_BLOCK_SIZE if next(models.base.parameters()).device.type == "cpu" else 16)
    opts = _opts("ivg")
    want = dec.generate(PROMPTS, opts)
    assert {c.pool.kv.shape[3] for c in dec._group.caches.values()} == {dec.block_size}
    for size in (16, CPU_BLOCK_SIZE, 3):
        _same(IVGDecoder(models, block_size=size).generate(PROMPTS, opts), want)
    for bad in (0, -4, 2.0, True, "8"):
        with pytest.raises(ValueError, match=rf"block_size={bad!r}: expected None or an int >= 1"):
            IVGDecoder(models, block_size=bad)


@pytest.mark.parametrize("mode", ["ivg", "eft"])
def test_decode_attention_in_slices_of_rows_changes_nothing(models, mode, monkeypatch, one_thread):
    """The CPU decode attention taking its rows a few at a time (``CPU_GATHER_BYTES`` of 1 byte: one row per
    call; 4 to 64 KiB: a few) gives the tokens and values of one call per layer, bit for bit, and the naive
    baseline's."""
    from ivg_kernels.reference import attention as ref

    whole = IVGDecoder(models, backend="reference").generate(PROMPTS, _opts(mode))
    real_rows, real_call, calls = ref._decode_rows, ref.paged_decode_attention_ref, []  # per call: its slices' rows
    monkeypatch.setattr(ref, "paged_decode_attention_ref", lambda q, *a, **k: calls.append([]) or real_call(q, *a, **k))
    monkeypatch.setattr(ref, "_decode_rows", lambda q, *a: calls[-1].append(len(q)) or real_rows(q, *a))
    several = False  # some layer's rows went in several slices, one of them of several rows
    for budget in (1, 1 << 12, 1 << 13, 1 << 14, 3 << 13, 1 << 15, 1 << 16):
        monkeypatch.setattr(ref, "CPU_GATHER_BYTES", budget)
        sliced = IVGDecoder(models, backend="reference").generate(PROMPTS, _opts(mode))
        _same(sliced, whole, tol=0.0)
        assert calls and (budget > 1 or all(p == [1] * len(p) for p in calls)), (budget, calls)
        several |= any(len(p) > 1 and max(p) > 1 for p in calls)
        calls.clear()
    assert several
    _same(whole, NaiveDecoder(models).generate(PROMPTS, _opts(mode)))


@pytest.mark.parametrize("mode,kw", [("ivg", {}), ("cbs", {}), ("bon", {}),
                                     ("ivg", dict(tokenwise=("tokenrm", "eft"))),  # the token RM read every step
                                     ("ivg", dict(eos_token_ids=(EOS,)))])  # rows that finish
def test_twin_rows_computed_once_change_nothing(models, mode, kw):
    """Candidates of a prompt with the same response so far are computed once (``ivg.twins``; at temperature 0.5
    the test models draw many): the tokens, values and scores of computing every row (values up to the rounding
    that any other batch gives: the CPU's matrix products round a row by the batch's size) and the naive
    baseline's; no block left in use."""
    opts = _opts(mode, temperature=0.5, **kw)
    merged = IVGDecoder(models, backend="reference")
    once = merged.generate(PROMPTS, opts)
    assert merged.last_stats.twin_rows > 0, "no twins: the test shows nothing"
    every = IVGDecoder(models, backend="reference", merge_twins=False)
    _same(once, every.generate(PROMPTS, opts))
    assert every.last_stats.twin_rows == 0
    assert every.last_stats.forwards == merged.last_stats.forwards  # (as many forwards, fewer rows in them)
    _same(once, NaiveDecoder(models).generate(PROMPTS, opts))
    assert set(merged.kv_blocks_in_use().values()) == {0}
    with pytest.raises(ValueError, match="merge_twins=None: expected True or False"):
        IVGDecoder(models, merge_twins=None)


def test_twin_classes_split_by_the_token_read():
    """``Twins.split``: rows are twins only within one class and reading one token; a class splits by token."""
    from ivg.search import Beam
    from ivg.twins import Twins

    tw = Twins()
    p, q = tw.new_class(), tw.new_class()  # two prompts' candidates
    rows = [Beam(0, [5], twin=p), Beam(1, [6], twin=p), Beam(2, [5], twin=p), Beam(0, [5], twin=q),
            Beam(3, [6], twin=p)]
    first, pick = tw.split(rows)
    assert first == [0, 1, 3] and pick == [0, 1, 0, 2, 1]
    assert rows[0].twin == rows[2].twin and rows[1].twin == rows[4].twin
    assert len({rows[0].twin, rows[1].twin, rows[3].twin, p, q}) == 5
    kid = rows[0].child(7)  # a child keeps its parent's class
    for b, t in ((rows[0], 8), (kid, 8), (rows[2], 9), (rows[3], 8)):
        b.tokens.append(t)
    assert tw.split([rows[0], kid, rows[2], rows[3]]) == ([0, 2, 3], [0, 0, 1, 2])


def test_guidance_changes_the_output(models):
    plain = IVGDecoder(models).generate(PROMPTS, _opts("plain"))
    eft = IVGDecoder(models).generate(PROMPTS, _opts("eft"))
    assert any(a.beams[0].tokens != b.beams[0].tokens for a, b in zip(plain, eft))


def test_combination_tokenrm_inside_implicit_search(models):
    opts = _opts("cbs", tokenwise=("tokenrm", "eft"), scorer="implicit")
    _same(IVGDecoder(models).generate(PROMPTS, opts), NaiveDecoder(models).generate(PROMPTS, opts))


def test_external_scorer_and_wrong_count(models):
    def by_vowels(prompts, responses):
        return [sum(c in "aeiou" for c in r) for r in responses]

    opts = _opts("cbs", scorer=by_vowels)
    _same(IVGDecoder(models).generate(PROMPTS, opts), NaiveDecoder(models).generate(PROMPTS, opts))
    # (the paged decoder scores every prompt ranked at a boundary in one call: 3 prompts x 6 candidates)
    with pytest.raises(ValueError, match="scorer: returned 1 scores for 18 candidates"):
        IVGDecoder(models).generate(PROMPTS, _opts("cbs", scorer=lambda p, r: [0.0]))
    with pytest.raises(ValueError, match="scorer: returned 1 scores for 6 candidates"):
        NaiveDecoder(models).generate(PROMPTS, _opts("cbs", scorer=lambda p, r: [0.0]))

    def nan_for_the_third(prompts, responses):  # NaN has no rank: the order it gave was arbitrary
        return [float("nan") if i == 2 else 1.0 for i in range(len(responses))]

    for decoder in (IVGDecoder(models), NaiveDecoder(models)):
        with pytest.raises(ValueError, match=rf"scorer: returned NaN for the response .* \(candidate 2\) of the prompt {PROMPTS[0]!r}"):
            decoder.generate(PROMPTS, _opts("cbs", scorer=nan_for_the_third))
        # not numbers, or nothing: named (a bare "could not convert string to float" or "not iterable" before)
        with pytest.raises(ValueError, match=rf"scorer: returned 'good' for the response .* \(candidate 0\) of the prompt {PROMPTS[0]!r}; expected a number"):
            decoder.generate(PROMPTS, _opts("cbs", scorer=lambda p, r: ["good"] * len(r)))
        with pytest.raises(ValueError, match=r"scorer: returned NoneType; expected a sequence of \d+ numbers, one per response"):
            decoder.generate(PROMPTS, _opts("cbs", scorer=lambda p, r: None))


def test_an_external_scorer_is_called_once_per_chunk_boundary(models):
    """Every prompt ranked at a chunk boundary is scored in one call (a reward model scores one batch, not
    one per prompt), with each candidate's own prompt beside it; the results are those of the naive
    decoder, which scores one prompt at a time."""
    calls = []

    def scorer(prompts, responses):
        calls.append(list(zip(prompts, responses)))
        return [sum(c in "aeiou" for c in r) - 0.01 * len(p) for p, r in zip(prompts, responses)]

    opts = _opts("cbs", scorer=scorer, eos_token_ids=())  # no EOS: every prompt reaches every boundary
    paged = IVGDecoder(models).generate(PROMPTS, opts)
    paged_calls, calls[:] = list(calls), []
    _same(paged, NaiveDecoder(models).generate(PROMPTS, opts))
    boundaries = -(-opts.max_new_tokens // opts.chunk_len)
    assert len(paged_calls) == boundaries and len(calls) == boundaries * len(PROMPTS)
    for call in paged_calls:
        assert Counter(p for p, _ in call) == {p: 6 for p in PROMPTS}  # W*K = 6 candidates of every prompt


def test_ties_go_to_the_lower_candidate_index(models):
    """Candidates with equal scores rank by their index, lowest first (``ivg.search``'s rule). Best-of-N with a
    scorer that ties every response therefore returns candidates 0 and 1 in that order, and candidate 0 draws
    with the keys plain sampling draws with (``(prompt seed, t * 2**16 + 0)``): the same tokens. Both decoders."""
    flat = _opts("bon", scorer=lambda prompts, responses: [1.0] * len(responses))
    plain = IVGDecoder(models).generate(PROMPTS, _opts("plain"))
    for dec in (IVGDecoder(models), NaiveDecoder(models)):
        out = dec.generate(PROMPTS, flat)
        for got, want in zip(out, plain):
            assert got.beams[0].tokens == want.beams[0].tokens
            assert [b.score for b in got.beams] == [1.0, 1.0]
        assert any(r.beams[0].tokens != r.beams[1].tokens for r in out)  # two candidates, not one twice


@pytest.mark.parametrize("mode", ["ivg", "bon"])
def test_batch_invariance(models, mode):
    opts = _opts(mode)
    together = IVGDecoder(models).generate(PROMPTS, opts)
    alone = [IVGDecoder(models).generate([p], opts)[0] for p in PROMPTS]
    _same(together, alone, tol=1e-12)
    reordered = IVGDecoder(models).generate(PROMPTS[::-1], opts)[::-1]
    _same(together, reordered, tol=1e-12)
    in_pairs = IVGDecoder(models, max_batch_prompts=2).generate(PROMPTS, opts)
    _same(together, in_pairs, tol=1e-12)


def test_continuous_batching_admits_waiting_prompts_without_changing_results(models):
    """Prompts that end at different steps (EOS at a high temperature): with room for two prompts, a
    waiting prompt takes the rows of one that finished; every result equals decoding it alone."""
    prompts = ["a", "the movie was", "it is", "so", "what a day"]
    opts = _opts("ivg", max_new_tokens=24, eos_token_ids=(5, 9), temperature=2.0, chunk_len=3)
    alone, steps_alone = [], []
    for p in prompts:
        dec = IVGDecoder(models)
        alone += dec.generate([p], opts)
        steps_alone.append(dec.last_stats.steps)
    assert len(set(steps_alone)) > 1, f"precondition: prompts end at different steps ({steps_alone})"
    dec = IVGDecoder(models, max_batch_prompts=2)
    _same(dec.generate(prompts, opts), alone, tol=1e-12)
    static = sum(max(steps_alone[i:i + 2]) for i in range(0, len(prompts), 2))  # fixed pairs, each to its end
    assert dec.last_stats.steps < static, (dec.last_stats.steps, static)
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_the_lazy_token_rm_scores_prompts_at_other_phases_in_one_forward(models, monkeypatch):
    """Prompts admitted as others finish by EOS take other chunk phases, and with a length limit that is not a
    multiple of the chunk length a prompt at its limit (its last chunk shorter) and another at a chunk boundary
    are scored by the lazy token RM in one forward, their rows reading different numbers of tokens, the twins
    among them computed once (the prompt at its limit first, as it was admitted first). Each row's count of tokens
    read is its own, and what a row that goes on has read decides its later values: every result equals decoding
    it alone."""
    from ivg import decode_loop

    prompts = ["a", "the movie was", "it is", "so", "what a day"]
    mixed, real = [], decode_loop.DecodeLoop._score_before_read

    def spy(self, every, steps, drawn):
        reads = [len(req.ids["rm"]) + len(b.tokens) - b.rm_read for _, req, b in every]
        twins = len({(b.twin, b.rm_read) for _, _, b in every}) < len(every)
        # rows that go on (their prompt not at its limit) reading another number of tokens than the first row
        other = any(n != reads[0] for n, (_, req, _) in zip(reads, every) if req.t < self.opts.max_new_tokens)
        mixed.append(twins and other)
        return real(self, every, steps, drawn)

    monkeypatch.setattr(decode_loop.DecodeLoop, "_score_before_read", spy)
    for temperature, eos in ((0.7, (3, 7)), (1.0, (9,)), (1.0, (5, 9))):  # (found by trying, for both families)
        opts = _opts("ivg", max_new_tokens=23, eos_token_ids=eos, temperature=temperature, chunk_len=3)
        mixed.clear()
        got = IVGDecoder(models, max_batch_prompts=2).generate(prompts, opts)
        if any(mixed):
            break
    else:
        pytest.fail("precondition: no setting scores, in one forward with twins, a row that goes on reading another "
                    "number of tokens than the first row")
    _same(got, [IVGDecoder(models).generate([p], opts)[0] for p in prompts], tol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_reading_the_device_less_often_changes_nothing(models, mode):
    """The host reads the drawn tokens every ``read_every`` steps (and at chunk boundaries and the length
    limit) instead of every step: rows that drew EOS between reads run on, and what they drew after it
    is dropped, so tokens, values, token counts and freed blocks are those of reading every step."""
    # EOS: the token these rows draw most often without one, so that it ends some rows whatever the stream.
    probe = IVGDecoder(models).generate(PROMPTS, _opts(mode, max_new_tokens=20, eos_token_ids=(), temperature=2.0,
                                                       chunk_len=3))
    eos = Counter(t for r in probe for b in r.beams for t in b.tokens).most_common(1)[0][0]
    opts = _opts(mode, max_new_tokens=20, eos_token_ids=(eos,), temperature=2.0, chunk_len=3)
    every = IVGDecoder(models, read_every=1)
    expected = every.generate(PROMPTS, opts)
    assert any(len(b.tokens) < 20 for r in expected for b in r.beams), "precondition: EOS ends some rows"
    for k in (4, 64):
        dec = IVGDecoder(models, read_every=k, max_batch_prompts=2)
        _same(dec.generate(PROMPTS, opts), expected, tol=1e-12)
        assert dec.last_stats.new_tokens == every.last_stats.new_tokens
        assert dec.last_stats.host_reads < every.last_stats.host_reads
        assert sum(dec.kv_blocks_in_use().values()) == 0


@pytest.mark.filterwarnings("ignore::ivg.decoder.RepeatedPromptsWarning")  # (the same prompts on purpose)
@pytest.mark.parametrize("mode", ["ivg", "cbs"])
def test_prompts_admitted_between_reads_share_one_chunk_phase(models, monkeypatch, mode):
    """Reading every few steps, a search admits a waiting prompt only where every active prompt is at a
    chunk boundary: all active prompts then share one phase of their chunks, so one read serves every
    boundary (admitted mid-chunk, as prompts finish by EOS at other steps, their boundaries would come
    at other steps and each would read every row). Results are those of reading every step."""
    from ivg import decode_loop

    prompts = PROMPTS * 3
    probe = IVGDecoder(models).generate(prompts, _opts(mode, max_new_tokens=20, eos_token_ids=(), temperature=2.0))
    common = [t for t, _ in Counter(t for r in probe for b in r.beams for t in b.tokens).most_common(8)]
    real_read, real_init = decode_loop.DecodeLoop.read, decode_loop.DecodeLoop.__init__

    def run(opts, align: bool):
        phases = []

        def read(self):
            phases.append({(r.t - r.chunk_start) % opts.chunk_len for r in self.active})
            return real_read(self)

        def init(self, *a, **k):
            real_init(self, *a, **k)
            self.align = self.align and align

        monkeypatch.setattr(decode_loop.DecodeLoop, "read", read)
        monkeypatch.setattr(decode_loop.DecodeLoop, "__init__", init)
        dec = IVGDecoder(models, read_every=4, max_batch_prompts=3)
        out = dec.generate(prompts, opts)
        assert sum(dec.kv_blocks_in_use().values()) == 0
        return out, phases, dec.last_stats.host_reads

    # EOS: the fewest of the rows' most common tokens with which prompts end at steps that would spread
    # the phases of the prompts admitted after them (found with the alignment off)
    for n in range(1, len(common) + 1):
        opts = _opts(mode, max_new_tokens=20, eos_token_ids=common[:n], temperature=2.0, chunk_len=3)
        _, spread, reads_spread = run(opts, align=False)
        if any(len(p) > 1 for p in spread):
            break
    else:
        pytest.fail("precondition: no EOS set makes prompts admitted mid-chunk take other phases")
    out, phases, reads = run(opts, align=True)
    assert all(len(p) <= 1 for p in phases), phases
    assert reads < reads_spread
    _same(out, IVGDecoder(models, read_every=1).generate(prompts, opts), tol=1e-12)


def test_the_host_reads_once_per_chunk_without_eos(models):
    """No EOS and no stop string: a search reads the device once per chunk boundary and at the length
    limit (the drawn tokens and the lazy token RM's values there, together); a token-wise mode once, at
    the end."""
    ivg = IVGDecoder(models, read_every=64)
    ivg.generate(PROMPTS, _opts("ivg", max_new_tokens=14, chunk_len=4, eos_token_ids=()))
    assert ivg.last_stats.host_reads == 4  # t = 4, 8, 12, 14
    plain = IVGDecoder(models, read_every=64)
    plain.generate(PROMPTS, _opts("eft", max_new_tokens=14, eos_token_ids=()))
    assert (plain.last_stats.host_reads, plain.last_stats.steps) == (1, 14)
    stops = IVGDecoder(models, read_every=64)  # stop strings are checked on the host: every step
    stops.generate(PROMPTS, _opts("eft", max_new_tokens=14, eos_token_ids=(), stop=("zzz",)))
    assert stops.last_stats.host_reads == stops.last_stats.steps == 14
    with pytest.raises(ValueError, match="read_every=0: expected None or an int >= 1"):
        IVGDecoder(models, read_every=0)


@pytest.mark.parametrize("bad_step", [3, 14])
def test_a_nan_row_between_reads_raises_and_frees_every_block(models, monkeypatch, bad_step):
    """Flagged rows are reported when the host reads them; the tokens they stand for (-1) are never fed. Also
    when the flagged step is the last one the read takes (14, the length limit: a flag there is not a finish)."""
    import ivg_kernels

    calls, real = [], ivg_kernels.guided_sample

    def poisoned(logits, *a, **k):
        calls.append(1)
        if len(calls) == bad_step:
            logits = logits.clone()
            logits[1] = torch.nan
        return real(logits, *a, **k)

    monkeypatch.setattr(ivg_kernels, "guided_sample", poisoned)
    dec = IVGDecoder(models, read_every=64)
    with pytest.raises(RuntimeError, match=r"rows \[1\] had NaN/inf logits"):
        dec.generate(PROMPTS, _opts("eft", max_new_tokens=14, eos_token_ids=()))
    assert len(calls) == 14, "the flagged row was reported before the read"
    assert set(dec.kv_blocks_in_use().values()) == {0}


@pytest.mark.parametrize("speculate", [0, 3])
def test_values_equal_a_from_scratch_recomputation(models, speculate):
    """Also for the tokens speculative rounds keep (values from the verification forwards)."""
    dec = IVGDecoder(models)
    res = dec.generate(PROMPTS, _opts("ivg", speculate=speculate))  # eft token-wise, explicit scorer: both values
    assert (dec.last_stats.drafted > 0) == bool(speculate)
    tok = models.tokenizer
    g = models.guides[0]
    for r in res:
        prompt = tok(r.prompt, add_special_tokens=False)["input_ids"]
        y = r.beams[0].tokens
        with torch.no_grad():
            x = torch.tensor([prompt + y])
            lt = torch.log_softmax(g.tuned(x).logits[0, len(prompt) - 1:-1].double(), -1)
            lr = torch.log_softmax(g.ref(x).logits[0, len(prompt) - 1:-1].double(), -1)
            idx = torch.tensor(y)[:, None]
            implicit = g.beta * float((lt.gather(1, idx) - lr.gather(1, idx)).sum())
            q = models.token_rm(input_ids=torch.tensor([prompt + y[:-1]])).logits[0, -1, y[-1]]
        assert abs(r.beams[0].implicit_value - implicit) < 1e-9
        assert abs(r.beams[0].explicit_value - float(q)) < 1e-9


def test_eos_and_a_stop_string_spanning_two_tokens(models):
    dec = IVGDecoder(models)
    free = dec.generate(PROMPTS[:1], _opts("plain", max_new_tokens=20, eos_token_ids=()))[0].beams[0]
    toks = free.tokens
    # EOS: end at the first occurrence of a token that the free run drew.
    eos = toks[5]
    cut = dec.generate(PROMPTS[:1], _opts("plain", max_new_tokens=20, eos_token_ids=(eos,)))[0].beams[0]
    assert cut.tokens == toks[: toks.index(eos) + 1]
    # A stop string made of two drawn tokens (characters): the response stops at its second token.
    tok = models.tokenizer
    stop = tok.decode(toks[6:8])
    first = free.text.find(stop)
    assert len(stop) == 2 and first >= 0
    stopped = dec.generate(PROMPTS[:1], _opts("plain", max_new_tokens=20, eos_token_ids=(), stop=(stop,)))[0]
    assert stopped.beams[0].tokens == toks[: first + 2]
    assert stopped.beams[0].text == free.text[:first]


def test_no_blocks_in_use_after_generate_and_after_an_error(models):
    dec = IVGDecoder(models)
    dec.generate(PROMPTS, _opts("ivg"))
    assert set(dec.kv_blocks_in_use().values()) == {0}
    calls = []

    def flaky(prompts, responses):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("scorer failed")
        return [0.0] * len(responses)

    with pytest.raises(RuntimeError, match="scorer failed"):
        dec.generate(PROMPTS, _opts("cbs", scorer=flaky))
    assert set(dec.kv_blocks_in_use().values()) == {0}
    assert models.base.config._attn_implementation != "ivg_paged", "the model's attention was not given back"


@pytest.mark.parametrize("mode", ["ivg", "tokenrm", "bon"])
def test_every_row_draws_from_its_own_sequences_logits(models, monkeypatch, mode):
    """Before every draw, each row's logits for every model equal that model's logits for the row's own
    prompt and response, computed from scratch: no row reads another's cache or takes another's logits
    (after forks, prunes, copy-on-write and admissions). The other tests compare what a call returns;
    this looks at every row before every draw, pruned ones included."""
    from ivg.decode_loop import DecodeLoop

    modules = {name: module for name, module, _ in models.roles()}
    real, checked = DecodeLoop.sample, []

    def sample(self):
        for name, logits in self.cur.items():
            seqs = [req.ids[name] + b.tokens for req, b in self.rows]
            with torch.no_grad():
                want = torch.stack([modules[name](input_ids=torch.tensor([x])).logits[0, -1] for x in seqs])
            torch.testing.assert_close(logits, want.to(logits.dtype), rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"{name} after {checked.count(name)} checks: {m}")
            checked.append(name)
        return real(self)

    monkeypatch.setattr(DecodeLoop, "sample", sample)
    opts = _opts(mode, max_new_tokens=9, eos_token_ids=(), temperature=1.0)
    IVGDecoder(models, max_batch_prompts=2).generate(PROMPTS, opts)  # the third prompt admitted later
    assert checked.count("base") >= 9


@pytest.mark.parametrize("mode", ["ivg", "cbs"])
def test_frees_after_the_launch_and_a_pool_short_before_them(models, monkeypatch, mode):
    """The rows a read prunes or finishes free their blocks after the next forwards are launched (the
    host's work then runs beside them); should a model's pool run short before those frees, the models
    that already read go back, the blocks are freed and every model reads again: the same results."""
    from ivg.decode_loop import DecodeLoop
    from ivg_kernels.block_manager import KVCacheExhausted

    opts = _opts(mode, max_new_tokens=12, eos_token_ids=(EOS,))
    dec = IVGDecoder(models)
    expected = dec.generate(PROMPTS, opts)
    held, real = [], DecodeLoop._forward_last

    class Short:
        """A pool short once: the step's last model's (in ivg after the others have read; in cbs the only one)."""

        def __init__(self, loop, name):
            self.loop, self.name, self.pm = loop, name, loop.paged[name]

        def __call__(self, *a, **k):
            self.loop.paged[self.name] = self.pm
            raise KVCacheExhausted("test: short before the frees")

    def forward_last(self, rows):
        if self._free_later:  # dropped rows still hold their blocks while the forwards go out
            held.append(len(self._free_later))
            if len(held) == 1:
                self.paged[self.step_names[-1]] = Short(self, self.step_names[-1])
        return real(self, rows)

    monkeypatch.setattr(DecodeLoop, "_forward_last", forward_last)
    _same(dec.generate(PROMPTS, opts), expected, tol=0.0)
    assert held, "no read dropped a row before a forward"
    assert set(dec.kv_blocks_in_use().values()) == {0}


def test_kv_caches_are_reused_across_calls_when_they_fit(models, monkeypatch):
    """A second call reuses the first call's pools when they are large enough (same results as a fresh
    decoder); a call that needs more, or other models, gets new ones; an error in between changes nothing."""
    import ivg_kernels

    dec = IVGDecoder(models)
    first = dec.generate(PROMPTS, _opts("ivg"))
    pools = {n: c.pool.kv for n, c in dec._group.caches.items()}
    paged = dict(dec._paged)
    assert models.base.config._attn_implementation != "ivg_paged", "the model's attention was not given back"
    real, calls = ivg_kernels.guided_sample, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("sampler failed")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ivg_kernels, "guided_sample", flaky)
        with pytest.raises(RuntimeError, match="sampler failed"):
            dec.generate(PROMPTS, _opts("ivg"))
    again = dec.generate(PROMPTS[:2], _opts("ivg"))
    assert all(dec._group.caches[n].pool.kv is kv for n, kv in pools.items()), "the fitting pools were not reused"
    assert all(dec._paged[n] is pm for n, pm in paged.items()), "the paged models (and graphs) were not kept"
    assert models.base.config._attn_implementation != "ivg_paged", "the model's attention was not given back"
    _same(again, first[:2])
    longer = dec.generate(PROMPTS, _opts("ivg", max_new_tokens=40))
    assert dec._group.caches["base"].pool.kv is not pools["base"], "a pool too small was reused"
    assert dec._group.caches["base"].pool.kv.shape[2] >= 3 * pools["base"].shape[2] // 2, "the pool grew too little"
    assert dec._paged["base"] is not paged["base"] and dec._paged["base"].cache is dec._group.caches["base"]
    _same(longer, IVGDecoder(models).generate(PROMPTS, _opts("ivg", max_new_tokens=40)))
    plain = dec.generate(PROMPTS, _opts("plain"))  # base only: another set of models
    assert set(dec._group.caches) == {"base"}
    _same(plain, IVGDecoder(models).generate(PROMPTS, _opts("plain")))


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_decode_steps_over_graph_buffers_change_nothing(models, monkeypatch, shared_prefix):
    """Every decode step through ``ivg.cuda_graphs`` (off CUDA: its static, padded buffers run eagerly),
    fed from the sampler's tokens between reads, with beam groups as graph inputs or not: the results of
    the plain forwards."""
    opts = _opts("ivg", max_new_tokens=10, eos_token_ids=())
    want = IVGDecoder(models, block_size=4, shared_prefix=shared_prefix).generate(PROMPTS, opts)
    with_graph_buffers(monkeypatch)
    dec = IVGDecoder(models, block_size=4, shared_prefix=shared_prefix, read_every=3)
    _same(dec.generate(PROMPTS, opts), want, tol=1e-6)
    keys = [key for pm in dec._paged.values() for key in pm.graphs._graphs]
    assert keys and all(pm.graphs.replays for n, pm in dec._paged.items() if n != "rm")  # the RM only extends
    assert any(k[2] for k in keys) == shared_prefix, keys
    # A second call keeps the paged models and their graphs (no new capture) and gives the same results.
    captures = {n: pm.graphs.captures for n, pm in dec._paged.items()}
    _same(dec.generate(PROMPTS, opts), want, tol=1e-6)
    assert {n: pm.graphs.captures for n, pm in dec._paged.items()} == captures


def test_a_pool_that_cannot_grow_by_half_gets_what_the_call_needs(models, monkeypatch):
    """Growing a too-small pool by half is headroom, not a need: when that much memory is not free the
    decoder allocates what the call needs, with the same results."""
    import ivg.decoder as decoder_module

    dec = IVGDecoder(models)
    dec.generate(PROMPTS, _opts("ivg", max_new_tokens=14))
    small = dec._group.caches["base"].pool.kv.shape[2]
    real, sizes = decoder_module.KVCache, []

    def tight(*args, num_blocks, **kwargs):
        sizes.append(num_blocks)
        if num_blocks >= 3 * small // 2 and len(sizes) == 1:  # the first, grown, allocation fails
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, num_blocks=num_blocks, **kwargs)

    monkeypatch.setattr(decoder_module, "KVCache", tight)
    got = dec.generate(PROMPTS, _opts("ivg", max_new_tokens=18))  # a little more than the pools hold
    assert sizes[0] >= 3 * small // 2 and small < sizes[1] < sizes[0], sizes
    _same(got, IVGDecoder(models).generate(PROMPTS, _opts("ivg", max_new_tokens=18)))
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_run_stats_split_the_wall_time_at_the_forwards(models):
    dec = IVGDecoder(models)
    dec.generate(PROMPTS, _opts("ivg"))
    st = dec.last_stats
    assert 0 < st.forward_s < st.wall_s and 0 < st.outside_forwards < 1


@pytest.mark.parametrize("kw,match", [
    (dict(mode="cbs", width=0), "width=0"),
    (dict(mode="cbs", successors=0), "successors=0"),
    (dict(mode="cbs", chunk_len=0), "chunk_len=0"),
    (dict(mode="bon", n=0), "n=0"),
    (dict(mode="nope"), "mode='nope'"),
    (dict(mode="cbs", num_return=5), "num_return=5"),
    (dict(mode="plain", max_new_tokens=0), "max_new_tokens=0"),
    (dict(mode="cbs", width=300, successors=300), r"width \* successors = 90000: expected at most 65536 candidates"),
    (dict(mode="bon", n=1 << 17), r"n=131072: expected at most 65536 candidates"),
    (dict(mode="plain", eos_token_ids="1"), r"eos_token_ids='1': expected token ids"),
    (dict(mode="plain", eos_token_ids=(1, -2)),
     r"eos_token_ids=\(1, -2\): expected token ids \(ints >= 0 below 2\*\*63\)"),
    (dict(mode="plain", eos_token_ids=2 ** 70), r"eos_token_ids=\(1180591620717411303424,\): expected token ids"),
    (dict(mode="eft", tokenwise=1.5), r"tokenwise=1.5: expected a subset of \('eft', 'tokenrm'\)"),
    (dict(mode="eft", tokenwise=(1,)), r"tokenwise=\(1,\): expected a subset"),
    (dict(mode="eft", tokenwise="nope"), r"tokenwise='nope': expected a subset"),
    (dict(mode="plain", stop=("ab", 3)), r"stop=\('ab', 3\): expected a string or a sequence of strings"),
])
def test_bad_options(models, kw, match):
    with pytest.raises(ValueError, match=match):
        IVGDecoder(models).generate(PROMPTS, DecodeOptions(**kw))


@pytest.mark.parametrize("models_arg", [None, {"base": 1}, "gpt2"])
def test_models_that_are_not_ivg_models_are_named(models_arg):
    """A dict or a path where ``IVGModels`` belongs failed with an AttributeError at its first use."""
    for decoder in (IVGDecoder, NaiveDecoder):
        with pytest.raises(ValueError, match=r"models=\w+: expected an ivg.IVGModels \(ivg.api.load_models makes"):
            decoder(models_arg)


@pytest.mark.parametrize("options", [None, {"mode": "ivg"}, "ivg"])
def test_options_that_are_not_decode_options_are_named(models, options):
    """A dict or a mode name where ``DecodeOptions`` belongs failed with an AttributeError ('dict' object has no
    attribute 'resolved'), in both decoders."""
    for dec in (IVGDecoder(models), NaiveDecoder(models)):
        with pytest.raises(ValueError, match=r"options=.*: expected an ivg.DecodeOptions"):
            dec.generate(PROMPTS, options)


@pytest.mark.parametrize("kw,match", [
    (dict(top_p=1.5), r"top_p=1.5: expected top_p in \(0, 1\]"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=-3), "top_k=-3: expected top_k >= 0"),
    (dict(top_k=2.5), "top_k=2.5: expected an int"),
    (dict(min_p=2.0), r"min_p=2.0: expected min_p in \[0, 1\]"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(seed=1.5), "seed=1.5: expected an int"),
    (dict(seed=1 << 63), "seed=9223372036854775808: expected an int64"),
])
def test_sampler_options_are_checked_with_the_others(kw, match):
    """The sampler's settings fail when the options are resolved (as W, K and L do: before any model runs,
    and in the CLI before the models load), not at the first draw."""
    with pytest.raises(ValueError, match=match):
        DecodeOptions(mode="ivg", **kw).resolved(have_guides=True, have_token_rm=True)


@pytest.mark.parametrize("kw,models_have,match", [
    (dict(mode="plain", num_return=2), {}, r"num_return=2: expected at most 1 for mode 'plain'"),  # W is 4 here
    (dict(mode="bon", n=2, num_return=3), {}, r"num_return=3: expected at most 2 for mode 'bon'"),
    (dict(mode="plain", eos_token_ids=(True,)), {}, r"eos_token_ids=\(True,\): expected token ids"),
    (dict(mode="cbs", scorer="implicit"), dict(have_guides=False),
     r"mode='cbs': needs at least one \(tuned, ref\) guide pair"),
    (dict(mode="cbs", scorer="explicit"), dict(have_token_rm=False), r"mode='cbs': needs a token reward model"),
])
def test_options_that_the_mode_or_the_models_cannot_serve(kw, models_have, match):
    """The checks that depend on the mode (a token-wise mode returns one response, whatever W says) or on the
    models (a scorer needs its model), when the options are resolved."""
    have = dict(dict(have_guides=True, have_token_rm=True), **models_have)
    with pytest.raises(ValueError, match=match):
        DecodeOptions(**kw).resolved(**have)


def test_candidates_per_prompt_may_reach_the_key_stride_and_no_more():
    """Candidate j of a prompt draws at step t with the offset ``t * OFFSET_STRIDE + j``: up to ``OFFSET_STRIDE``
    candidates have keys of their own, and one more would share its keys with candidate 0 of the next step."""
    from ivg.search import OFFSET_STRIDE

    side = int(OFFSET_STRIDE ** 0.5)
    assert side * side == OFFSET_STRIDE
    resolve = dict(have_guides=True, have_token_rm=True)
    assert DecodeOptions(mode="bon", n=OFFSET_STRIDE).resolved(**resolve).successors == OFFSET_STRIDE
    assert DecodeOptions(mode="cbs", width=side, successors=side).resolved(**resolve).width == side
    with pytest.raises(ValueError, match=rf"n={OFFSET_STRIDE + 1}: expected at most {OFFSET_STRIDE} candidates"):
        DecodeOptions(mode="bon", n=OFFSET_STRIDE + 1).resolved(**resolve)
    with pytest.raises(ValueError, match=rf"width \* successors = {side * (side + 1)}: expected at most"):
        DecodeOptions(mode="cbs", width=side, successors=side + 1).resolved(**resolve)


def test_bad_prompts(models):
    dec = IVGDecoder(models)
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty"):
        dec.generate(["ok", ""], _opts("plain"))
    with pytest.raises(ValueError, match="prompts: expected a non-empty list"):
        dec.generate([], _opts("plain"))
    with pytest.raises(ValueError, match=r"prompts\[0\]: .*exceed base's 96 positions"):
        dec.generate(["a" * 90], _opts("plain", max_new_tokens=10))
    vocab = models.base.config.vocab_size
    for bad, message in (([3, vocab], rf"prompts\[1\]: token id {vocab} outside base's vocabulary \[0, {vocab}\)"),
                         ([3, -1], r"prompts\[1\]: token id -1 outside base's vocabulary"),
                         ([3.0, 4.0], r"prompts\[1\]: token id 3.0 is not an int"),
                         ([True], r"prompts\[1\]: token id True is not an int"),
                         (None, r"prompts\[1\]: expected a string or a list of token ids, got NoneType"),
                         (torch.tensor([[3, 4]]), r"prompts\[1\]: expected a 1-D integer tensor")):
        for decoder in (dec, NaiveDecoder(models)):
            with pytest.raises(ValueError, match=message):
                decoder.generate([[3, 4], bad], _opts("ivg"))
    assert set(dec.kv_blocks_in_use().values()) <= {0}
    for decoder in (IVGDecoder(models), NaiveDecoder(models)):  # check(): generate's errors, nothing decoded
        with pytest.raises(ValueError, match=r"prompts\[1\]: token id -1 outside base's vocabulary"):
            decoder.check([[3, 4], [3, -1]], _opts("ivg"))
        with pytest.raises(ValueError, match=r"width=0"):
            decoder.check(PROMPTS, _opts("cbs", width=0))
        assert decoder.check(PROMPTS, _opts("ivg")) is None and decoder.last_stats.prompts == 0
    # token ids as a list, a tuple, a 1-D tensor or numpy array: the same prompt
    import numpy as np

    same = [dec.generate([p], _opts("eft"))[0].beams[0].tokens
            for p in ([3, 4, 5], (3, 4, 5), torch.tensor([3, 4, 5]), np.array([3, 4, 5]))]
    assert same[0] == same[1] == same[2] == same[3]


def test_mismatched_tokenizers_are_named():
    vocab = char_tokenizer().get_vocab()
    # Same size, different map: swap two characters' ids in a new tokenizer.
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    v2 = dict(vocab)
    v2["a"], v2["b"] = vocab["b"], vocab["a"]
    t = Tokenizer(tmodels.WordLevel(v2, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    t.decoder = decoders.Fuse()
    swapped = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<eos>")
    with pytest.raises(ValueError, match=r"tokenizer of tune0: differs .* id \d+: 'a' vs 'b'"):
        IVGDecoder(ivg_models("gpt2", other_tokenizers={"tune0": swapped}))


def test_eos_is_read_from_the_tokenizer(models):
    res = IVGDecoder(models).generate(PROMPTS, _opts("bon", max_new_tokens=30))
    for r in res:
        for b in r.beams:
            assert EOS not in b.tokens[:-1]


def test_models_with_different_prompt_templates():
    """Guides and token RM see their own template; per-model lengths differ on the paged cache."""
    m = ivg_models("gpt2", templates={"guide": "review: {prompt}", "token_rm": "q? {prompt}"})
    opts = _opts("ivg")
    paged = IVGDecoder(m).generate(PROMPTS, opts)
    _same(paged, NaiveDecoder(m).generate(PROMPTS, opts))
    plain_templates = IVGDecoder(ivg_models("gpt2")).generate(PROMPTS, opts)
    assert any(a.beams[0].tokens != b.beams[0].tokens for a, b in zip(paged, plain_templates))


def test_repeated_prompts_are_warned_of_and_get_the_same_response(models):
    """A result depends only on prompt, options and seed, so a prompt given twice gets one response twice; the
    project's own demo and benchmarks once averaged over such repeats as if they were samples. Said once per call;
    distinct prompts say nothing."""
    opts = _opts("eft", max_new_tokens=4, temperature=0.9)
    with pytest.warns(UserWarning, match=r"prompts: 2 of 4 repeat an earlier prompt.*num_return"):
        res = IVGDecoder(models).generate([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]], opts)
    assert res[0].beams[0].tokens == res[2].beams[0].tokens == res[3].beams[0].tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IVGDecoder(models).generate(PROMPTS[:2], opts)


def test_progress_is_a_tqdm_bar_over_prompts(models, capsys):
    IVGDecoder(models).generate(PROMPTS, _opts("plain", max_new_tokens=4), progress=True)
    err = capsys.readouterr().err
    assert "ivg generate" in err and f"{len(PROMPTS)}/{len(PROMPTS)}" in err and "prompt" in err
    IVGDecoder(models).generate(PROMPTS, _opts("plain", max_new_tokens=4))
    assert capsys.readouterr().err == ""


def test_one_stop_string_and_one_eos_id_need_no_tuple(models):
    """``stop="ab"`` is the stop string "ab" (it stopped at an "a" or a "b" when taken as a sequence of
    characters), ``eos_token_ids=5`` the id 5 (a TypeError before), ``stop=None`` none."""
    dec = IVGDecoder(models)
    free = dec.generate(PROMPTS[:1], _opts("plain", max_new_tokens=20, eos_token_ids=()))[0].beams[0]
    text = free.text  # a two-character stop string whose first occurrence comes after one of its characters
    at = next(p for p in range(1, len(text) - 1) if text.find(text[p:p + 2]) == p and set(text[p:p + 2]) & set(text[:p]))
    stop = text[at:at + 2]
    one = dec.generate(PROMPTS[:1], _opts("plain", max_new_tokens=20, eos_token_ids=(), stop=stop))[0].beams[0]
    assert one.text == text[:at], f"{stop!r} in {text!r}"
    assert dec.generate(PROMPTS[:1], _opts("plain", max_new_tokens=20, eos_token_ids=(), stop=None))[0].beams[0].tokens \
        == free.tokens
    eos = free.tokens[5]
    cut = dec.generate(PROMPTS[:1], _opts("plain", max_new_tokens=20, eos_token_ids=eos))[0].beams[0]
    assert cut.tokens == free.tokens[:free.tokens.index(eos) + 1]


def test_one_tokenwise_kind_may_be_a_string():
    """``tokenwise="eft"`` was read as its characters ('e', 'f', 't') and refused; one kind is a string, as one stop
    string is."""
    have = dict(have_guides=True, have_token_rm=True)
    assert DecodeOptions(mode="cbs", tokenwise="eft").resolved(**have).tokenwise == ("eft",)
    assert DecodeOptions(mode="cbs", tokenwise=["eft", "tokenrm"]).resolved(**have).tokenwise == ("eft", "tokenrm")


def test_options_given_as_numpy_numbers_decode_as_python_ones(models):
    """A NumPy integer width passed the options' checks, then the KV pool refused the sizes it made
    ("num_blocks=np.int64(17): expected a positive int"); an array of EOS ids was refused."""
    import numpy as np

    dec = IVGDecoder(models)
    plain = dict(mode="ivg", width=2, successors=3, chunk_len=2, max_new_tokens=7, seed=4, temperature=0.9,
                 top_k=5, eos_token_ids=(5, 7), num_return=2)
    numpy = dict(plain, width=np.int64(2), successors=np.int32(3), chunk_len=np.int64(2), max_new_tokens=np.int64(7),
                 seed=np.int64(4), temperature=np.float64(0.9), top_k=np.int64(5), eos_token_ids=np.array([5, 7]),
                 num_return=np.int64(2))
    resolved = DecodeOptions(**numpy).resolved(have_guides=True, have_token_rm=True)
    assert all(type(getattr(resolved, k)) is int for k in ("width", "successors", "chunk_len", "max_new_tokens", "seed"))
    _same(dec.generate(PROMPTS, DecodeOptions(**numpy)), dec.generate(PROMPTS, DecodeOptions(**plain)))


def test_ivg_models_checks_its_arguments_as_given(models):
    """Errors name the argument when IVGModels is built, not deep in the first step; a (tuned, ref, beta)
    triple (as IVGLogitsProcessor takes) is a GuidePair."""
    g = models.guides[0]
    with pytest.raises(ValueError, match=r"guides\[0\].beta='1': expected a finite number"):
        IVGModels(models.base, [GuidePair(g.tuned, g.ref, "1")])
    with pytest.raises(ValueError, match=r"token_rm_weight=nan: expected a finite number"):
        IVGModels(models.base, [g], models.token_rm, float("nan"))
    with pytest.raises(ValueError, match=r"guides: expected a list of GuidePair .* got GuidePair"):
        IVGModels(models.base, g)
    with pytest.raises(ValueError, match=r"guides\[0\].ref: expected a torch.nn.Module, got str"):
        IVGModels(models.base, [(g.tuned, "ref", 1.0)])
    with pytest.raises(ValueError, match=r"base: expected a torch.nn.Module"):
        IVGModels("gpt2")
    with pytest.raises(ValueError, match=r"templates\['rm'\]: expected a role among base, guide, token_rm"):
        IVGModels(models.base, [g], templates={"rm": "{prompt}"})
    triple = IVGModels(models.base, [(g.tuned, g.ref, g.beta)], models.token_rm, models.token_rm_weight,
                       models.tokenizer)
    assert triple.guides == [GuidePair(g.tuned, g.ref, g.beta)]
    _same(IVGDecoder(triple).generate(PROMPTS, _opts("ivg")), IVGDecoder(models).generate(PROMPTS, _opts("ivg")))


def test_generate_runs_in_inference_mode(models, monkeypatch):
    """No autograd bookkeeping on the decode path (a refactor once moved the decorator to another method)."""
    from ivg.decode_loop import DecodeLoop

    seen, real = [], DecodeLoop.sample

    def sample(self):
        seen.append(torch.is_inference_mode_enabled())
        return real(self)

    monkeypatch.setattr(DecodeLoop, "sample", sample)
    IVGDecoder(models).generate(PROMPTS[:1], _opts("eft", max_new_tokens=3))
    assert seen and all(seen)
