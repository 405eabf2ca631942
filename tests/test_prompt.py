"""pixlocal.prompt: the ids and image arrays we feed the model must be exactly mistral-common's own
encode_chat_completion output (compared with the library directly, not with stored files), and
the streaming decoder must reproduce mistral-common's decode."""

from __future__ import annotations

import base64
import functools
import http.server
import threading
from pathlib import Path

import mistral_common
import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from pixlocal.errors import ImageError, ModelNotFound, PixlocalError, PromptError
from pixlocal.prompt import Encoded, PromptEncoder, StreamDecoder

TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    return PromptEncoder(TEKKEN)


@pytest.fixture(scope="module")
def reference() -> MistralTokenizer:
    """A separate instance, so nothing our encoder does to its own can leak into the oracle."""
    return MistralTokenizer.from_file(TEKKEN)


def _picture(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


def _rgba(w: int, h: int) -> Image.Image:
    image = _picture(w, h, "RGBA")
    alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))  # transparent .. opaque
    image.putalpha(Image.fromarray(alpha))
    return image


def _palette_with_transparency(w: int, h: int) -> Image.Image:
    image = _picture(w, h).quantize(16)
    image.info["transparency"] = 3
    return image


# A conversation is written once as (role, content) with content a str or a list of str and PIL
# images; _ours turns it into OpenAI-style dicts, _theirs into mistral-common objects.
def _ours(conversation, image=lambda im: {"type": "image", "image": im}) -> list[dict]:
    def chunk(c):
        return {"type": "text", "text": c} if isinstance(c, str) else image(c)

    def message(role, content):
        return {
            "role": role,
            "content": content if isinstance(content, str) else list(map(chunk, content)),
        }

    return [message(role, content) for role, content in conversation]


def _theirs(conversation, continue_final: bool = False):
    def chunk(c):
        return TextChunk(text=c) if isinstance(c, str) else ImageChunk(image=c)

    messages = []
    for i, (role, content) in enumerate(conversation):
        content = content if isinstance(content, str) else [chunk(c) for c in content]
        if role == "user":
            messages.append(UserMessage(content=content))
        elif role == "system":
            messages.append(SystemMessage(content=content))
        else:
            last = continue_final and i == len(conversation) - 1
            messages.append(AssistantMessage(content=content, prefix=last))
    return ChatCompletionRequest(messages=messages)


