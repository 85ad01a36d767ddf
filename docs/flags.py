"""Writes the flag reference of docs/usage.md from the SearchConfig fields: `python docs/flags.py`.

The fields are where a setting is defined; this keeps the page from drifting from them
(tests/test_cli.py checks that the page holds what this script writes)."""

import re
import sys
from pathlib import Path

from iterkd.cli import SEARCH_GROUPS, flag_options
from iterkd.config import RESUMABLE_OVERRIDES, SETTINGS, default_note, flag

USAGE = Path(__file__).with_name("usage.md")
BEGIN = "<!-- flags: written by `python docs/flags.py` from the SearchConfig fields; edit those, not this -->"
END = "<!-- end of flags -->"


def cell(text: str) -> str:
    text = re.sub(r"docs/(\w+)\.md", r"[\1.md](\1.md)", text)  # the help's docs paths as links
    return text.replace("|", "\\|").replace("*", "\\*")


def table() -> str:
    lines = [BEGIN, ""]
    for group, title in SEARCH_GROUPS.items():
        lines += [f"**{cell(title)}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for name, f in SETTINGS.items():
            if f.metadata["group"] == group:
                metavar = flag_options(name).get("metavar")
                meaning = f.metadata["help"] + (
                    f"; one of {', '.join(f.metadata['choices'])}" if "choices" in f.metadata else ""
                )
                lines.append(
                    f"| `{cell(flag(name) + (' ' + metavar if metavar else ''))}` "
                    f"| {cell(default_note(name) or '—')} | {cell(meaning)} |"
                )
        lines.append("")
    resumable = ", ".join(f"`{flag(name)}`" for name in SETTINGS if name in RESUMABLE_OVERRIDES)
    lines += [
        f"A resumed run may change {resumable}; any other flag that differs from the run's is refused.",
        "",
        END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    text = USAGE.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    USAGE.write_text(text[:start] + table() + text[end:])
    print(f"wrote the flag reference of {USAGE}", file=sys.stderr)
