"""Key images of concurrent studies in shared model batches, with the real (tiny) captioner."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from models.batching import CaptionBatcher
from tests.models.parts import one_thread


class Recording:
    """The real captioner, recording how many images each model call got."""

    def __init__(self, captioner, fail: bool = False) -> None:
        self.calls: list[object] = []
        self.captioner, self.fail = captioner, fail
        self.identity, self.views = captioner.identity, captioner.views

    def caption(self, inputs, generation="fast", *, batch_size=8, seed=0):
        self.calls.append((len(inputs["clip"]), generation, batch_size))
        if self.fail:
            raise RuntimeError("CUDA out of memory (as a GPU may say)")
        return self.captioner.caption(inputs, generation, batch_size=batch_size, seed=seed)


def study(captioner, n: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {v.name: g.standard_normal((n, 3, v.size, v.size)).astype(np.float32) for v in captioner.views}


def concurrently(batcher: CaptionBatcher, requests: list[tuple[dict[str, np.ndarray], str]]) -> list[object]:
    results: list[object] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = batcher.caption(requests[i][0], requests[i][1])
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    with one_thread():
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    return results


def test_two_studies_share_one_batch_and_get_their_own_captions(captioner):
    recording = Recording(captioner)
    batcher = CaptionBatcher(recording, max_images=8, max_wait_ms=2000)
    a, b = study(captioner, 3, 1), study(captioner, 3, 2)
    results = concurrently(batcher, [(a, "fast"), (b, "fast")])
    assert recording.calls == [(6, "fast", 8)] and batcher.batches == [6]
    with one_thread():
        assert results == [captioner.caption(a, "fast"), captioner.caption(b, "fast")]


def test_a_batch_never_exceeds_its_size_and_settings_never_mix(captioner):
    recording = Recording(captioner)
    batcher = CaptionBatcher(recording, max_images=4, max_wait_ms=500)
    results = concurrently(batcher, [(study(captioner, 3, 1), "fast"), (study(captioner, 3, 2), "fast"), (study(captioner, 1, 3), "paper")])
    assert sorted(n for n, _, _ in recording.calls) == [1, 3, 3] and all(isinstance(r, list) for r in results)
    assert {g for n, g, _ in recording.calls if n == 1} == {"paper"}


def test_a_failed_batch_fails_each_of_its_studies(captioner):
    batcher = CaptionBatcher(Recording(captioner, fail=True), max_images=8, max_wait_ms=1000)
    results = concurrently(batcher, [(study(captioner, 2, 1), "fast"), (study(captioner, 2, 2), "fast")])
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)
    with pytest.raises(ValueError, match="max_images"):
        CaptionBatcher(captioner, max_images=0, max_wait_ms=1)
