"""IVG's token-wise guidance (EFT) in your own decode loop: a plain Hugging Face base model, a guide
pair, one `DynamicCache` per model, and `ivg_kernels.guided_sample` as the sampler.

    python examples/own_loop.py            # CPU, tiny random models, a few seconds

Per step the sampler combines `base + beta * (tuned - ref)`, applies temperature and top-p, draws one
token per row from a counter-based random stream (`seed`, `offset`: no generator state, so a CUDA graph
can replay the step), and returns each input's log-prob at the token: `beta * (lp_tuned - lp_ref)` is
the implicit value IVG's chunk search ranks by. On CUDA tensors it runs the fused Triton kernel; on
the CPU the plain-torch reference (same tokens for the same key).
"""
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import ivg_kernels
from ivg.models import cache_kwargs  # cache= or past_key_values=, whichever this transformers takes


def tiny_gpt2(seed: int, layers: int, vocab: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_head=2, n_embd=32, vocab_size=vocab, n_positions=128, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def decode(base, tuned, ref, prompt_ids, *, beta=1.0, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=0):
    """Sample ``len(prompt_ids)`` responses in one batch; returns the tokens and each row's implicit value."""
    models = {"base": base, "tuned": tuned, "ref": ref}
    caches = {name: DynamicCache() for name in models}
    x = torch.tensor(prompt_ids)  # [N, P]: equal-length prompts, so no padding to handle
    n = x.shape[0]
    seeds = torch.arange(n) + seed  # one random stream per row
    tokens, implicit = [], torch.zeros(n)
    with torch.no_grad():
        for step in range(max_new_tokens):
            logits = {name: m(input_ids=x, use_cache=True, **cache_kwargs(m, caches[name])).logits[:, -1]
                      for name, m in models.items()}  # [N, V] each
            out = ivg_kernels.guided_sample(
                logits["base"], [(logits["tuned"], beta), (logits["ref"], -beta)],
                temperature=temperature, top_p=top_p, seed=seeds, offset=step,
            )
            out.check()  # raises if a row had NaN/inf logits (a host sync: fine outside a graph)
            implicit += beta * (out.input_logprobs[:, 1] - out.input_logprobs[:, 2])
            tokens.append(out.tokens)
            x = out.tokens[:, None]  # [N, 1]: the next step feeds only the new token
    return torch.stack(tokens, dim=1), implicit


def main():
    base, tuned, ref = tiny_gpt2(0, layers=4), tiny_gpt2(1, layers=2), tiny_gpt2(2, layers=2)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [5, 6, 7, 8]]
    tokens, implicit = decode(base, tuned, ref, prompts)
    for row, (t, v) in enumerate(zip(tokens.tolist(), implicit.tolist())):
        print(f"row {row}: {t}  implicit value {v:+.3f}")
    again, _ = decode(base, tuned, ref, prompts)
    assert torch.equal(tokens, again), "same seeds and offsets, same tokens"
    print("rerun with the same seeds: identical tokens")


if __name__ == "__main__":
    main()
