"""Chat messages -> token ids and image arrays, exactly as mistral-common encodes them for Pixtral
(spec §6.3), and token ids -> text, including a streaming decoder.

mistral-common is the reference, so it does the work: we only translate OpenAI-style dicts into
its message objects (loading images through pixlocal.images) and turn its errors into one-line
PromptErrors."""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    ChatMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, SpecialTokens
from mistral_common.tokens.tokenizers.image import ImageEncoder
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from pydantic import ValidationError

from pixlocal.errors import FormatError, ModelNotFound, PixlocalError, PromptError
from pixlocal.images import load_image

Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant")


@dataclass
class Encoded:
    tokens: list[int]
    images: list[np.ndarray]  # one (3, H, W) float32 array per image, in prompt order


class PromptEncoder:
    """The Pixtral chat template and tokenizer (mistral-common's), behind a small interface."""

    def __init__(self, tokenizer_path: str | Path, max_image_size: int | None = None) -> None:
        """Load a tekken.json tokenizer.

        Args:
            tokenizer_path: the checkpoint's tekken.json.
            max_image_size: lower the longest image side (default: the tokenizer's, 1024 for
                Pixtral-12B); images are then resized by mistral-common itself.
        """
        if max_image_size is not None and max_image_size < 1:
            raise PixlocalError(f"max_image_size must be positive, got {max_image_size}")
        self.tokenizer = _load_tokenizer(Path(tokenizer_path))
        instruct = self.tokenizer.instruct_tokenizer
        text = instruct.tokenizer
        if not isinstance(text, Tekkenizer):
            raise FormatError(f"{tokenizer_path}: not a tekken tokenizer, so not Pixtral's")
        self._text: Tekkenizer = text
        self._images = instruct.image_encoder  # None for a text-only tokenizer
        self.bos_id: int = self._text.bos_id
        self.eos_id: int = self._text.eos_id
        self.img_id: int = self._text.get_special_token(SpecialTokens.img.value)
        self.img_break_id: int = self._text.get_special_token(SpecialTokens.img_break.value)
        self.img_end_id: int = self._text.get_special_token(SpecialTokens.img_end.value)
        self.vocab_size: int = self._text.n_words
        if max_image_size is not None:
            self._limit_image_size(max_image_size, tokenizer_path)

    @property
    def patch_size(self) -> int:
        return self._image_encoder("patch_size").image_config.image_patch_size

    @property
    def max_image_size(self) -> int:
        return self._image_encoder("max_image_size").image_config.max_image_size

    def encode(self, messages: Sequence[Message]) -> Encoded:
        """Encode OpenAI-style messages into prompt ids and image arrays.

        Args:
            messages: ``{"role": "system"|"user"|"assistant", "content": str | [chunk, ...]}``,
                chunks being ``{"type": "text", "text": str}``, ``{"type": "image", "image": src}``
                or ``{"type": "image_url", "image_url": url | {"url": url}}`` (any source that
                pixlocal.images.load_image takes). The last message is the user's, or the
                assistant's to continue (its text is then the start of the answer, no EOS).

        Raises:
            PromptError: messages of the wrong shape. ImageError: an image that cannot be read.
        """
        converted = _to_mistral(messages)
        if self._images is None and _has_images(converted):
            raise PromptError("this tokenizer has no image support (not a Pixtral tokenizer?)")
        try:
            request = ChatCompletionRequest(messages=converted)
            tokenized = self.tokenizer.encode_chat_completion(request)
        except (MistralCommonException, ValidationError) as e:
            raise PromptError(f"messages rejected by mistral-common: {_first_line(e)}") from None
        return Encoded(tokens=list(tokenized.tokens), images=list(tokenized.images))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens dropped (mistral-common's decode)."""
        return self.tokenizer.decode(list(ids), special_token_policy=SpecialTokenPolicy.IGNORE)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (possibly part of a UTF-8 character); b"" if special."""
        return self._text.id_to_byte_piece(token_id, SpecialTokenPolicy.IGNORE)

    def is_special(self, token_id: int) -> bool:
        return bool(self._text.is_special(token_id))

    def _image_encoder(self, what: str) -> ImageEncoder:
        if self._images is None:
            raise PixlocalError(f"{what}: this tokenizer has no image support")
        return self._images

    def _limit_image_size(self, size: int, path: str | Path) -> None:
        # mistral-common keeps the limit in ImageConfig.max_image_size, read on every image by
        # the instruct tokenizer's ImageEncoder. That config object is shared with the Tekkenizer
        # (whose .image property refuses to be set), so we give our encoder a modified copy.
        encoder = self._image_encoder(f"{path}: max_image_size")
        config = encoder.image_config
        if size > config.max_image_size:  # the vision encoder never saw larger images
            raise PixlocalError(f"max_image_size must be at most {config.max_image_size} for "
                                f"this model, got {size}")
        encoder.image_config = dataclasses.replace(config, max_image_size=size)


class StreamDecoder:
    """Token ids in, text out as soon as it forms whole UTF-8 characters.

    The concatenation of everything ``add`` and ``flush`` return equals
    ``encoder.decode(all_ids)``; pieces never end inside a character.
    """

    def __init__(self, encoder: PromptEncoder) -> None:
        self._encoder = encoder
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if self._encoder.is_special(token_id):
            # mistral-common decodes each run of normal tokens on its own, so bytes left
            # incomplete before a special token become U+FFFD there; do the same.
            return self.flush()
        return self._utf8.decode(self._encoder.token_bytes(token_id))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _load_tokenizer(path: Path) -> MistralTokenizer:
    if not path.is_file():
        raise ModelNotFound(f"{path}: tokenizer file not found")
    try:
        return MistralTokenizer.from_file(path)
    except Exception as e:  # mistral-common raises anything from JSON to KeyError on bad files
        raise FormatError(f"{path}: not a usable Mistral tokenizer ({_first_line(e)})") from None


def _to_mistral(messages: Sequence[Message]) -> list[ChatMessage]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise PromptError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise PromptError("no messages to encode")
    last = len(messages) - 1
    role = messages[last].get("role") if isinstance(messages[last], Mapping) else None
    if role in ROLES and role not in ("user", "assistant"):  # checked before fetching any image
        raise PromptError(f"messages[{last}]: the last message must be the user's "
                          f"(or the assistant's, to continue it), not {role!r}")
    return [_to_message(m, f"messages[{i}]", i == last) for i, m in enumerate(messages)]


def _to_message(message: Message, where: str, is_last: bool) -> ChatMessage:
    if not isinstance(message, Mapping):
        raise PromptError(f"{where}: expected a dict with 'role' and 'content', not "
                          f"{message!r:.50}")
    role = message.get("role")
    if role not in ROLES:
        raise PromptError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    content = _to_content(message.get("content"), where, images=role == "user")
    if role == "user":
        return UserMessage(content=content)
    if role == "system":
        return SystemMessage(content=content)
    # A trailing assistant message is a prefix to continue: mistral-common then omits its EOS.
    return AssistantMessage(content=content, prefix=is_last)


def _to_content(content: object, where: str, images: bool) -> str | list[Any]:
    if isinstance(content, str):
        if not content:
            raise PromptError(f"{where}: content is empty")
        return content  # passed as a string, as a direct mistral-common call would
    if not isinstance(content, list):
        raise PromptError(f"{where}: content must be a string or a list of chunks")
    if not content:
        raise PromptError(f"{where}: content is an empty list")
    return [_to_chunk(chunk, f"{where}.content[{j}]", images) for j, chunk in enumerate(content)]


def _to_chunk(chunk: object, where: str, images: bool) -> TextChunk | ImageChunk:
    kind = chunk.get("type") if isinstance(chunk, Mapping) else None
    if not isinstance(chunk, Mapping) or kind not in ("text", "image", "image_url"):
        found = f"type {kind!r}" if isinstance(chunk, Mapping) else repr(chunk)[:60]
        raise PromptError(f"{where}: expected a text, image or image_url chunk, got {found}")
    if kind == "text":
        text = chunk.get("text")
        if not isinstance(text, str):
            raise PromptError(f"{where}: a text chunk needs 'text' as a string")
        return TextChunk(text=text)
    if not images:
        raise PromptError(f"{where}: images are only allowed in user messages")
    source = chunk.get(kind)
    if kind == "image_url" and isinstance(source, Mapping):
        source = source.get("url")
    if source is None:
        raise PromptError(f"{where}: an {kind} chunk needs '{kind}' (path, URL, bytes, PIL image)")
    return ImageChunk(image=load_image(source))


def _has_images(messages: list[ChatMessage]) -> bool:
    return any(isinstance(chunk, ImageChunk) for message in messages
               if isinstance(message.content, list) for chunk in message.content)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
