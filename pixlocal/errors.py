"""Typed errors. Every error a user can cause is a PixlocalError whose str() is one line
naming the thing (file, URL, model) and what is wrong with it."""


class PixlocalError(Exception):
    """Base class: the CLI prints str(err) as one line and exits 1."""


class ModelNotFound(PixlocalError):
    """A model directory, name or file that does not exist."""


class ConfigError(PixlocalError):
    """params.json / config.json missing, unreadable or lacking required keys."""


class FormatError(PixlocalError):
    """A checkpoint or quantized shard that is truncated, corrupt or of an unknown version."""


class ImageError(PixlocalError):
    """An image that cannot be read, fetched or decoded."""


class ImageTooLarge(ImageError):
    """An image over a size limit: encoded bytes or pixels (a server answers 413)."""


class ContextOverflow(PixlocalError):
    """Prompt + max_tokens does not fit in the model's context window."""


class PromptError(PixlocalError):
    """Messages that are not of the accepted shape."""


class NonFiniteLogits(PixlocalError):
    """The model computed NaN or infinite logits: corrupt weights, most likely."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "the model produced NaN/infinite logits" + (f" {detail}" if detail else "") +
            ": its weights are likely corrupt (NaN or damaged shards); check them with "
            "`pixlocal verify MODEL`, then re-quantize or re-download")
