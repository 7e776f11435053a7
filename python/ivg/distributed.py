"""Data-parallel generation over prompts on torch.distributed, resumable through the output file.

Under ``torchrun --nproc-per-node N -m ivg generate ...`` (or :func:`generate_sharded` from Python
under torchrun) every rank loads the models on its own device (``cuda:LOCAL_RANK`` for ``--device
cuda``), takes a share of the prompts balanced by length, and decodes it in rounds of
``save_every`` prompts. After each round rank 0 gathers the finished results and appends them to the
output file, so a killed run loses at most one round. A rerun reads the file, skips the prompts it
already holds (a torn last line is ignored) and decodes the rest. At the end rank 0 rewrites the file
in input order, one line per prompt, each with its ``index`` in the input and a ``run`` fingerprint of the
models and options (a rerun with other settings refuses the file instead of mixing outputs). Values are
written with 10 significant digits.

NCCL on CUDA, gloo on the CPU. A prompt's result depends only on the prompt, the options and the seed
(:class:`ivg.decoder.IVGDecoder`), so the output is the one a single process writes.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init(device: str) -> tuple[int, int, str]:
    """Join the process group when launched by torchrun; returns (rank, world size, this rank's device)."""
    from .api import check_device

    rank, size, local = world()
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, size, str(dev)


def shard_by_length(lengths: Sequence[int], num_shards: int) -> list[list[int]]:
    """Indices split into ``num_shards`` lists of about equal total length (longest first onto the least
    loaded shard; ties to the lower shard), each list in input order. Deterministic."""
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards!r}: expected an int >= 1")
    loads = [0] * num_shards
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        s = min(range(num_shards), key=lambda j: (loads[j], j))
        shards[s].append(i)
        loads[s] += lengths[i] + 1
    return [sorted(s) for s in shards]


def _round(row: dict) -> dict:
    """Values with 10 significant digits: the last bits of a float64 sum depend on how prompts were batched
    (one process or several), and the file should not."""
    for k in ("score", "implicit_value", "explicit_value"):
        if isinstance(row.get(k), float):
            row[k] = float(f"{row[k]:.10g}")
    for b in row.get("beams", ()):
        _round(b)
    return row


def _prompt_key(p) -> str:
    return json.dumps(p)


# make_decoder's arguments that change how fast a run goes, not what it writes (the decoder's documented
# guarantees: the same tokens whatever the prompts decoded together, the host's reads, the CUDA graphs, the
# backend or merged twins), so a killed run resumes with other values (fewer prompts at once after running
# out of memory, say). Like ``device``, which is not among the fingerprinted arguments either.
SPEED_ONLY = ("backend", "cuda_graphs", "step_graphs", "max_batch_prompts", "read_every", "merge_twins")


def run_id(config: dict) -> str:
    """A short fingerprint of what decides the outputs (models, options, seed; not the arguments of
    ``SPEED_ONLY``), stored on every line so that a rerun with other settings does not resume a file it did
    not write."""
    import hashlib

    def name(x):  # a callable by its import path: its repr holds a per-process address
        if callable(x) and hasattr(x, "__qualname__"):
            return f"{getattr(x, '__module__', '?')}:{x.__qualname__}"
        return repr(x)

    config = {k: v for k, v in config.items() if k not in SPEED_ONLY}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=name).encode()).hexdigest()[:12]


