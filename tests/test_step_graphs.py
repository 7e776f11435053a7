"""Whole decode steps replayed as one graph (ivg.step_graphs): every model's forward and the next draw.

Off CUDA nothing is captured: a replay runs the same step eagerly over the graph's static, padded
buffers (``with_graph_buffers``), which is what these tests check against the per-model path and the
decoder without graphs. The capture itself is checked on a GPU (tests/test_gpu.py)."""
import warnings

import pytest

from ivg.cuda_graphs import _Captured
from ivg.decoder import IVGDecoder
from ivg.round_graphs import _RoundGraph
from ivg.step_graphs import StepGraphs, _StepGraph

from .decoder_fixtures import ivg_models, with_graph_buffers
from .test_decoder import PROMPTS, _opts, _same


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request):
    return ivg_models(request.param)


def _decoder(models, **kw):
    return IVGDecoder(models, block_size=4, shared_prefix=False, read_every=3, **kw)


@pytest.mark.parametrize("mode", ["plain", "eft", "tokenrm", "ivg"])
def test_whole_steps_change_nothing(models, monkeypatch, mode):
    """Between reads every step is one replay (the forwards of every model run each step, the token RM's
    too when it guides, then the draw over the padded rows): the results of per-model steps and of the
    decoder without graphs; reads every 3 steps and at chunk boundaries, EOS on."""
    opts = _opts(mode, max_new_tokens=10)
    want = _decoder(models).generate(PROMPTS, opts)
    with_graph_buffers(monkeypatch)
    per_model = _decoder(models, step_graphs=False)
    _same(per_model.generate(PROMPTS, opts), want, tol=1e-6)
    assert per_model.last_stats.step_replays == 0 and per_model._steps is None
    dec = _decoder(models)
    _same(dec.generate(PROMPTS, opts), want, tol=1e-6)
    st = dec.last_stats
    assert st.step_replays > 0, st
    names = {"plain": 1, "eft": 3, "tokenrm": 2, "ivg": 3}[mode]  # models run every step (a lazy token RM is not)
    assert dec._steps.forwards == names * st.step_replays
    assert st.graph_replays >= dec._steps.forwards
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_step_graphs_are_kept_from_call_to_call(models, monkeypatch):
    """A second call replays the step graphs the first captured (the same pools, the same draw settings);
    other draw settings are another key; new pools drop them."""
    with_graph_buffers(monkeypatch)
    dec = _decoder(models)
    opts = _opts("eft", max_new_tokens=10)
    first = dec.generate(PROMPTS, opts)
    steps, captures = dec._steps, dec._steps.captures
    assert captures >= 1
    _same(dec.generate(PROMPTS, opts), first, tol=0.0)
    assert dec._steps is steps and steps.captures == captures
    dec.generate(PROMPTS, _opts("eft", max_new_tokens=10, temperature=0.5))
    assert dec._steps is steps and steps.captures > captures  # the temperature is part of the key
    dec.generate(PROMPTS, _opts("eft", max_new_tokens=40))  # pools too small: new ones, new paged models
    assert dec._steps is not steps


@pytest.mark.parametrize("whole", [True, False], ids=["whole-step", "per-model"])
def test_a_failed_capture_falls_back_to_per_model_steps(models, monkeypatch, whole):
    """A step graph (or, without whole steps, a model's decode graph) that cannot be captured is tried once per
    key: it warns once, and those steps run per model (eagerly) with the same results, in a second call too."""
    opts = _opts("ivg", max_new_tokens=10)
    want = _decoder(models).generate(PROMPTS, opts)
    with_graph_buffers(monkeypatch)
    tries = []

    def fail(self, *args):
        tries.append(args)
        raise RuntimeError("no capture here")

    monkeypatch.setattr(_StepGraph if whole else _Captured, "__init__", fail)
    dec = _decoder(models, step_graphs=whole)
    for call in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # (every warning recorded: none hidden as a repeat)
            _same(dec.generate(PROMPTS, opts), want, tol=1e-6)
        warned = [w for w in caught if "no capture here" in str(w.message)]
        said = "CUDA graph capture of a whole step" if whole else "CUDA graph capture failed for batch"
        assert all(said in str(w.message) for w in warned), [str(w.message) for w in warned]
        # the keys that failed: the step graphs', or each model's own
        failed = len(dec._steps._failed) if whole else sum(len(pm.graphs._failed) for pm in dec._paged.values())
        assert failed and len(tries) == failed, (len(tries), failed)  # each key tried once, in the first call
        assert len(warned) == (failed if call == 0 else 0), [str(w.message) for w in warned]
        # no step replayed whole; without whole steps, no model's step either
        assert dec.last_stats.step_replays == 0 and (whole or dec.last_stats.graph_replays == 0)
        assert sum(dec.kv_blocks_in_use().values()) == 0


