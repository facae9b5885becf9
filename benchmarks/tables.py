"""Plain-text and Markdown tables for the benchmark scripts."""


def render_table(header: list, rows: list, markdown: bool) -> str:
    """`rows` are lists of strings, one per column of `header`."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*row) for row in rows])
