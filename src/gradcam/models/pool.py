"""The models a front end explains with (the service, the trust study): each loaded once, on first use,
and one lock per model."""

from __future__ import annotations

import threading
from collections.abc import Callable

from gradcam import models
from gradcam.errors import GradCAMError
from gradcam.models import LoadedModel


class ModelPool:
    """The served models by name; the first is the default.

    A model is loaded on first :meth:`get` (a server with several models starts at once) and kept.
    Anything that runs a model must hold :meth:`lock`: the engine hooks the module for the length of a
    call, and two threads hooking one module would read each other's activations.
    """

    def __init__(
        self, names: list[str], *, device: str = "cpu", loader: Callable[..., LoadedModel] = models.load
    ) -> None:
        if not names:
            raise GradCAMError("at least one model must be served")
        if loader is models.load:  # a stand-in loader (tests) may serve names of its own
            for name in names:
                models.check(name)
        self.names = list(dict.fromkeys(names))
        self.device = device
        self._loader = loader
        self._loaded: dict[str, LoadedModel] = {}
        self._locks = {name: threading.Lock() for name in self.names}
        self._loading = threading.Lock()

    @property
    def default(self) -> str:
        """The first model: the one used when a request names none."""
        return self.names[0]

    def check(self, name: str) -> str:
        """``name`` when it is served, else a GradCAMError listing the served models."""
        if name not in self._locks:
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise GradCAMError(f"model '{shown}' is not served here; choose from {', '.join(self.names)}")
        return name

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name`` (loaded now if it is the first use)."""
        self.check(name)
        with self._loading:
            if name not in self._loaded:
                self._loaded[name] = self._loader(name, device=self.device)
            return self._loaded[name]

    def lock(self, name: str) -> threading.Lock:
        """The lock to hold while running model ``name``."""
        return self._locks[self.check(name)]

    def loaded(self) -> list[str]:
        """The models loaded so far."""
        with self._loading:
            return list(self._loaded)
