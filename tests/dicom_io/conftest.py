"""Fixtures for the preprocessing tests: copies of the shared series, edited or converted at test time."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom import Dataset

from dicom_io.series import read_series
from tests.conftest import series_files


def legacy_enhanced_ct(name: str, out: Path) -> Path:
    """The shared series ``name`` as one Legacy Converted Enhanced CT file, its frames stored shuffled."""
    datasets = [pydicom.dcmread(p) for p in series_files(name)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # de-identified single-component PatientName
        image = LegacyConvertedEnhancedCTImage(
            datasets, series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1
        )
    # highdicom may sort the frames itself; shuffle them so that the loader, not the converter, orders them
    order = list(range(int(image.NumberOfFrames)))
    random.Random(7).shuffle(order)
    frames = image.pixel_array
    image.PerFrameFunctionalGroupsSequence = [image.PerFrameFunctionalGroupsSequence[i] for i in order]
    image.PixelData = np.ascontiguousarray(frames[order]).tobytes()
    path = out / f"{name}-legacy-enhanced"
    image.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def multiframe(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``multiframe(name)``: the Legacy Converted Enhanced CT of a shared series, built once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = legacy_enhanced_ct(name, tmp_path_factory.mktemp("multiframe"))
        return built[name]

    return get


@pytest.fixture
def edited(tmp_path: Path) -> Callable[..., list[Path]]:
    """``edited(files, change)``: copies of ``files`` in a fresh folder, each passed through ``change(ds, index)``."""
    counter = iter(range(1_000_000))

    def make(files: list[Path], change: Callable[[Dataset, int], None] | None = None) -> list[Path]:
        folder = tmp_path / f"edited{next(counter)}"
        folder.mkdir()
        written = []
        for i, path in enumerate(files):
            ds = pydicom.dcmread(path)
            if change is not None:
                change(ds, i)
            target = folder / path.name
            ds.save_as(target, enforce_file_format=True)
            written.append(target)
        return written

    return make


@pytest.fixture(scope="session")
def ge():
    """The GE head CT: tilted gantry, two slice thicknesses."""
    return read_series(series_files("ct-head-ge"))[0]


@pytest.fixture(scope="session")
def mr():
    """The UIH T1 MR: every slice at the same z, sorted only along the normal."""
    return read_series(series_files("mr-t1-brain-uih"))[0]
