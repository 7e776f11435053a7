"""Stop strings (``ivg.search.StopChecker``): a response finishes at the first token after which its text
holds a stop string, checked against the whole text decoded again at every prefix (the oracle), with
byte-level vocabularies (a character over several tokens), SentencePiece's byte fallback (a run of byte
tokens decoded as one), one token per character, and special tokens (no text) in between."""
import random

import pytest

pytest.importorskip("transformers")
from transformers import PreTrainedTokenizerFast  # noqa: E402

from ivg.search import StopChecker  # noqa: E402

from .decoder_fixtures import char_tokenizer  # noqa: E402

SPECIALS = ["<unk>", "<eos>", "<sep>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (byte-level BPE without merges), ids 0-2 special, 3-258 the bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=["<sep>"])


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE as the Llama family's: spaces as "▁", a few merged pieces, every other
    character as its UTF-8 bytes (``<0xNN>`` tokens), and a decoder that drops the text's leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", "a", "b", ".", "▁a", "▁b", "ab", "▁ab"):
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b")], byte_fallback=True,
                               unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=["<sep>"])


def _first_stop(tok, tokens, stops):
    """The oracle: the first length whose whole decoded text holds a stop string (None: never)."""
    for i in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:i], skip_special_tokens=True)
        if any(s in text for s in stops):
            return i
    return None


def _first_finished(checker, tokens):
    return next((i for i in range(1, len(tokens) + 1) if checker.finished(tokens[:i])), None)


def test_a_stop_string_of_multibyte_characters_finishes_the_response():
    """"日本" is six tokens of a byte-level vocabulary; a tail of its two characters plus two tokens never
    held it, so the response ran on to the length limit (its text was cut all the same)."""
    tok = byte_tokenizer()
    tokens = tok("the movie 日本 more", add_special_tokens=False)["input_ids"]
    assert len(tok("日本", add_special_tokens=False)["input_ids"]) == 6
    checker = StopChecker(tok, ["日本"], [])
    at = _first_finished(checker, tokens)
    assert at == len(tok("the movie 日本", add_special_tokens=False)["input_ids"])
    assert checker.text(tokens) == "the movie "


def test_a_tail_that_starts_inside_a_character_reads_back_to_its_first_byte():
    """With byte fallback, a tail starting at the emoji's last bytes made the run of byte tokens after it
    (the stop string's "日" too) decode as U+FFFD each."""
    tok = byte_fallback_tokenizer()
    tokens = tok("a😀😀日", add_special_tokens=False)["input_ids"]
    assert _first_finished(StopChecker(tok, ["日"], []), tokens) == len(tokens)


@pytest.mark.parametrize("which", ["bytes", "bytes+specials", "fallback", "fallback+specials", "chars"])
def test_finishes_where_the_whole_text_first_holds_a_stop_string(which):
    rng = random.Random(f"stop-{which}")
    if which == "chars":
        tok, alphabet = char_tokenizer(), "abc ,.!"
    elif which.startswith("bytes"):
        tok, alphabet = byte_tokenizer(), "ab .é日本😀"
    else:
        tok, alphabet = byte_fallback_tokenizer(), "ab .é日本😀"
    special = [tok.convert_tokens_to_ids(s) for s in SPECIALS[1:]] if which.endswith("+specials") else []
    checked = hits = 0
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        tokens = tok(text, add_special_tokens=False)["input_ids"]
        for _ in range(rng.randint(0, 6) if special else 0):  # special tokens anywhere, a character's bytes too
            tokens.insert(rng.randint(0, len(tokens)), rng.choice(special))
        stops = []
        for _ in range(rng.randint(1, 2)):
            other = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))  # a stop string that may be absent
            source = text if rng.random() < 0.7 else other
            a = rng.randrange(len(source))
            stops.append(source[a:a + rng.randint(1, 6)])
        want = _first_stop(tok, tokens, stops)
        got = _first_finished(StopChecker(tok, stops, []), tokens)
        assert got == want, (text, tokens, stops)
        checked += 1
        hits += want is not None
    assert hits > checked // 2  # the stop strings were mostly there to find


def test_the_text_is_cut_before_the_first_stop_string_it_holds():
    """``StopChecker.text``: the response's text up to the earliest place any stop string starts, whichever of
    them it is and wherever it stands in the list."""
    tok = char_tokenizer()
    tokens = tok("ab, bc. ca", add_special_tokens=False)["input_ids"]
    assert StopChecker(tok, ["ca", "bc"], []).text(tokens) == "ab, "
    assert StopChecker(tok, ["c. c", "b, b"], []).text(tokens) == "a"
    assert StopChecker(tok, ["!"], []).text(tokens) == "ab, bc. ca"


def test_a_stop_string_that_is_a_special_token_ends_the_response_there():
    """"<eos>" (a chat model's "<|im_end|>", say) is decoded to nothing, so as a stop string it never matched and
    the responses ran on to the length limit; it now ends a response at that token, as the token's id in
    eos_token_ids does, in both decoders."""
    from ivg.decoder import IVGDecoder
    from ivg.naive import NaiveDecoder
    from ivg.options import DecodeOptions

    from .decoder_fixtures import EOS, ivg_models

    models = ivg_models()
    prompts = ["the movie was", "a", "bad acting and", "so, what?"]
    kw = dict(mode="ivg", width=2, successors=2, chunk_len=3, temperature=1.5, max_new_tokens=30, seed=3)
    by_id = IVGDecoder(models).generate(prompts, DecodeOptions(**kw, eos_token_ids=(EOS,)))
    for dec in (IVGDecoder(models), NaiveDecoder(models)):
        by_stop = dec.generate(prompts, DecodeOptions(**kw, eos_token_ids=(), stop=("<eos>",)))
        assert [[b.tokens for b in r.beams] for r in by_stop] == [[b.tokens for b in r.beams] for r in by_id]
    assert any(r.beams[0].tokens[-1] == EOS and len(r.beams[0].tokens) < 30 for r in by_id), "no response drew it"
