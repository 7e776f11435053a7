"""Whole decode steps replayed as one graph (ivg.step_graphs): every model's forward and the next draw.

Off CUDA nothing is captured: a replay runs the same step eagerly over the graph's static, padded
buffers (``with_graph_buffers``), which is what these tests check against the per-model path and the
decoder without graphs. The capture itself is checked on a GPU (tests/test_gpu.py)."""
import pytest

from ivg.decoder import IVGDecoder
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


def test_a_failing_step_undoes_its_appends(models, monkeypatch):
    """An error inside the replay leaves every model's sequences at their lengths before the step, and
    the decoder frees every block."""
    with_graph_buffers(monkeypatch)
    undone = []
    real_run = StepGraphs.run

    def run(self, draw, seq_ids, drawn, seed, offset):
        before = {n: self.paged[n].blocks.seq_lens(seq_ids).tolist() for n in draw.names}
        try:
            return real_run(self, draw, seq_ids, drawn, seed, offset)
        except RuntimeError:
            undone.append(all(self.paged[n].blocks.seq_lens(seq_ids).tolist() == before[n] for n in draw.names))
            raise

    def boom(self, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(StepGraphs, "run", run)
    monkeypatch.setattr(_StepGraph, "replay", boom)
    dec = _decoder(models)
    with pytest.raises(RuntimeError, match="boom"):
        dec.generate(PROMPTS, _opts("eft", max_new_tokens=10))
    assert undone == [True]
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_a_failed_capture_falls_back_to_per_model_steps(models, monkeypatch):
    """A step graph that cannot be captured warns once per key, and those steps run per model with the
    same results."""
    opts = _opts("ivg", max_new_tokens=10)
    want = _decoder(models).generate(PROMPTS, opts)
    with_graph_buffers(monkeypatch)

    def fail(self, *args):
        raise RuntimeError("no capture here")

    monkeypatch.setattr(_StepGraph, "__init__", fail)
    dec = _decoder(models)
    with pytest.warns(UserWarning, match="whole step failed.*no capture here"):
        got = dec.generate(PROMPTS, opts)
    _same(got, want, tol=1e-6)
    assert dec.last_stats.step_replays == 0 and dec._steps._failed
    assert sum(dec.kv_blocks_in_use().values()) == 0


def test_step_graphs_option_is_checked(models):
    with pytest.raises(ValueError, match="step_graphs='yes': expected True or False"):
        IVGDecoder(models, step_graphs="yes")
