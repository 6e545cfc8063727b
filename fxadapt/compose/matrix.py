"""The support matrix (method × block), read from the registry: which block each method's pass can expand."""

from __future__ import annotations

from ..registry import METHODS

COLUMNS = (
    ("Stack", "stack"),
    ("Sum", "sum"),
    ("Average", "average"),
    ("BatchSplit", "rows"),
    ("Parallel", "rows"),
    ("Split", "split"),
    ("Fuse", "fuse"),
)


def support_matrix() -> list[tuple[str, dict[str, bool]]]:
    """``[(method name, {block: supported})]`` for every registered method, in name order."""
    rows = []
    for name in sorted(METHODS):
        method = METHODS[name]
        if method.parts is not None:
            continue  # a union composes as its parts do
        supported = set(method.compose)
        rows.append((name, {block: kind in supported for block, kind in COLUMNS}))
    return rows


def render_markdown() -> str:
    """The matrix as a markdown table (docs/composition.md embeds it; a test keeps it current)."""
    head = "| method | " + " | ".join(b for b, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in support_matrix():
        cells = " | ".join("yes" if row[b] else "refused" for b, _ in COLUMNS)
        lines.append(f"| `{name}` | {cells} |")
    return "\n".join(lines)


def update_docs(path: str) -> bool:
    """Write the current matrix between the ``support-matrix`` markers of ``path``; True if it changed."""
    import re
    from pathlib import Path

    doc = Path(path)
    text = doc.read_text()
    new = re.sub(
        r"<!-- support-matrix -->.*?<!-- /support-matrix -->",
        lambda _: "<!-- support-matrix -->\n" + render_markdown() + "\n<!-- /support-matrix -->",
        text,
        flags=re.S,
    )
    if new != text:
        doc.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    import fxadapt  # noqa: F401  (registers every method)

    update_docs(sys.argv[1] if len(sys.argv) > 1 else "docs/composition.md")
