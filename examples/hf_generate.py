"""IVG's token-wise guidance inside Hugging Face `generate()`: `IVGLogitsProcessor` adds
`beta * (log pi_tuned - log pi_ref)` to the base model's scores, running the guides incrementally on
caches of their own; it works with sampling and with beam search (its caches follow the beams).

    python examples/hf_generate.py         # CPU, tiny random models, a few seconds
"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ivg import IVGLogitsProcessor


def tiny(seed, layers, vocab=64):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_head=2, n_embd=32, vocab_size=vocab, n_positions=128, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def main():
    base, tuned, ref = tiny(0, 4), tiny(1, 2), tiny(2, 2)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    common = dict(max_new_tokens=12, eos_token_id=None, pad_token_id=0)

    torch.manual_seed(0)
    plain = base.generate(prompt, do_sample=True, temperature=0.8, **common)
    torch.manual_seed(0)
    guided = base.generate(prompt, do_sample=True, temperature=0.8, logits_processor=[
        IVGLogitsProcessor([(tuned, ref, 4.0)])], **common)
    print("sampling, base alone:   ", plain[0, 5:].tolist())
    print("sampling, EFT beta=4:   ", guided[0, 5:].tolist())

    proc = IVGLogitsProcessor([(tuned, ref, 4.0)])
    beams = base.generate(prompt, do_sample=False, num_beams=4, num_return_sequences=2, logits_processor=[proc],
                          **common)
    for i, row in enumerate(beams):
        print(f"beam search, beam {i}:   ", row[5:].tolist())
    print(f"the guides' caches followed {proc.reorders} beam reorderings")


if __name__ == "__main__":
    main()
