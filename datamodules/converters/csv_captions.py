"""A ``filepath,caption`` CSV (or TSV) -> image-text shards, one sample per row."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

from datamodules.faults import FaultCounter

from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageLimits
from .writer import DEFAULT_MAXCOUNT, SourceSample, SplitWriter, check_prefix, sanitize_key


def convert_csv(
    csv_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefix: str = "train",
    root: str | os.PathLike | None = None,
    delimiter: str | None = None,
    overwrite: bool = False,
    maxcount: int = DEFAULT_MAXCOUNT,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict[str, Any]:
    """A CSV with header ``filepath,caption`` -> shards, one sample per row in file order (keys ``{prefix}_{row}``).

    Relative paths are resolved against ``root`` (default: the CSV's folder). Rows whose file is missing or whose
    caption is empty are skipped and counted (``file_missing``, ``caption_missing``). Other columns go to
    ``key.json`` with the path. ``delimiter`` defaults to tab for ``.tsv`` files, else comma.
    """
    started = time.perf_counter()
    check_prefix(prefix)
    writer = SplitWriter(out, maxcount, overwrite, ImageLimits(min_side, max_pixels), progress)
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file does not exist: {csv_path}")
    base = Path(root) if root is not None else csv_path.parent
    if not base.is_dir():
        raise FileNotFoundError(f"root folder does not exist: {base}")
    delimiter = delimiter or ("\t" if csv_path.suffix.lower() == ".tsv" else ",")
    rows = _read_csv(csv_path, delimiter)
    writer.check_free([prefix])
    faults = FaultCounter()
    samples = []
    width = max(6, len(str(len(rows))))
    for number, row in enumerate(rows):
        rel = (row.get("filepath") or "").strip()
        caption = (row.get("caption") or "").strip()
        where = f"{csv_path} row {number + 2}"  # 1-based, after the header
        if not rel:
            faults.add("file_missing", f"{where}: empty filepath")
            continue
        path = Path(rel) if os.path.isabs(rel) else base / rel
        if not path.is_file():
            faults.add("file_missing", f"{where}: {path} not found")
            continue
        if not caption:
            faults.add("caption_missing", f"{where}: empty caption for {rel}")
            continue
        meta = {k: v for k, v in row.items() if k is not None and k != "caption"}
        samples.append(
            SourceSample(
                f"{sanitize_key(prefix)}_{number:0{width}d}",
                path.read_bytes,
                caption=caption,
                meta=meta,
                name=str(path),
            )
        )
    source = {
        "converter": "csv",
        "path": str(csv_path.resolve()),
        "root": str(base.resolve()),
        "options": {"prefix": prefix, "delimiter": delimiter, **writer.options()},
    }
    result = writer.write(prefix, samples, classes=None, source=source, faults=faults)
    return writer.report("csv", [result], started)


def _read_csv(path: Path, delimiter: str) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("filepath", "caption") if c not in header]
            if missing:
                raise ValueError(
                    f"CSV file {path} lacks column(s) {', '.join(missing)} in its header (found: {header or 'none'}); "
                    "expected a header 'filepath,caption'"
                )
            reader.fieldnames = header
            return list(reader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"CSV file {path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise ValueError(f"CSV file {path} cannot be parsed: {exc}") from None
