"""Beams on the paged KV cache: prefill a prompt once, fork it into W*K beams that share its blocks,
prune to the best W, fork again, with one forward per model per step. Copy-on-write copies at most
one block per child, however long the shared history is.

    python examples/paged_beams.py         # CPU, tiny random models, a few seconds

A `KVCacheGroup` keeps the base model's and the guides' caches in step: the same logical sequence ids
fork, grow and free together. Compare the bytes copied with what a `DynamicCache` reorder copies:
every layer of every row, at every chunk.
"""
import torch
from transformers import GPT2Config

import ivg_kernels
from ivg.paged_model import PagedModel, local_kv_shape, model_from_config

W, K, CHUNK, CHUNKS = 2, 3, 4, 3


def tiny(seed, layers, vocab=64):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_head=2, n_embd=32, vocab_size=vocab, n_positions=256, bos_token_id=0,
                     eos_token_id=0)
    return model_from_config(cfg).eval()  # a transformers GPT-2 on the paged attention


def main():
    models = {"base": tiny(0, 4), "tuned": tiny(1, 2), "ref": tiny(2, 2)}
    caches = {}
    for name, m in models.items():
        layers, kv_heads, head_dim = local_kv_shape(m)
        caches[name] = ivg_kernels.KVCache(layers, kv_heads, head_dim, num_blocks=256, block_size=16)
    group = ivg_kernels.KVCacheGroup(caches)
    paged = {name: PagedModel(m, cache=group[name]) for name, m in models.items()}

    prompt = list(range(1, 41))  # 40 tokens: 2.5 blocks of 16
    (root,) = group.new_sequences(1)
    logits = {name: pm([root], [prompt]) for name, pm in paged.items()}  # prefill once per model
    # metadata only: every beam shares the prompt's blocks (replace: the root's sequence becomes the first beam)
    beams = group.fork_many([root], W * K, replace=True)[0]
    logits = {name: x.expand(W * K, -1) for name, x in logits.items()}
    scores = torch.zeros(W * K)
    for chunk in range(CHUNKS):
        for step in range(CHUNK):
            out = ivg_kernels.guided_sample(logits["base"], [(logits["tuned"], 1.0), (logits["ref"], -1.0)],
                                            temperature=0.8, seed=torch.arange(len(beams)), offset=chunk * 100 + step)
            scores += out.input_logprobs[:, 1] - out.input_logprobs[:, 2]  # the implicit value
            logits = {name: pm(beams, [[t] for t in out.tokens.tolist()]) for name, pm in paged.items()}
        keep = scores.topk(W).indices.tolist()  # prune to the best W, then each spawns K children
        group.free_many([b for i, b in enumerate(beams) if i not in keep])
        children = group.fork_many([beams[i] for i in keep], K, replace=True)  # (no parent left to free)
        rows = [i for i in keep for _ in range(K)]
        beams = [c for kids in children for c in kids]
        logits = {name: x[rows] for name, x in logits.items()}
        scores = scores[rows]
        print(f"chunk {chunk}: kept beams {keep}, {len(beams)} live, "
              f"base blocks in use {caches['base'].blocks.num_used_blocks}")
    length = caches["base"].blocks.seq_len(beams[0])
    copied = {name: c.pool.bytes_copied for name, c in caches.items()}
    layers, kv_heads, head_dim = local_kv_shape(models["base"])
    reorder = CHUNKS * W * K * length * layers * 2 * kv_heads * head_dim * 4  # what a DynamicCache reorder moves
    print(f"sequence length {length}; bytes copied by copy-on-write: {copied}")
    print(f"a DynamicCache reorder of the base model would have copied about {reorder} bytes")
    group.free_many(beams)
    assert all(c.blocks.num_used_blocks == 0 for c in caches.values()), "every block returned"
    print("all blocks freed")


if __name__ == "__main__":
    main()
