"""Key images of several studies in one model batch: a GPU is fed by the batch, not by the study.

A study brings a handful of key images (3 per series by default); a GPU captions 32 in little
more time than 3, because decoding reads the whole LM once per token whatever the batch. So a
caption worker with several studies in flight (threads) sends every study's images through one
:class:`CaptionBatcher`: the first request waits up to ``max_wait_ms`` for others, then up to
``max_images`` images from all waiting requests go through the captioner in one call, and each
study gets its own captions back. Requests with other generation settings wait for a batch of
their own. A failure fails every study of that batch, and each retries as it would alone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicom_io.image_views import ImageView

LOG = logging.getLogger(__name__)


@dataclass
class _Request:
    inputs: dict[str, np.ndarray]
    generation: Any
    seed: int
    count: int
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[str] | None = None
    error: BaseException | None = None

    def key(self) -> tuple[str, int]:
        return repr(self.generation), self.seed


class CaptionBatcher:
    """A captioner shared by threads, merging their requests into batches; same ``caption`` as :class:`Captioner`."""

    def __init__(self, captioner: Any, *, max_images: int, max_wait_ms: float) -> None:
        if max_images < 1:
            raise ValueError("max_images: must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms: must not be negative")
        self.captioner = captioner
        self.max_images = max_images
        self.max_wait = max_wait_ms / 1000
        self.batches: list[int] = []  # images per model call, most recent last (a short history, for metrics and tests)
        self._waiting: list[_Request] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._series_lock = threading.Lock()

    # What drafting reads of a captioner.
    @property
    def identity(self) -> Any:
        return self.captioner.identity

    @property
    def views(self) -> tuple[ImageView, ...]:
        return self.captioner.views

    @property
    def reads_series(self) -> bool:
        return bool(getattr(self.captioner, "reads_series", False))

    def caption_series(self, series: Any, generation: Any = "fast", *, batch_size: int = 8, seed: int = 0) -> list[list[str]]:
        """A model that reads series (``hf-vlm``) gets each study's series as they come, one study
        at a time (its prompts are per series, so images of several studies are not merged)."""
        with self._series_lock:
            return self.captioner.caption_series(series, generation, batch_size=batch_size, seed=seed)

    def describe(self) -> dict[str, Any]:
        return {**self.captioner.describe(), "batch_images": self.max_images, "batch_wait_ms": self.max_wait * 1000}

    def caption(self, inputs: dict[str, np.ndarray], generation: Any = "fast", *, batch_size: int = 8, seed: int = 0) -> list[str]:
        """Captions of these images, in order; blocks until their batch has run. ``batch_size`` is the batcher's own."""
        names = [v.name for v in self.views]
        missing = set(names) - set(inputs)
        if missing:
            raise ValueError(f"inputs: missing view(s) {sorted(missing)}")
        counts = {len(inputs[b]) for b in names}
        if len(counts) != 1:
            raise ValueError(f"inputs: views disagree on the number of images {counts}")
        request = _Request({b: inputs[b] for b in names}, generation, seed, counts.pop())
        if request.count == 0:
            return []
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="caption-batcher", daemon=True)
                self._thread.start()
            self._waiting.append(request)
            self._lock.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _take(self) -> list[_Request]:
        """The next batch: the oldest request and those like it, once they fill a batch or its wait is over."""
        with self._lock:
            while True:
                while not self._waiting:
                    self._lock.wait()
                first = self._waiting[0]
                alike = [r for r in self._waiting if r.key() == first.key()]
                remaining = first.arrived + self.max_wait - time.monotonic()
                if sum(r.count for r in alike) >= self.max_images or remaining <= 0:
                    break
                self._lock.wait(timeout=remaining)
            batch: list[_Request] = []
            total = 0
            for request in alike:
                if batch and total + request.count > self.max_images:
                    break
                batch.append(request)
                total += request.count
            for request in batch:
                self._waiting.remove(request)
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._take()
            try:
                merged = {b: np.concatenate([r.inputs[b] for r in batch]) for b in batch[0].inputs}
                captions = self.captioner.caption(merged, batch[0].generation, batch_size=self.max_images, seed=batch[0].seed)
                self.batches = [*self.batches[-99:], len(captions)]
                LOG.info("captioned %d key images of %d studies in one batch", len(captions), len(batch))
                start = 0
                for request in batch:
                    request.result = captions[start : start + request.count]
                    start += request.count
            except BaseException as exc:  # noqa: BLE001  # handed to every waiting study, which fails or retries as alone
                for request in batch:
                    request.error = exc
            finally:
                for request in batch:
                    request.done.set()
