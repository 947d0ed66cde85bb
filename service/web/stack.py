"""The review page's stack viewer, server side: a series' slice list with its key images and windows
(JSON), and any slice under any window as PNG, rendered from the stored DICOM.

Only series of the draft's own study are served, to signed-in radiologists; what is rendered is
what the viewer asks for (the slice on screen and its neighbours), kept in a small in-process cache.
The page view that opens the viewer is the audit event (``study.viewed``), as for the key images.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from dicom_io.intensity import Window
from dicom_io.render import render_slice, slice_index, stack_windows
from dicom_io.review_facts import SeriesFacts, series_facts
from dicom_io.series import Series
from service.schema import Draft, Instance, SeriesRecord, SRDocument
from service.storage import Storage
from service.web.context import Context, Radiologist, WebContext

router = APIRouter(include_in_schema=False)
# Renders are deterministic for (files, slice, window) and stored files never change (their names carry
# the content hash), so the browser may keep them for the session.
IMAGE_CACHE = "private, max-age=3600"


def series_paths(ctx: WebContext, draft_id: int, series_uid: str) -> tuple[str, ...] | None:
    """The stored image files of ``series_uid`` when it is a series of the draft's study, else None."""
    with ctx.db.session() as s:
        study_id = s.scalar(select(SRDocument.study_id).where(SRDocument.id == draft_id))
        series_id = s.scalar(select(SeriesRecord.id).where(SeriesRecord.series_uid == series_uid, SeriesRecord.study_id == study_id))
        if study_id is None or series_id is None:
            return None
        paths = tuple(s.scalars(select(Instance.path).where(Instance.series_id == series_id, Instance.captionable).order_by(Instance.path)))
    return paths or None


@lru_cache(maxsize=16)
def cached_series(storage: Storage, paths: tuple[str, ...], series_uid: str | None) -> Series:
    # Headers of a series are read once; pixel data is read per slice, when it is rendered.
    for series in storage.read_series(paths):
        if series.series_uid == series_uid:
            return series
    raise KeyError(f"series {series_uid} cannot be loaded")


@lru_cache(maxsize=16)
def _windows(storage: Storage, paths: tuple[str, ...], series_uid: str) -> dict[str, Window]:
    return stack_windows(cached_series(storage, paths, series_uid))


@lru_cache(maxsize=256)
def rendered_slice(storage: Storage, paths: tuple[str, ...], series_uid: str, index: int, center: float, width: float) -> bytes:
    return render_slice(cached_series(storage, paths, series_uid), index, Window(center, width))


def header_facts(ctx: WebContext, draft_id: int, series_uid: str) -> SeriesFacts | None:
    """The series' header facts for the review page; None when its files cannot be read."""
    paths = series_paths(ctx, draft_id, series_uid)
    if paths is None:
        return None
    try:
        series = cached_series(ctx.settings.storage, paths, series_uid)
        return series_facts(series.header, (*series.row_cosines, *series.column_cosines))
    except (KeyError, OSError, ValueError):
        return None


@router.get("/drafts/{draft_id}/series/{series_uid}/stack.json")
def stack(ctx: Context, who: Radiologist, draft_id: int, series_uid: str) -> Response:
    paths = series_paths(ctx, draft_id, series_uid)
    if paths is None:
        return JSONResponse({"detail": "This series is not part of the draft's study."}, status_code=404)
    try:
        series = cached_series(ctx.settings.storage, paths, series_uid)
        windows = _windows(ctx.settings.storage, paths, series_uid)
    except (KeyError, OSError, ValueError) as exc:
        return JSONResponse({"detail": f"The images of this series cannot be read: {exc}"}, status_code=404)
    with ctx.db.session() as s:
        keys: list[dict[str, Any]] = (
            s.scalar(select(Draft.key_images).where(Draft.sr_document_id == draft_id, Draft.series_uid == series_uid)) or []
        )
    marked = []
    for n, key in enumerate(keys, 1):
        try:
            marked.append({"index": slice_index(series, key["sop_instance_uid"], key.get("frame")), "label": f"Key image {n}"})
        except KeyError:
            continue  # a key image of an earlier version of the series: not in this stack
    return JSONResponse(
        {
            "series_uid": series_uid,
            "modality": series.modality,
            "count": len(series),
            "slices": [
                {"number": s.instance_number, "position": round(s.position, 2), "sop_instance_uid": s.sop_instance_uid, "frame": s.frame}
                for s in series.slices
            ],
            "keys": marked,
            "windows": {name: [w.center, w.width] for name, w in windows.items()},
            "image": f"/drafts/{draft_id}/series/{series_uid}/slices/",
        }
    )


@router.get("/drafts/{draft_id}/series/{series_uid}/slices/{index}.png")
def slice_png(ctx: Context, who: Radiologist, draft_id: int, series_uid: str, index: int, c: float, w: float) -> Response:
    """Slice ``index`` (0-based, stack order) under window center ``c`` and width ``w`` (HU for CT)."""
    if not (math.isfinite(c) and math.isfinite(w) and w > 0):
        return Response("The window needs a finite center and a width above 0.", status_code=400, media_type="text/plain")
    paths = series_paths(ctx, draft_id, series_uid)
    if paths is None:
        return Response("This series is not part of the draft's study.", status_code=404, media_type="text/plain")
    try:
        # Rounded: a drag produces many nearly equal windows; one decimal is below what anyone can see.
        png = rendered_slice(ctx.settings.storage, paths, series_uid, index, round(c, 1), round(w, 1))
    except IndexError as exc:
        return Response(str(exc), status_code=404, media_type="text/plain")
    except (KeyError, OSError, ValueError) as exc:
        return Response(f"This slice cannot be read: {exc}", status_code=404, media_type="text/plain")
    return Response(png, media_type="image/png", headers={"Cache-Control": IMAGE_CACHE})