@pytest.mark.parametrize("mode", ["eft", "tokenrm", "ivg"])
def test_whole_speculative_rounds_change_nothing(models, monkeypatch, mode):
    """Speculating 3, every round is one replay (the draft's forwards and draws, the other models' extends,
    the verification, the record): the results of per-model rounds and of the decoder without graphs,
    near chunk boundaries too (rounds of fewer positions, other graphs)."""
    opts = _opts(mode, max_new_tokens=12, speculate=3)
    want = _decoder(models).generate(PROMPTS, opts)
    with_graph_buffers(monkeypatch)
    per_model = _decoder(models, step_graphs=False)
    _same(per_model.generate(PROMPTS, opts), want, tol=1e-6)
    dec = _decoder(models)
    _same(dec.generate(PROMPTS, opts), want, tol=1e-6)
    st = dec.last_stats
    assert st.step_replays == st.steps > 0, st  # every round
    assert len({k[4] for k in dec._steps._graphs if k[0] == "round"}) > 1  # rounds of several widths
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_whole_rounds_feed_each_model_its_own_pending_token(monkeypatch):
    """Guides whose template ends otherwise than the base's: each model's first pending token is its own
    prompt's last one, in the replay as eagerly."""
    m = ivg_models("gpt2", templates={"guide": "{prompt} !", "token_rm": "{prompt} ?"})
    for mode in ("eft", "tokenrm"):
        opts = _opts(mode, max_new_tokens=8, speculate=2)
        want = _decoder(m).generate(PROMPTS, opts)
        with monkeypatch.context() as patch:
            with_graph_buffers(patch)
            dec = _decoder(m)
            _same(dec.generate(PROMPTS, opts), want, tol=1e-6)
            assert dec.last_stats.step_replays > 0


def test_rounds_with_a_filter_run_per_model(models, monkeypatch):
    """top-k is not what the fused draw and verification take: such rounds are not captured whole."""
    opts = _opts("eft", max_new_tokens=10, speculate=3, top_k=5)
    want = _decoder(models).generate(PROMPTS, opts)
    with_graph_buffers(monkeypatch)
    dec = _decoder(models)
    _same(dec.generate(PROMPTS, opts), want, tol=1e-6)
    assert dec.last_stats.step_replays == 0


@pytest.mark.parametrize("kind", ["step", "round"])
def test_a_failing_round_or_step_undoes_its_appends(models, monkeypatch, kind):
    """An error inside a whole round's replay leaves every model's sequences as they were, as a step's does."""
    with_graph_buffers(monkeypatch)
    undone = []
    name = "run" if kind == "step" else "run_round"
    real = getattr(StepGraphs, name)

    def run(self, draw, *args):
        seq_ids = args[0] if kind == "step" else args[1]
        before = {n: self.paged[n].blocks.seq_lens(seq_ids).tolist() for n in draw.names}
        try:
            return real(self, draw, *args)
        except RuntimeError:
            undone.append(all(self.paged[n].blocks.seq_lens(seq_ids).tolist() == before[n] for n in draw.names))
            raise

    def boom(self, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(StepGraphs, name, run)
    monkeypatch.setattr(_StepGraph if kind == "step" else _RoundGraph, "replay", boom)
    dec = _decoder(models)
    with pytest.raises(RuntimeError, match="boom"):
        dec.generate(PROMPTS, _opts("eft", max_new_tokens=10, speculate=3 if kind == "round" else 0))
    assert undone == [True]
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_the_environment_can_turn_step_graphs_off(models, monkeypatch):
    monkeypatch.setenv("IVG_STEP_GRAPHS", "0")
    assert IVGDecoder(models).step_graphs is False
    assert IVGDecoder(models, step_graphs=True).step_graphs is True  # an explicit argument wins
    monkeypatch.setenv("IVG_STEP_GRAPHS", "1")
    assert IVGDecoder(models).step_graphs is True


def test_step_graphs_option_is_checked(models):
    with pytest.raises(ValueError, match="step_graphs='yes': expected None, True or False"):
        IVGDecoder(models, step_graphs="yes")


def test_static_inputs_fill_the_real_rows_and_pad_the_rest():
    """One host-to-device copy fills every buffer: each value its leading corner, the rest its padding."""
    import torch

    from ivg.cuda_graphs import StaticInputs

    s = StaticInputs()
    s.add(torch.long, "slots", (4,), -1)
    s.add(torch.int32, "table", (4, 3), 0)
    s.add(torch.long, "per_forward", (2, 4), 7)
    v = s.views("cpu")
    assert v["slots"].tolist() == [-1] * 4 and v["per_forward"].tolist() == [[7] * 4] * 2
    s.send({"slots": torch.tensor([5, 6]), "table": torch.tensor([[1, 2], [3, 4]], dtype=torch.int32),
            "per_forward": torch.tensor([[1], [2]])})
    assert v["slots"].tolist() == [5, 6, -1, -1]
    assert v["table"].dtype == torch.int32 and v["table"].tolist() == [[1, 2, 0], [3, 4, 0], [0, 0, 0], [0, 0, 0]]
    assert v["per_forward"].tolist() == [[1, 7, 7, 7], [2, 7, 7, 7]]
    s.send({})  # a later send pads what it is not given
    assert v["slots"].tolist() == [-1] * 4 and v["table"].abs().sum() == 0
