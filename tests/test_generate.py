"""Generation on the tiny checkpoint: greedy/sampled, limits, EOS, streaming, ChatSession."""

from __future__ import annotations

import pytest
import torch

import pixlocal
from pixlocal import ChatSession, ContextOverflow
from pixlocal.generate import sample


def _msgs(img, text="What is in this picture?"):
    return [{"role": "user", "content": [{"type": "image", "image": str(img)},
                                         {"type": "text", "text": text}]}]


def test_greedy_is_deterministic_and_honours_max_tokens(tiny_model, sample_png):
    steps = list(tiny_model.stream(_msgs(sample_png), max_tokens=12))
    again = list(tiny_model.stream(_msgs(sample_png), max_tokens=12))
    assert [s.token for s in steps] == [s.token for s in again]
    assert len(steps) <= 12 and steps[-1].finish_reason in ("length", "stop")
    assert all(s.finish_reason is None for s in steps[:-1])


def test_greedy_tokens_follow_the_full_forward_argmax(tiny_model, sample_png):
    """Each greedy token is the argmax of one cache-free forward over everything before it."""
    enc = tiny_model.encode(_msgs(sample_png))
    toks = [s.token for s in tiny_model.stream(_msgs(sample_png), max_tokens=6)]
    for i, t in enumerate(toks):
        logits = tiny_model.logits(enc.tokens + toks[:i], enc.images)
        assert int(logits[-1].argmax()) == t


def test_stream_text_joins_to_decode(tiny_model, sample_png):
    steps = list(tiny_model.stream(_msgs(sample_png), max_tokens=20, temperature=1.0, seed=3))
    text = "".join(s.text for s in steps)
    toks = [s.token for s in steps if s.finish_reason != "stop"]
    assert text == tiny_model.encoder.decode(toks)


def test_seeded_sampling_repeats_and_seeds_differ(tiny_model, sample_png):
    run = lambda seed: [s.token for s in tiny_model.stream(  # noqa: E731
        _msgs(sample_png), max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=seed)]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_eos_stops_generation(tiny_model, sample_png, monkeypatch):
    eos = tiny_model.encoder.eos_id
    seq = iter([1050, 1051, eos, 1052])
    monkeypatch.setattr("pixlocal.generate.sample", lambda *a, **k: next(seq))
    steps = list(tiny_model.stream(_msgs(sample_png), max_tokens=10))
    assert [s.token for s in steps] == [1050, 1051, eos]
    assert steps[-1].finish_reason == "stop" and steps[-1].text == ""


def test_sampler_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 1.0, 0, None) == 1
    assert {sample(logits, 1.0, 1.0, 1, g) for _ in range(20)} == {1}  # top-k 1 = greedy
    picks = {sample(logits, 1.0, 0.6, 0, g) for _ in range(50)}  # top-p keeps the top two
    assert picks == {1, 2}


def test_context_overflow_is_refused_before_compute(tiny_model, sample_png, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed despite overflow")
    monkeypatch.setattr(tiny_model, "_prefill", boom)
    limit = tiny_model.args.max_seq_len
    with pytest.raises(ContextOverflow, match="context window"):
        list(tiny_model.stream(_msgs(sample_png), max_tokens=limit))


def test_chat_session_reuses_the_cache_and_matches_a_fresh_run(tiny_ckpt, sample_png):
    chat_model = pixlocal.load(tiny_ckpt, dtype="float32")
    chat = ChatSession(chat_model)
    first = list(chat.send([{"type": "image", "image": str(sample_png)},
                            {"type": "text", "text": "Describe it."}], max_tokens=8))
    encoded_after_first = chat_model.images_encoded
    second = list(chat.send("And the colours?", max_tokens=8))
    # turn 2 computed only its own tokens and never re-ran the vision encoder
    assert chat_model.images_encoded == encoded_after_first == 1
    conv = chat.messages[:-1]
    full = chat_model.encode(conv).tokens
    turn1 = chat_model.encode(conv[:1]).tokens
    assert second[0].prefilled_tokens < len(full) - len(turn1) + 2
    assert second[0].prefilled_tokens >= len(full) - len(turn1) - len(first)

    fresh = pixlocal.load(tiny_ckpt, dtype="float32")
    ref = [s.token for s in fresh.stream(conv, max_tokens=8)]
    assert [s.token for s in second] == ref


def test_chat_session_sees_a_new_image_of_the_same_size(tiny_ckpt, sample_png, other_png):
    """Two different images give identical [IMG] ids; the cache must still tell them apart."""
    m = pixlocal.load(tiny_ckpt, dtype="float32")
    chat = ChatSession(m)
    list(chat.send([{"type": "image", "image": str(sample_png)},
                    {"type": "text", "text": "Describe it."}], max_tokens=4))
    # the runner's cache now holds sample_png's prompt; the same prompt with other_png
    # has the same ids but must not reuse those image positions
    got = [s.token for s in m.stream(_msgs(other_png, "Describe it."), max_tokens=6)]
    fresh = pixlocal.load(tiny_ckpt, dtype="float32")
    assert got == [s.token for s in fresh.stream(_msgs(other_png, "Describe it."), max_tokens=6)]
    assert m.images_encoded == 2


def test_chat_reset_forgets_history(tiny_ckpt):
    m = pixlocal.load(tiny_ckpt, dtype="float32")
    chat = ChatSession(m, system="Be brief.")
    list(chat.send("Hello", max_tokens=3))
    chat.reset()
    assert chat.messages == []
    steps = list(chat.send("Hello", max_tokens=3))
    assert steps[0].prefilled_tokens == steps[0].prompt_tokens  # nothing reused after reset


def test_a_chat_turn_that_fails_keeps_history_and_images(tiny_ckpt, sample_png):
    """The runner refuses a turn past its planned context (ContextOverflow) after the
    session encoded it: the attached image stays pending and the history is unchanged."""
    m = pixlocal.load(tiny_ckpt, dtype="float32")
    chat = ChatSession(m)
    list(chat.send("Hello", max_tokens=3))
    before = chat.messages
    chat.attach(str(sample_png))
    m.context_len = len(chat.encode("Describe it.").tokens) + 1  # a plan for fewer tokens
    with pytest.raises(ContextOverflow):
        list(chat.send("Describe it.", max_tokens=8))
    assert chat.messages == before and len(chat.pending) == 1
    m.context_len = 10_000
    steps = list(chat.send("Describe it.", max_tokens=2))
    assert steps and chat.pending == [] and len(chat.turns) == 2
    from pixlocal.cli.chat import load_chat, saved_chat
    saved = saved_chat(chat, "tiny")
    again = ChatSession(m)
    load_chat(again, saved)
    assert again.messages[0] == before[0] and len(again.turns) == 2
    assert again.turns[1].images[0][0] == str(sample_png)
