"""Runs the published IVG code (github.com/chadlzx/ivg) from a checkout, in its own environment.

Started by ``bench_published.py`` with the published code's interpreter (transformers 4.34.1), never
imported by this project. It only *calls* the published modules, the way the published IMDB script
``scripts/imdb/gen_bt_eft.py`` does: per prompt, an ``EFTPosthocGenerationMixin`` over
``PrefixPreTrainedWrapper``-ed base and guides, wrapped in ``BeamTuningWithEFTPosthocGenerationMixin``
and ranked by ``ExplicitRewardScorer`` over a ``GPT2ModelForTokenScore``; no EOS, no stop strings.

Usage: ``python published_driver.py CONFIG.json OUT.json``. CONFIG holds ``published`` (the checkout),
``base``, ``tuned``, ``ref``, ``rm`` (folders), ``prompts``, ``templates`` (``base``/``guide`` with
``{raw_prompt}``), ``beta``, ``W``, ``K``, ``L``, ``temperature``, ``max_new_tokens``, ``seed``, ``threads``,
``repeats``, ``greedy_prompts`` (how many prompts also decode greedy EFT, for token parity), ``dtype``,
``greedy_dtype`` (the models' dtype for those; the timed runs then load them again in ``dtype``),
``device``, ``modes`` (default ``["ivg"]``) and ``N``. Every mode runs through the published chunk-level
beam search, ``bon_beam_sample``, as the published IMDB script runs IVG: plain sampling and EFT as one
beam with one candidate over the whole response, best-of-N as N candidates of one chunk, CBS and IVG
as W beams with K candidates per chunk of L tokens; plain, CBS and best-of-N decode the base alone, EFT
and IVG the EFT combination; every candidate set is ranked by the token RM's scorer (one scoring for
the token-wise modes). OUT gets, per mode, the response token ids of every prompt, the decode times
(model loading excluded) and, per timed run, the time the published loop spent in its GPU-memory
logging (``GPUtil.getGPUs``, which runs nvidia-smi, every 10th step), measured by wrapping that function.
"""
import json
import os
import sys
import time


PROGRESS = "progress: "
TURN = "turn: "


def progress(line: str) -> None:
    """A progress line on stderr, which bench_published.py shows as it comes (a run cut by a time limit
    still says how far it got); its own side prints them too."""
    print(f"{PROGRESS}{line}", file=sys.stderr, flush=True)


def wait_turn(cfg: dict, what: str) -> None:
    """With ``cfg["lockstep"]``, say what comes next and wait for bench_published.py's go (a line on stdin):
    the two sides take turns, one phase at a time, so neither runs while the other is timed and a drift in
    the machine's speed weighs on both. Its own side calls it too."""
    if cfg.get("lockstep"):
        print(f"{TURN}{what}", file=sys.stderr, flush=True)
        if not sys.stdin.readline():
            raise SystemExit("bench_published.py went away")