def read_done(path: Path, prompts: Sequence, run: Optional[str] = None) -> dict[int, str]:
    """Lines of an earlier (possibly killed) run, by prompt index. A line whose prompt differs from the
    input's at its index, or that another configuration wrote, is an error naming the line."""
    done: dict[int, str] = {}
    if not path.exists():
        return done
    for k, line in enumerate(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill: decoded again
        i = row.get("index")
        if not isinstance(i, int) or not 0 <= i < len(prompts):
            raise ValueError(f"--out {path}: line {k + 1} has no valid \"index\" for these {len(prompts)} prompts; "
                             "move the file away or pass --overwrite")
        if _prompt_key(row.get("prompt")) != _prompt_key(prompts[i]):
            raise ValueError(f"--out {path}: line {k + 1} holds another prompt for index {i} "
                             f"({row.get('prompt')!r}); move the file away or pass --overwrite")
        if run is not None and row.get("run") != run:
            raise ValueError(f"--out {path}: line {k + 1} was written with other models or options (run "
                             f"{row.get('run')!r}, now {run!r}); move the file away or pass --overwrite")
        done[i] = json.dumps(row)
    return done


def _append(path: Path, lines: Sequence[str]) -> None:
    with path.open("a") as f:
        for ln in lines:
            f.write(ln + "\n")
        f.flush()
        os.fsync(f.fileno())


def _prompt_list(prompts) -> list:
    """The prompts as the decoder takes them and the output lines hold them: strings, and token ids (a sequence, or a 1-D
    integer tensor or array) as lists of ints; a ValueError naming the first bad one. A string alone, a number or a
    tensor prompt failed with "has no len()" or "not JSON serializable"."""
    from .decoder import token_ids

    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts: expected a list of strings or token id lists, got {type(prompts).__name__}")
    return [p if isinstance(p, str) else token_ids(p, i) for i, p in enumerate(prompts)]


def generate_sharded(prompts: Sequence, *, out: Optional[str] = None, num_return: int = 1, save_every: int = 64,
                     overwrite: bool = False, progress: bool = True, device: str = "cpu", tensor_parallel: bool = False,
                     **kwargs):
    """Decode ``prompts`` over every torchrun rank (or in this process alone outside torchrun).

    ``tensor_parallel``: instead of sharding the prompts, shard the base model over the ranks
    (transformers' ``tp_plan="auto"``); every rank then decodes every prompt in lockstep (the guides
    and the token reward model are whole on every rank, the logits are identical on all of them, so
    are the draws) and rank 0 writes.

    ``kwargs`` are :func:`ivg.api.make_decoder`'s. With ``out`` the results go to that JSON-lines file
    (resumed if it exists, unless ``overwrite``). Returns, on rank 0, the output lines in input order
    (JSON strings) and the summed run statistics; ``(None, None)`` on the other ranks.
    """
    from .api import make_decoder
    from .decoder import RunStats
    from .progress import progress_bar

    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise ValueError(f"save_every={save_every!r}: expected an int >= 1")
    prompts = _prompt_list(prompts)  # (before their lengths shard them; the decoder checks the tokens)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise ValueError(f"out={out!r}: expected a file path or None")
    path = Path(out).expanduser() if out else None
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        where = "a directory" if path.is_dir() else f"no such directory {str(path.parent)!r}"
        raise ValueError(f"out={str(out)!r}: {where}; expected a file in an existing directory")
    rank, size, dev = init(device)
    tp = tensor_parallel and size > 1
    run = run_id(dict(kwargs, num_return=num_return))
    done: dict[int, str] = {}
    error = None
    if path is not None and rank == 0:
        try:
            if overwrite and path.exists():
                path.unlink()
            done = read_done(path, prompts, run)
        except (ValueError, OSError) as e:
            error = e
        if done:
            print(f"ivg generate: resuming, {len(done)} of {len(prompts)} prompts already in {path}", file=sys.stderr)
    if size > 1:
        import torch.distributed as dist

        box = [(sorted(done), None if error is None else str(error))]
        dist.broadcast_object_list(box, src=0)  # every rank learns what is done, or that rank 0 refused the file
        done_idx, message = set(box[0][0]), box[0][1]
        if message is not None and error is None:
            error = ValueError(message)
    else:
        done_idx = set(done)
    if error is not None:
        raise error
    todo = [i for i in range(len(prompts)) if i not in done_idx]
    shards = [list(range(len(todo)))] if tp else shard_by_length([len(prompts[i]) for i in todo], size)
    mine = [todo[j] for j in shards[0 if tp else rank]]
    rounds = -(-max((len(s) for s in shards), default=0) // save_every)

    dec, opts = make_decoder(device=dev, num_return=num_return, base_tp_plan="auto" if tp else None, **kwargs)
    failure = None
    try:  # every prompt of this rank's share checked before any is decoded: a bad one fails the run now, not hours in
        if mine:
            dec.check([prompts[i] for i in mine], opts)
    except ValueError as e:
        failure = _in_input_order(e, mine)
    if size > 1 and not tp:
        _gather_round([], failure, rank, size)  # (all ranks stop if one refused its share)
    elif failure is not None:
        raise failure
    stats = RunStats()
    start = time.perf_counter()
    bar = progress_bar(len(prompts), desc=f"ivg generate ({size} rank{'s' if size > 1 else ''}"
                       f"{', tensor parallel' if tp else ''})", unit="prompt", enabled=progress and rank == 0)
    bar.update(len(done_idx))
    try:
        for r in range(rounds):
            batch = mine[r * save_every:(r + 1) * save_every]
            lines, failure = _decode_round(dec, opts, prompts, batch, run, num_return, stats)
            if size > 1 and not tp:  # every rank reaches this round's gather, then all stop if one failed
                lines = _gather_round(lines, failure, rank, size)
            elif failure is not None:
                raise failure
            if rank == 0:
                for i, ln in lines:
                    done[i] = ln
                if path is not None and lines:
                    _append(path, [ln for _, ln in lines])
                bar.update(len(lines))
    finally:
        bar.close()  # (a line of its own before an error's)
    if size > 1 and not tp:
        import torch.distributed as dist

        box = [(stats.prompts, stats.new_tokens)]
        parts = [None] * size if rank == 0 else None
        dist.gather_object(box[0], parts, dst=0)
        if rank == 0:
            stats.prompts = sum(p for p, _ in parts)
            stats.new_tokens = sum(t for _, t in parts)
    stats.wall_s = time.perf_counter() - start
    if rank != 0:
        return None, None
    ordered = [done[i] for i in range(len(prompts))]
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in ordered))
        os.replace(tmp, path)  # one line per prompt, in input order
    return ordered, stats


