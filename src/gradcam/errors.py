"""The library's error types. Each message names the thing at fault and what was expected."""


class GradCAMError(ValueError):
    """A caller mistake: bad inputs, targets, layer, model name or file. Its message is one line."""


class ImageLoadError(GradCAMError):
    """An image file that is missing, empty, truncated, not an image, or too large to decode safely."""