def main(cfg_path, out_path):
    cfg = json.load(open(cfg_path))
    sys.path.insert(0, cfg["published"])
    # The published cbs.py reads CUDA_VISIBLE_DEVICES in its time_record helper on every 10th step.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    # The published code never uses peft, but transformers 4.34.1 imports it when it is installed (the GPU
    # image's peft needs a newer accelerate than the pinned 0.23.0): hidden, as in the published environment.
    sys.modules.setdefault("peft", None)
    import torch

    torch.set_num_threads(cfg["threads"])
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_time_alignment.decoder.decoder import (
        BeamTuningWithEFTPosthocGenerationMixin,
        EFTPosthocGenerationMixin,
    )
    from inference_time_alignment.decoder.ivg import TokenWiseSamplingMixin
    from inference_time_alignment.model import PrefixPreTrainedWrapper
    from inference_time_alignment.modeling_gpt2 import GPT2ModelForTokenScore
    from inference_time_alignment.scorer import ExplicitRewardScorer

    import GPUtil

    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    device = torch.device(cfg.get("device", "cpu"))
    logging_s = [0.0]
    get_gpus = GPUtil.getGPUs

    def timed_get_gpus(*a, **k):  # the published loop's memory logging: timed, not changed
        t0 = time.perf_counter()
        try:
            return get_gpus(*a, **k)
        finally:
            logging_s[0] += time.perf_counter() - t0

    GPUtil.getGPUs = timed_get_gpus

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    tok = AutoTokenizer.from_pretrained(cfg["base"])
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    empty = tok("", return_tensors="pt", add_special_tokens=False).to(device)
    base = tuned = ref = rm = scorer = None

    def load(dt):
        """The four models in ``dt`` (the greedy check's, then the timed runs'), and the scorer over the RM."""
        nonlocal base, tuned, ref, rm, scorer
        base = tuned = ref = rm = scorer = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

        def lm(path):
            return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dt).eval().to(device)

        base, tuned, ref = lm(cfg["base"]), lm(cfg["tuned"]), lm(cfg["ref"])
        base.generation_config.eos_token_id = None  # as the IMDB script: responses never stop at EOS
        rm = GPT2ModelForTokenScore.from_pretrained(cfg["rm"], torch_dtype=dt).eval().to(device)
        scorer = ExplicitRewardScorer(token_reward_model=rm, tokenizer=tok, beta=1.0)

    def model_for(mode, prompt):
        """The published model a mode decodes with: the base alone (plain, cbs, bon), with the token RM's
        values added token by token (tokenrm), or EFT (eft, ivg)."""
        wrapped = PrefixPreTrainedWrapper(base, tok, cfg["templates"]["base"].format(raw_prompt=prompt))
        if mode in ("plain", "cbs", "bon"):
            return wrapped
        if mode == "tokenrm":
            return TokenWiseSamplingMixin(
                base=wrapped, w=cfg.get("rm_weight", 1.0),
                token_reward_model=PrefixPreTrainedWrapper(rm, tok, cfg["templates"]["guide"].format(raw_prompt=prompt)))
        return EFTPosthocGenerationMixin(
            base=wrapped,
            tune_r=PrefixPreTrainedWrapper(tuned, tok, cfg["templates"]["guide"].format(raw_prompt=prompt)),
            base_r=PrefixPreTrainedWrapper(ref, tok, cfg["templates"]["guide"].format(raw_prompt=prompt)),
            w=cfg["beta"],
        )

    def shape(mode):
        """(beams, candidates, chunk length): token-wise modes are one beam and one candidate over the whole
        response; best-of-N is N candidates of one chunk; the chunk searches W, K, L."""
        n, whole = cfg.get("N", 16), cfg["max_new_tokens"]
        return {"plain": (1, 1, whole), "eft": (1, 1, whole), "tokenrm": (1, 1, whole), "bon": (1, n, whole)}.get(
            mode, (cfg["W"], cfg["K"], cfg["L"]))

    def decode(prompt, mode, temperature):
        w, k, l_ = shape(mode)
        out = BeamTuningWithEFTPosthocGenerationMixin(model_for(mode, prompt), tok).bon_beam_sample(
            input_ids=empty["input_ids"], attention_mask=empty["attention_mask"], scorer=scorer.set_raw_prompt(prompt),
            max_new_tokens=cfg["max_new_tokens"], temperature=temperature, top_k=None,
            num_beams=w, num_candidates=k, block_len=l_,
        )
        return out[0].tolist()

    result = {"transformers": transformers.__version__, "torch": torch.__version__, "runs": {}}
    greedy_dtype = getattr(torch, cfg.get("greedy_dtype", cfg.get("dtype", "float32")))
    load(greedy_dtype)
    # No greedy path in the published code: one beam, one candidate, temperature 1e-9 (argmax).
    wait_turn(cfg, "greedy")
    t0 = time.perf_counter()
    result["greedy_tokens"] = [decode(p, cfg.get("greedy_mode", "eft"), 1e-9)
                               for p in cfg["prompts"][:cfg.get("greedy_prompts", len(cfg["prompts"]))]]
    progress(f"greedy {len(result['greedy_tokens'])} prompts in {time.perf_counter() - t0:.1f} s ({greedy_dtype})")
    if greedy_dtype != dtype:
        load(dtype)
    for mode in cfg.get("modes", ["ivg"]):
        wait_turn(cfg, f"{mode} warm-up")
        torch.manual_seed(cfg["seed"])
        decode(cfg["prompts"][0], mode, cfg["temperature"])  # warm-up, not timed
        times, logged = [], []
        for i in range(cfg["repeats"]):
            wait_turn(cfg, f"{mode} run {i + 1}")
            logging_s[0] = 0.0
            sync()
            t0 = time.perf_counter()
            tokens = [decode(p, mode, cfg["temperature"]) for p in cfg["prompts"]]
            sync()
            times.append(time.perf_counter() - t0)
            logged.append(logging_s[0])
            progress(f"{mode}: {len(cfg['prompts'])} prompts in {times[-1]:.2f} s")
        result["runs"][mode] = dict(tokens=tokens, seconds=times, logging_seconds=logged)
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
