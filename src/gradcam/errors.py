"""The library's error types. Each message names the thing at fault and what was expected."""


class GradCAMError(ValueError):
    """A caller mistake: bad inputs, targets, layer, model name or file. Its message is one line."""


class ImageLoadError(GradCAMError):
    """An image file that is missing, empty, truncated, not an image, or too large to decode safely.

    ``reason`` says which, for callers that answer differently (the service's 413 / 415 / 422): one of
    "missing", "empty", "format" (not an image Pillow reads), "too-large", "permission", "corrupt".
    """

    def __init__(self, message: str, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.reason = reason