def _assert_same(ours: Encoded, theirs, label: str = "") -> None:
    assert ours.tokens == theirs.tokens, label
    assert len(ours.images) == len(theirs.images), label
    for a, b in zip(ours.images, theirs.images, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, label
        np.testing.assert_array_equal(a, b, err_msg=label)


CONVERSATIONS = {
    "single_image": [("user", [_picture(64, 48), "Describe this image."])],
    "text_then_image": [("user", ["Describe this image.", _picture(40, 20)])],
    "multi_image": [("user", ["Compare", _picture(50, 30), "with", _picture(33, 17, seed=1), "."])],
    "system_prompt": [
        ("system", "You are terse."),
        ("user", [_picture(32, 32), "Q1", "Q2"]),
    ],
    "multi_turn": [
        ("system", "You are helpful."),
        ("user", [_picture(64, 32), "What is this?"]),
        ("assistant", "A black box."),
        ("user", ["Compare with", _picture(32, 32, seed=2), "this one."]),
    ],
    "text_only": [("user", "Hello world")],
    "downscaled": [("user", [_picture(1500, 1000), "Big one."])],
    "rgba": [("user", [_rgba(48, 40), "Transparent?"])],
    "grayscale": [("user", [_picture(30, 45, "L"), "Grey?"])],
    "palette": [("user", [_palette_with_transparency(41, 23), "Palette?"])],
    "one_pixel": [("user", [_picture(1, 1), "A dot."])],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_encode_equals_mistral_common(encoder, reference, name):
    conversation = CONVERSATIONS[name]
    ours = encoder.encode(_ours(conversation))
    _assert_same(ours, reference.encode_chat_completion(_theirs(conversation)))


def test_multi_turn_ids_match_the_spec(encoder):
    # PIXTRAL_SPEC §6.3, written out by hand from mistral-common 1.13.1.
    black = [("user", [Image.new("RGB", (64, 32)), "What is this?"]), ("assistant", "A black box.")]
    last = [("user", ["Compare with", Image.new("RGB", (32, 32)), "this one."])]
    ours = encoder.encode(_ours([("system", "You are helpful."), *black, *last]))
    assert ours.tokens == [
        1, 3, 10, 10, 10, 10, 12, 10, 10, 10, 10, 13, 7493, 1395, 1593, 1063, 4, 1065, 7244,
        7616, 1046, 2, 3, 4568, 1584, 20351, 1338, 49272, 1454, 10, 10, 12, 10, 10, 13, 2496,
        1925, 1046, 4,
    ]  # fmt: skip
    assert [a.shape for a in ours.images] == [(3, 32, 64), (3, 32, 32)]


def test_continue_final_assistant_message(encoder, reference):
    conversation = [("user", [_picture(20, 20), "Name it."]), ("assistant", "It is a")]
    ours = encoder.encode(_ours(conversation))
    _assert_same(ours, reference.encode_chat_completion(_theirs(conversation, continue_final=True)))
    assert ours.tokens[-1] != encoder.eos_id
    assert encoder.decode(ours.tokens).endswith("Name it.It is a")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def serve_dir(tmp_path, monkeypatch):
    """Serves tmp_path on 127.0.0.1 (a bounded number of polls, so it can never hang pytest)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = functools.partial(_Quiet, directory=str(tmp_path))
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    httpd.timeout = 0.05  # handle_request() returns after this when nobody calls
    stop = threading.Event()

    def serve() -> None:
        for _ in range(400):  # 20 s at most
            if stop.is_set():
                return
            httpd.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    stop.set()
    thread.join(timeout=5)
    httpd.server_close()


def test_image_sources_give_identical_encodings(encoder, reference, tmp_path, serve_dir):
    image = _rgba(37, 29)
    path = tmp_path / "pic.png"
    image.save(path)
    data = path.read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    expected = reference.encode_chat_completion(_theirs([("user", [Image.open(path), "What?"])]))
    sources = {
        "path": {"type": "image", "image": str(path)},
        "pathlib": {"type": "image", "image": path},
        "pil": {"type": "image", "image": Image.open(path)},
        "bytes": {"type": "image", "image": data},
        "data_uri": {"type": "image_url", "image_url": uri},
        "url": {"type": "image_url", "image_url": {"url": f"{serve_dir}/pic.png"}},
        "file_uri": {"type": "image_url", "image_url": path.as_uri()},
    }
    for name, chunk in sources.items():
        content = [chunk, {"type": "text", "text": "What?"}]
        ours = encoder.encode([{"role": "user", "content": content}])
        _assert_same(ours, expected, name)


def test_max_image_size_512_gives_a_32x32_grid(encoder):
    small = PromptEncoder(TEKKEN, max_image_size=512)
    image = _picture(1024, 1024)
    ours = small.encode([{"role": "user", "content": [{"type": "image", "image": image}]}])
    assert ours.images[0].shape == (3, 512, 512)
    assert ours.tokens.count(small.img_id) == 32 * 32
    assert ours.tokens.count(small.img_break_id) == 31
    assert ours.tokens.count(small.img_end_id) == 1
    # Same pixels as mistral-common's own encoder configured for 512.
    ids = SpecialImageIDs(small.img_id, small.img_break_id, small.img_end_id)
    expected = ImageEncoder(ImageConfig(16, 512), ids)(ImageChunk(image=image))
    np.testing.assert_array_equal(ours.images[0], expected.image)
    # The tokenizer's own config and other encoders keep 1024.
    assert small.tokenizer.instruct_tokenizer.tokenizer.image.max_image_size == 1024
    assert small.max_image_size == 512 and encoder.max_image_size == 1024
    full = encoder.encode([{"role": "user", "content": [{"type": "image", "image": image}]}])
    assert full.images[0].shape == (3, 1024, 1024)


@pytest.mark.parametrize("size", [0, -16, 2048])
def test_max_image_size_out_of_range(size):
    with pytest.raises(PixlocalError, match="max_image_size"):
        PromptEncoder(TEKKEN, max_image_size=size)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ModelNotFound, match="tekken.json"):
        PromptEncoder(tmp_path / "tekken.json")


def test_ids_come_from_the_tokenizer(encoder):
    text = encoder.tokenizer.instruct_tokenizer.tokenizer
    assert (encoder.bos_id, encoder.eos_id) == (text.bos_id, text.eos_id)
    assert [encoder.img_id, encoder.img_break_id, encoder.img_end_id] == [
        text.get_special_token(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
    ]
    assert (encoder.patch_size, encoder.vocab_size) == (16, 131072)


def test_decode_and_token_bytes(encoder):
    ids = encoder.encode([{"role": "user", "content": "Hello world"}]).tokens
    assert encoder.decode(ids) == "Hello world"
    assert encoder.token_bytes(encoder.bos_id) == b"" and encoder.token_bytes(encoder.img_id) == b""
    hello = encoder.tokenizer.instruct_tokenizer.tokenizer.encode("Hello", bos=False, eos=False)
    assert b"".join(encoder.token_bytes(i) for i in hello) == b"Hello"


STREAM_TEXTS = {
    "cjk": "日本語のテキスト、漢字とかな。中文字符测试。한국어 텍스트",
    "emoji": "ok 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 done",
    "comma": "a ,b",
    "newlines": "line one\nline two\n\n  indented\r\n\ttab\n",
    "mixed": "Ünïcödé — “quotes” … €100 ½ 𝔘𝔫𝔦",
}


@pytest.mark.parametrize("name", STREAM_TEXTS)
def test_stream_decoder_pieces_join_to_decode(encoder, name):
    text = STREAM_TEXTS[name]
    ids = encoder.tokenizer.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
    ids = [encoder.bos_id, *ids, encoder.eos_id]
    stream = StreamDecoder(encoder)
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == encoder.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_matches_mistral_common_on_arbitrary_ids(encoder, reference):
    # Random ids split characters anywhere, include invalid byte sequences and special tokens in
    # the middle: the joined stream must still be exactly what mistral-common decodes.
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, encoder.vocab_size, 40).tolist()
        ids += (1000 + rng.integers(128, 256, 10)).tolist()  # lone UTF-8 lead/continuation bytes
        ids += rng.integers(0, 20, 5).tolist()  # special tokens
        rng.shuffle(ids)
        stream = StreamDecoder(encoder)
        joined = "".join(stream.add(i) for i in ids) + stream.flush()
        assert joined == encoder.decode(ids) == reference.decode(ids)


def test_stream_decoder_holds_partial_characters_until_flush(encoder):
    stream = StreamDecoder(encoder)
    first, second, _ = "中".encode()  # 3 bytes; byte tokens are 1000 + byte value
    assert stream.add(1000 + first) == ""
    assert stream.add(1000 + second) == ""
    assert stream.flush() == "\ufffd"  # incomplete at the end: replaced, as decode() does
    assert stream.flush() == ""


HI = {"role": "user", "content": "hi"}
BAD_MESSAGES = {
    "not_a_list": ("Hello", "list"),
    "empty_list": ([], "no messages"),
    "not_a_dict": (["Hello"], "messages[0]"),
    "bad_role": ([{"role": "bot", "content": "hi"}], "role 'bot'"),
    "tool_role": ([{"role": "tool", "content": "{}"}], "role 'tool'"),
    "empty_content": ([{"role": "user", "content": []}], "empty"),
    "no_content": ([{"role": "user"}], "content"),
    "unknown_chunk": ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "'video'"),
    "text_not_str": ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text"),
    "image_missing": ([{"role": "user", "content": [{"type": "image"}]}], "image"),
    "image_in_assistant": (
        [HI, {"role": "assistant", "content": [{"type": "image", "image": b""}]}],
        "only allowed in user messages",
    ),
    "last_is_system": ([HI, {"role": "system", "content": "s"}], "last"),
    "only_assistant": ([{"role": "assistant", "content": "hi"}], "mistral-common"),
}


@pytest.mark.parametrize("name", BAD_MESSAGES)
def test_malformed_messages_raise_prompt_error(encoder, name):
    messages, expected = BAD_MESSAGES[name]
    with pytest.raises(PromptError) as info:
        encoder.encode(messages)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unreadable_image_raises_image_error_naming_it(encoder, tmp_path):
    missing = tmp_path / "gone.png"
    with pytest.raises(ImageError, match="gone.png: not found"):
        encoder.encode([{"role": "user", "content": [{"type": "image", "image": str(missing)}]}])


def test_encoded_images_are_float32_chw(encoder):
    ours = encoder.encode(_ours(CONVERSATIONS["single_image"]))
    assert ours.images[0].dtype == np.float32 and ours.images[0].shape == (3, 48, 64)
    assert isinstance(ours, Encoded) and all(isinstance(t, int) for t in ours.tokens)
