"""What a loaded model is: the module, its preprocessing, its class names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.functional import InterpolationMode


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> normalised float tensor (3,H,W), in two steps.

    ``view(image)`` is the geometric part (resize, crop): the picture the model sees, which is what
    a map must be laid over. ``__call__`` adds conversion to float and normalisation.
    """

    resize: int | tuple[int, int] | None
    crop: int | tuple[int, int] | None
    mean: Sequence[float]
    std: Sequence[float]
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def view(self, image: Image.Image) -> Image.Image:
        """The resized (and cropped) RGB picture the model sees, as a PIL image (a detector's
        preprocessing resizes nothing: the detector resizes inside)."""
        steps: list[T.Transform] = []
        if self.resize is not None:
            steps.append(T.Resize(self.resize, interpolation=self.interpolation))
        if self.crop is not None:
            steps.append(T.CenterCrop(self.crop))
        return T.Compose(steps)(image.convert("RGB")) if steps else image.convert("RGB")

    def frame(self, image: Image.Image) -> Image.Image:
        """The picture a map registers with: the whole original when nothing is cropped (the map is
        then resized to it), else the cropped view the model saw."""
        return image.convert("RGB") if self.crop is None else self.view(image)

    def frame_size(self, image: Image.Image) -> tuple[int, int]:
        """(H, W) of :meth:`frame` for ``image``, without building the picture."""
        if self.crop is None:
            return (image.height, image.width)
        return (self.crop, self.crop) if isinstance(self.crop, int) else (self.crop[0], self.crop[1])

    def frame_boxes(self, image: Image.Image, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes (M,4) ``(x0, y0, x1, y1)`` in the image's pixels moved into :meth:`frame`'s pixels and
        clipped to it: resized and cropped like the image when the model crops (torchvision's box
        transforms; only the geometry is computed, the image is not resized). Rows stay aligned with
        ``boxes``: a box outside the frame comes back with no area."""
        boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        wrapped = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(image.height, image.width))
        steps: list[T.Transform] = []
        if self.crop is not None:
            steps = [T.Resize(self.resize, interpolation=self.interpolation), T.CenterCrop(self.crop)]
        return T.Compose([*steps, T.ClampBoundingBoxes()])(wrapped).as_subclass(torch.Tensor)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self._tensor(self.view(image))

    def prepare(self, image: Image.Image) -> tuple[torch.Tensor, Image.Image]:
        """(model input, :meth:`frame`) of ``image``, resizing and cropping it once."""
        view = self.view(image)
        return self._tensor(view), image.convert("RGB") if self.crop is None else view

    def _tensor(self, view: Image.Image) -> torch.Tensor:
        tensor = T.Compose([T.PILToTensor(), T.ToDtype(torch.float32, scale=True)])(view)
        return T.Normalize(list(self.mean), list(self.std))(tensor)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the tensors it produces; for a shorter-side resize without a crop (segmenters) a
        square of that side, for a detector's (no resize) 224x224: a representative input."""
        final = self.crop if self.crop is not None else self.resize
        if final is None:
            return (224, 224)
        return (final, final) if isinstance(final, int) else (final[0], final[1])


#: What a loaded model does; how its inputs are read and what its targets are.
TASKS = ("classification", "segmentation", "detection", "video")


@dataclass
class LoadedModel:
    """A model ready to explain: ``module`` is in eval mode. ``task`` is one of :data:`TASKS`: a
    classifier's inputs are (B,C,H,W) batches, a segmenter's too (shorter side resized, not cropped), a
    detector's a list of images of their own sizes, a video model's clips of ``clip_length`` frames
    preprocessed frame by frame (B,C,T,H,W)."""

    name: str
    module: nn.Module
    preprocess: Preprocess
    labels: list[str]
    task: str = "classification"
    clip_length: int | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the model's preprocessed inputs."""
        return self.preprocess.size

    def to(self, device: str | torch.device) -> LoadedModel:
        """Move the module to ``device`` and return self."""
        self.module.to(device)
        return self
