"""The HTML report of `python -m analysis.tables`: each table beside the paper's, its plots, one image grid per
subject and row (real photos first, then generated images), the protocol card and what is known to differ from
the paper. Everything it shows is copied or rendered into the output folder, so the folder can be moved."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from analysis.paper import LABELS

THUMB = 96  # px, grid tile
MAX_GENERATED = 16  # generated images per grid
MAX_REAL = 4


def _tile(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        return ImageOps.fit(im, (THUMB, THUMB))


def grid_for(run, out: Path) -> Path | None:
    """<out>/grids/<row>__<subject>-s<seed>.png from the run's eval/images (None if it has none)."""
    from dreambench.sampling import image_grid

    images = run.folder / "eval" / "images"
    gen = sorted(p for p in (images / run.subject).glob("*.png") if not p.name.startswith("class_"))
    if not gen:
        return None
    manifest = images / "prompts.json"
    real: list[Path] = []
    if manifest.is_file():
        info = json.loads(manifest.read_text()).get("subjects", {}).get(run.subject, {})
        folder = Path(info.get("real_folder", ""))
        if folder.is_dir():
            from dreambench.data.sidecars import is_sidecar  # a photo's mask or caption is not a photo

            names = {p.name for p in folder.iterdir()}
            real = sorted(
                p for p in folder.iterdir()
                if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and not is_sidecar(p, names)
            )
    real = real[:MAX_REAL]
    gen = gen[:MAX_GENERATED]
    tiles = [_tile(p) for p in real + gen]
    labels = [f"real {p.stem}" for p in real] + [p.stem for p in gen]
    path = out / "grids" / f"{run.row}__{run.subject}-s{run.seed}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(tiles, cols=max(len(real), 1) + 4, labels=labels).save(path)
    return path


def _table_html(table, rows) -> str:
    from analysis.tables import diff, fmt, ours

    paper = not table.baseline  # a table of effects has no paper numbers beside its own
    span = 3 if paper else 1
    head = "".join(f"<th colspan={span}>{html.escape(LABELS[m])}</th>" for m in table.metrics)
    sub = "".join(("<th>ours [95% CI]</th><th>paper</th><th>Δ</th>" if paper else "<th>ours [95% CI]</th>")
                  for _ in table.metrics)
    body = []
    for r in rows:
        cells = []
        for m in table.metrics:
            c, p = r.cells[m], r.paper.get(m)
            d = diff(c, p)
            cells.append(
                f"<td>{html.escape(ours(c))}</td>" + (f"<td>{fmt(p)}</td>"
                f"<td>{'n/a' if d is None else f'{d:+.3f}'}</td>" if paper else "")
            )
        n = max((c.n for c in r.cells.values()), default=0)
        body.append(f"<tr><th>{html.escape(r.label)}</th>{''.join(cells)}<td>{n}</td></tr>")
    return (
        f"<table><tr><th rowspan=2>row</th>{head}<th rowspan=2>{'runs' if table.unit == 'run' else 'subjects'}</th>"
        f"</tr><tr>{sub}</tr>"
        + "".join(body)
        + "</table>"
    )


def _directions_html(table: Any, rows: list) -> str:
    from analysis.tables import direction_cells, direction_head, directions

    labels = {r.key: r.label for r in rows}
    head = "".join(f"<th>{h}</th>" for h in direction_head(table))
    body = []
    for d in directions(table, rows):
        cells = direction_cells(table, d, labels)
        body.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
    what = "Effects (each switch − the baseline, paired by run)" if table.baseline else \
        "Directions (per-subject differences, paired)"
    return (f"<h3>{what}</h3><table><tr>" + head + "</tr>" + "".join(body)
            + "</table>")


def write_report(folder: Path, out: Path, tables: dict[str, tuple[Any, list]]) -> Path:
    from dreambench.utils.io import atomic_write_text

    parts = [
        "<!doctype html><meta charset=utf-8><title>dreambench: the DreamBooth paper's tables</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:8px;font-size:11px;overflow:auto}</style>",
        f"<h1>DreamBooth (Ruiz et al., CVPR 2023): our numbers beside the paper's</h1>"
        f"<p>Run folders: <code>{html.escape(str(folder))}</code>. Numbers: mean over subjects with a 95% "
        "bootstrap interval over subjects; the paper's from shared/docs/PROTOCOL.md.</p>",
    ]
    protocol = None
    for name, (table, rows) in tables.items():
        parts.append(f"<h2>{html.escape(table.title)}</h2>")
        from analysis.tables import settings_notes

        warnings, notes = settings_notes(rows)
        parts += [f"<p><b>{html.escape(w)}</b></p>" for w in warnings]
        parts.append(_table_html(table, rows))
        parts.append(_directions_html(table, rows))
        parts.append(
            f'<p><img src="{name}_bars.png" alt="bars"> <img src="{name}_scatter.png" alt="scatter"></p>'
        )
        parts.append(
            "<h3>Known differences from the paper</h3><ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in (*table.notes, *notes))
            + "</ul>"
        )
        parts.append("<h3>Images per subject and row</h3>")
        for r in rows:
            for run in sorted(r.runs, key=lambda x: (x.subject, x.seed)):
                protocol = protocol or run.protocol
                g = grid_for(run, out)
                label = f"{r.label} — {run.subject} (seed {run.seed})"
                if g is None:
                    parts.append(f"<p>{html.escape(label)}: no generated images (not evaluated)</p>")
                else:
                    parts.append(
                        f'<figure><img src="{g.relative_to(out).as_posix()}" alt="{html.escape(label)}">'
                        f"<figcaption>{html.escape(label)}</figcaption></figure>"
                    )
    parts.append("<h2>Protocol card (from the first evaluated run)</h2>")
    parts.append(
        f"<pre>{html.escape(json.dumps(protocol, indent=1)) if protocol else 'no evaluated run'}</pre>"
    )
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