def _decode_round(dec, opts, prompts, batch: list, run: str, num_return: int, stats) -> tuple:
    """``(lines, None)``: the output lines ``(index, JSON)`` of the prompts ``batch`` (indices into ``prompts``),
    their counts added to ``stats``; or ``([], error)`` if decoding them failed (a ``prompts[j]`` error names
    the prompt's index in the input)."""
    if not batch:
        return [], None
    try:
        results = dec.generate([prompts[i] for i in batch], opts)
    except Exception as e:
        return [], _in_input_order(e, batch)
    stats.prompts += dec.last_stats.prompts
    stats.new_tokens += dec.last_stats.new_tokens
    return [(i, json.dumps(_round(dict(index=i, run=run, **res.as_dict(num_return > 1)))))
            for i, res in zip(batch, results)], None


def _in_input_order(error: Exception, batch: list) -> Exception:
    """A decoder's ``prompts[j]: ...`` error about prompt j of ``batch`` (a round of this rank's shard), as the
    same error about that prompt's index in the input."""
    m = re.match(r"prompts\[(\d+)\]", str(error))
    if not isinstance(error, ValueError) or m is None or int(m.group(1)) >= len(batch):
        return error
    return ValueError(f"prompts[{batch[int(m.group(1))]}]{str(error)[m.end():]}")


def _gather_round(lines: list, failure: Optional[BaseException], rank: int, size: int) -> list:
    """Rank 0 gathers every rank's lines of a round; a rank whose decoding failed sends its error instead,
    and then every rank raises it (a rank that raised alone would leave the others waiting in this gather,
    and itself in the barrier of ``finish``, for ever): a ``ValueError`` (bad input, such as a prompt too
    long for a model) stays one, naming the rank, anything else becomes a ``RuntimeError``."""
    import torch.distributed as dist

    message = None if failure is None else (type(failure).__name__, str(failure))
    gathered = [None] * size if rank == 0 else None
    dist.gather_object((lines, message), gathered, dst=0)
    box = [next(((k, m) for k, (_, m) in enumerate(gathered) if m is not None), None) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # every rank learns whether one failed
    if failure is not None:  # (a rank that failed raises its own error)
        raise failure
    if box[0] is not None:
        k, (kind, text) = box[0]
        raise (ValueError if kind == "ValueError" else RuntimeError)(f"rank {k} failed: {text}")
    return [x for part, _ in (gathered or []) for x in part]


def finish() -> None:
    """Leave the process group (a no-op outside torchrun)."""
    if world()[1] > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            try:  # leave together: a rank that tears gloo down while a peer is still in it can abort the peer
                dist.barrier()
            finally:
                dist.destroy_process_group()
