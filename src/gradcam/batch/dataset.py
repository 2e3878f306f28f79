"""Reading and preprocessing images in DataLoader worker processes, while the model runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gradcam import io, video, viz
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.models import Preprocess

#: Dataset overlays are drawn on a copy of the picture whose longer side is at most this many pixels: a
#: browsing picture, 1.5 times the gallery's thumbnails (the raw map is the data, and a 7x7 map has no
#: finer detail to show). At 384 an overlay PNG is about 150 kB and takes some 6 ms of CPU to draw and
#: encode; a full-size one can cost as much as the model's forward pass and 1 MB. 0 keeps the full picture.
OVERLAY_SIZE = 384


@dataclass
class Sample:
    """One image as a worker prepared it: the model input and the picture its overlay is drawn on, or
    the reason it could not be read."""

    index: int
    tensor: torch.Tensor | None = None
    #: (H, W, 3) uint8, the frame (at most overlay_size a side); a clip's frames (T, H, W, 3)
    picture: np.ndarray | None = None
    frame_size: tuple[int, int] | None = None  # (W, H) of the full-resolution frame
    error: str | None = None


class ImageDataset(Dataset):
    """The images of a run, each read, checked and preprocessed in a worker; failures become samples
    with an ``error``, so that a bad file never stops the loader. With ``clip_length`` (a video model)
    each path is a clip (a video file or a folder of frames): ``clip_length`` frames evenly spaced over
    it, each preprocessed, stacked along time (C, T, H, W)."""

    def __init__(
        self,
        paths: Sequence[Path],
        preprocess: Preprocess,
        overlay_size: int = OVERLAY_SIZE,
        clip_length: int | None = None,
    ) -> None:
        self.paths, self.preprocess, self.overlay_size = list(paths), preprocess, overlay_size
        self.clip_length = clip_length

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        path = self.paths[index]
        if self.clip_length is not None:
            return self._clip(index, path)
        try:
            image = io.load_image(path)
            tensor, frame = self.preprocess.prepare(image)
        except ImageLoadError as error:
            return Sample(index, error=str(error))
        except (OSError, ValueError) as error:  # a file that decodes but breaks a transform
            return Sample(index, error=f"{path}: cannot be read as an image ({error})")
        size = frame.size  # prepare() gives the frame as a new RGB image of our own: shrunk in place
        return Sample(index, tensor, np.asarray(viz.shrink(frame, self.overlay_size)), size)

    def _clip(self, index: int, path: Path) -> Sample:
        assert self.clip_length is not None
        try:
            frames = video.sample_frames(video.read_frames(path), self.clip_length)
            prepared = [self.preprocess.prepare(frame) for frame in frames]
        except GradCAMError as error:
            return Sample(index, error=str(error))
        except (OSError, ValueError) as error:
            return Sample(index, error=f"{path}: cannot be read as a clip ({error})")
        tensor = torch.stack([t for t, _ in prepared], dim=1)  # (C, T, H, W)
        size = prepared[0][1].size
        pictures = np.stack([np.asarray(viz.shrink(f, self.overlay_size)) for _, f in prepared])
        return Sample(index, tensor, pictures, size)


def _keep_list(samples: list[Sample]) -> list[Sample]:
    return samples


def loader(dataset: ImageDataset, batch_size: int, workers: int) -> DataLoader:
    """Batches of samples in order, decoded by ``workers`` processes (0: in this process)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_keep_list,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
