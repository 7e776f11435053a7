"""Runs the published IVG code (github.com/chadlzx/ivg) from a checkout, in its own environment.

Started by ``bench_published.py`` with the published code's interpreter (transformers 4.34.1), never
imported by this project. It only *calls* the published modules, the way the published IMDB script
``scripts/imdb/gen_bt_eft.py`` does: per prompt, an ``EFTPosthocGenerationMixin`` over
``PrefixPreTrainedWrapper``-ed base and guides, wrapped in ``BeamTuningWithEFTPosthocGenerationMixin``
and ranked by ``ExplicitRewardScorer`` over a ``GPT2ModelForTokenScore``; no EOS, no stop strings.

Usage: ``python published_driver.py CONFIG.json OUT.json``. CONFIG holds ``published`` (the checkout),
``base``, ``tuned``, ``ref``, ``rm`` (folders), ``prompts``, ``templates`` (``base``/``guide`` with
``{raw_prompt}``), ``beta``, ``W``, ``K``, ``L``, ``temperature``, ``max_new_tokens``, ``seed``, ``threads``,
``repeats`` and ``greedy`` (also decode greedy EFT, for token parity). OUT gets the response token
ids of every prompt and the decode times (model loading excluded).
"""
import json
import os
import sys
import time


def main(cfg_path, out_path):
    cfg = json.load(open(cfg_path))
    sys.path.insert(0, cfg["published"])
    # The published cbs.py reads CUDA_VISIBLE_DEVICES in its time_record helper on every 10th step.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    import torch

    torch.set_num_threads(cfg["threads"])
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_time_alignment.decoder.decoder import (
        BeamTuningWithEFTPosthocGenerationMixin,
        EFTPosthocGenerationMixin,
    )
    from inference_time_alignment.model import PrefixPreTrainedWrapper
    from inference_time_alignment.modeling_gpt2 import GPT2ModelForTokenScore
    from inference_time_alignment.scorer import ExplicitRewardScorer

    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, cfg.get("dtype", "float32"))

    def lm(path):
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()

    tok = AutoTokenizer.from_pretrained(cfg["base"])
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    base, tuned, ref = lm(cfg["base"]), lm(cfg["tuned"]), lm(cfg["ref"])
    base.generation_config.eos_token_id = None  # as the IMDB script: responses never stop at EOS
    rm = GPT2ModelForTokenScore.from_pretrained(cfg["rm"], torch_dtype=dtype).eval()
    scorer = ExplicitRewardScorer(token_reward_model=rm, tokenizer=tok, beta=1.0)
    empty = tok("", return_tensors="pt", add_special_tokens=False)

    def decode(prompt, W, K, L, temperature):
        model = EFTPosthocGenerationMixin(
            base=PrefixPreTrainedWrapper(base, tok, cfg["templates"]["base"].format(raw_prompt=prompt)),
            tune_r=PrefixPreTrainedWrapper(tuned, tok, cfg["templates"]["guide"].format(raw_prompt=prompt)),
            base_r=PrefixPreTrainedWrapper(ref, tok, cfg["templates"]["guide"].format(raw_prompt=prompt)),
            w=cfg["beta"],
        )
        out = BeamTuningWithEFTPosthocGenerationMixin(model, tok).bon_beam_sample(
            input_ids=empty["input_ids"], attention_mask=empty["attention_mask"], scorer=scorer.set_raw_prompt(prompt),
            max_new_tokens=cfg["max_new_tokens"], temperature=temperature, top_k=None,
            num_beams=W, num_candidates=K, block_len=L,
        )
        return out[0].tolist()

    result = {"transformers": transformers.__version__, "torch": torch.__version__}
    if cfg.get("greedy"):
        # No greedy path in the published code: one beam, one candidate, temperature 1e-9 (argmax).
        result["greedy_tokens"] = [decode(p, 1, 1, cfg["max_new_tokens"], 1e-9) for p in cfg["prompts"]]
    torch.manual_seed(cfg["seed"])
    decode(cfg["prompts"][0], cfg["W"], cfg["K"], cfg["L"], cfg["temperature"])  # warm-up, not timed
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        tokens = [decode(p, cfg["W"], cfg["K"], cfg["L"], cfg["temperature"]) for p in cfg["prompts"]]
        times.append(time.perf_counter() - t0)
    result.update(ivg_tokens=tokens, seconds=times)
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
