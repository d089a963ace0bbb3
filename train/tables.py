"""Tables as Markdown (for the terminal, README and MLflow) and HTML (pandas), from the same cells."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned (pandas' to_markdown needs tabulate)."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    known = [[r[i] for r in cells if r[i] != "—"] for i in range(len(headers))]  # "—": no value, any column
    numeric = [bool(col) and all(_is_number(c) for c in col) for col in known]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    import pandas as pd  # ~0.15 s: loaded by the commands that write HTML, not by every CLI start

    return pd.DataFrame([list(map(str, r)) for r in rows], columns=list(headers)).to_html(index=False, border=0, classes="reslab")


def html_page(title: str, body: str) -> str:
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table.reslab{border-collapse:collapse;"
             "margin:1em 0}table.reslab td,table.reslab th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "table.reslab th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return False
