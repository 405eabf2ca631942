"""ChatSession: a multi-turn conversation over one runner (generate.Pixtral), keeping its KV
cache between turns; the turns and the images attached for the next message. (The chat
REPL's /save and /load file format lives with the REPL, cli/chat.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .generate import Pixtral, Step
from .images import load_image
from .prompt import Encoded


@dataclass
class Turn:
    """One exchange: the user's text, the images that went with it as (source, image), the
    answer and its figures."""
    text: str | list[dict[str, Any]]
    images: list[tuple[str, Any]] = field(default_factory=list)
    answer: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def user_content(self, sources: bool = False) -> str | list[dict[str, Any]]:
        """The user message's content; `sources`: images by source and always a list (the
        saved form)."""
        if not self.images and not sources:
            return self.text
        text = [{"type": "text", "text": self.text}] if isinstance(self.text, str) else self.text
        return [{"type": "image", "image": src if sources else im}
                for src, im in self.images] + text


class ChatSession:
    """A multi-turn conversation that keeps the KV cache between turns. Images attached with
    `attach` go with the next message. A turn joins the history only with an answer; a turn
    that fails (ContextOverflow, a bad image, any error) or stops before any answer leaves
    the history and the attached images as they were."""

    def __init__(self, model: Pixtral, system: str | None = None):
        self.model, self.system = model, system
        self.turns: list[Turn] = []
        self.pending: list[tuple[str, Any]] = []

    def _system(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation so far as chat messages (system prompt not included)."""
        out: list[dict[str, Any]] = []
        for t in self.turns:
            out += [{"role": "user", "content": t.user_content()},
                    {"role": "assistant", "content": t.answer}]
        return out

    @property
    def context_tokens(self) -> int:
        """Tokens the conversation held after the last answer."""
        return self.turns[-1].stats.get("context_tokens", 0) if self.turns else 0

    def attach(self, source: str, image: Any = None) -> None:
        """An image (path, URL or data URI; decoded already, or opened here) for the next
        message."""
        if image is None:
            image = load_image(source)
        self.pending.append((source, image))

    def reset(self) -> None:
        self.turns, self.pending = [], []
        self.model.reset()

    def encode(self, content: str | list[dict[str, Any]]) -> Encoded:
        """The whole conversation with `content` (and the attached images) as the next turn."""
        new = Turn(content, list(self.pending))
        return self.model.encode(self._system() + self.messages
                                 + [{"role": "user", "content": new.user_content()}])

    def send(self, content: str | list[dict[str, Any]], *, enc: Encoded | None = None,
             **kw: Any) -> Iterator[Step]:
        """Add a user turn and stream the answer (Pixtral.stream's keywords); the turn joins
        the history when done, or with its partial answer when the caller stops iterating
        (stats["interrupted"]). `enc`: this turn's encode(), if the caller made it already."""
        turn = Turn(content, list(self.pending))
        enc = enc if enc is not None else self.encode(content)
        before = self.model.images_encoded
        parts: list[str] = []
        last: Step | None = None
        done = False
        try:
            for last in self.model.stream_encoded(enc, **kw):
                parts.append(last.text)
                yield last
            done = True
        finally:
            turn.answer = "".join(parts)
            if turn.answer.strip() and last is not None:
                turn.stats = {"prompt_tokens": len(enc.tokens),
                              "prefilled_tokens": last.prefilled_tokens,
                              "generated_tokens": last.index + 1,
                              "images_encoded": self.model.images_encoded - before,
                              "interrupted": not done,
                              "context_tokens": len(enc.tokens) + last.index + 1}
                self.turns.append(turn)
                self.pending = self.pending[len(turn.images):]
