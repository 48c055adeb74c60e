"""The library's one table printer: plain-text tables for the terminal and Markdown
tables for reports.

Every table the library prints or writes (the MACs reports of `gblr.cost`, the
conversion and plan reports, a run's cost per layer, ``gblr sweep`` and ``gblr demo``)
is made here from a header and rows of cells that the caller has already formatted.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["markdown_table", "text_table"]

_ALIGNMENTS = ("<", ">")


def _check_shape(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None) -> str:
    """``align`` for every column (default all left), after checking the table's shape."""
    if isinstance(header, str) or not isinstance(header, Sequence):
        raise TypeError(f"header must be a sequence of column names, got {header!r}")
    columns = len(header)
    for index, row in enumerate(rows):
        if len(row) != columns:
            raise ValueError(
                f"rows[{index}] has {len(row)} cells, the header {columns}: {list(row)!r}"
            )
    align = "<" * columns if align is None else align
    if len(align) != columns or any(a not in _ALIGNMENTS for a in align):
        raise ValueError(
            f"align must be one of {_ALIGNMENTS} per column ({columns} columns), got {align!r}"
        )
    return align


def text_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    align: str | None = None,
    widths: Sequence[int] | None = None,
    sep: str = "  ",
    rules: Sequence[int] = (),
    notes: Sequence[str] = (),
) -> str:
    """A plain-text table: each column as wide as its widest cell (or ``widths``, the
    least widths), cells joined by ``sep``, trailing spaces stripped.

    Args:
        header: the column names.
        rows: the cells of each row, as text.
        align: ``<`` (left) or ``>`` (right) per column; default all left.
        widths: the least width of each column.
        sep: between cells.
        rules: a rule of dashes goes before each of these rows (0: under the header).
        notes: lines after the table.

    Raises:
        ValueError: a row or ``align`` of another length than the header, an alignment
            other than ``<`` and ``>``.

    Examples:
        >>> from gblr.tables import text_table
        >>> print(text_table(["layer", "MACs"], [["fc1", "1,024"], ["total", "1,024"]],
        ...                  align="<>", rules=[0, 1], notes=["(per row)"]))
        layer   MACs
        -----  -----
        fc1    1,024
        -----  -----
        total  1,024
        (per row)
    """
    align = _check_shape(header, rows, align)
    table = [list(header), *(list(row) for row in rows)]
    sizes = [max(len(line[i]) for line in table) for i in range(len(header))]
    if widths is not None:
        sizes = [max(size, least) for size, least in zip(sizes, widths, strict=True)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(size) if a == "<" else cell.rjust(size)
            for cell, size, a in zip(cells, sizes, align)
        ]
        return sep.join(padded).rstrip()

    rule = sep.join("-" * size for size in sizes)
    lines = [line(table[0])]
    for index, row in enumerate(table[1:]):
        if index in rules:
            lines.append(rule)
        lines.append(line(row))
    return "\n".join([*lines, *notes])


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, align: str | None = None
) -> str:
    """A Markdown (GitHub) table; ``align``: ``<`` or ``>`` per column (default left).

    Raises:
        ValueError: as [`text_table`][gblr.tables.text_table].

    Examples:
        >>> from gblr.tables import markdown_table
        >>> print(markdown_table(["structure", "accuracy"], [["gblr", "0.9500"]], align="<>"))
        | structure | accuracy |
        | --- | ---: |
        | gblr | 0.9500 |
    """
    align = _check_shape(header, rows, align)
    lines = [list(header), ["---" if a == "<" else "---:" for a in align], *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
