"""Server-side render time of the review page's stack viewer, per slice, p50/p95.

For each series: *first slice* is what opening a draft costs the server before the first image is
on screen — read the series' headers, work out its windows (the MR auto-window reads every slice's
pixels) and render the first key slice — measured cold, from the files (the OS page cache is warm
after the first repeat, as on a server that just received the study). *Per slice* is one uncached
render (read the slice's pixel data, window, PNG) of every slice in turn, as when scrolling.
Times are the functions `service/web/stack.py` calls, without HTTP.

    .venv/bin/python benchmarks/slice_render.py [--repeat 5] [SERIES_DIR ...]

Without directories it measures `medcap sample`'s head CT and brain MR (written to a temp dir)
and, when present, ../shared/data/ct-head-ge and mr-t1-brain-uih (512×512).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_io.render import render_slice, stack_windows  # noqa: E402
from dicom_io.sample_study import write_sample  # noqa: E402
from dicom_io.series import read_series  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(folder: Path, repeat: int) -> dict[str, object]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    first: list[float] = []
    per_slice: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        (series,) = read_series(files)
        windows = stack_windows(series)
        render_slice(series, len(series) // 2, windows["default"])
        first.append(time.perf_counter() - started)
        for i in range(len(series)):
            t = time.perf_counter()
            render_slice(series, i, windows["default"])
            per_slice.append(time.perf_counter() - t)
    s0 = series.slices[0]
    return {
        "series": folder.name,
        "modality": series.modality,
        "slices": len(series),
        "matrix": f"{s0.rows}x{s0.columns}",
        "first_slice_ms": {"p50": 1000 * statistics.median(first), "p95": 1000 * percentile(first, 95)},
        "per_slice_ms": {"p50": 1000 * statistics.median(per_slice), "p95": 1000 * percentile(per_slice, 95), "n": len(per_slice)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("folders", nargs="*", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = args.folders or [Path(tmp) / name for name in write_sample(Path(tmp))]
        if not args.folders:
            folders += [p for p in (SHARED / "ct-head-ge", SHARED / "mr-t1-brain-uih") if p.is_dir()]
        results = [measure(folder, args.repeat) for folder in folders]
    print(f"{'series':<18} {'mod':<4} {'slices':>6} {'matrix':>8}  first slice p50/p95 ms   per slice p50/p95 ms")
    for r in results:
        f, p = r["first_slice_ms"], r["per_slice_ms"]
        print(
            f"{r['series']:<18} {r['modality']:<4} {r['slices']:>6} {r['matrix']:>8}  {f['p50']:8.1f} / {f['p95']:<8.1f}       {p['p50']:6.1f} / {p['p95']:.1f}"
        )  # type: ignore[index]
    out = Path(__file__).resolve().parent / "results" / f"slice-render-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
