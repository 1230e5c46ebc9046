"""The scripts in tools/ as entries into the `selfreward` command line.

tools/import_gguf.py, convert_hf_to_megatron.py, convert_megatron_to_hf.py and
build_oasst_seed.py define no option of their own: each moves its spelling of the source and
output (`--hf DIR --out DIR`) into the positional SRC and OUT of `selfreward convert DIRECTION`
(or `selfreward seed oasst`), passes every other argument through, and runs
`megatron_selfreward.cli.main`, where each option is defined and handled once.

What stays the tools' own is the error contract scripts have relied on: a known error is one
stderr line starting `error: ` and exit status 1, where the CLI says `selfreward: error: ` and
exits 2 or 3. Usage errors exit 2 from argparse, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Sequence

CLI_ERROR = "selfreward: error: "  # megatron_selfreward.cli._report
TOOL_ERROR = "error: "
TOOL_FAILED = 1


class _ToolErrorLine:
    """stderr, with the CLI's known-error line in the tools' spelling; everything else as is."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith(CLI_ERROR):  # print() writes its argument before the newline
            text = TOOL_ERROR + text[len(CLI_ERROR):]
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def cli_argv(argv: Sequence[str], command: Sequence[str], prog: str, src_option: str | None = None,
             out_option: str | None = None) -> list[str]:
    """The `selfreward` command line of a tool's arguments: `command`, then the values of
    `src_option` and `out_option` as its positional SRC and OUT, then the rest unchanged."""
    argv = list(argv)
    if src_option is None or out_option is None:
        return [*command, *argv]
    if "-h" in argv or "--help" in argv:
        print(f"{prog}: {src_option} and {out_option} give SRC and OUT of `selfreward "
              f"{' '.join(command)}`; every other option is its own:\n")
        return [*command, "--help"]
    legacy = argparse.ArgumentParser(
        prog=prog, add_help=False, allow_abbrev=False,
        usage=f"{prog} {src_option} SRC {out_option} OUT [options of `selfreward {' '.join(command)}`]")
    legacy.add_argument(src_option, dest="src", required=True)
    legacy.add_argument(out_option, dest="out", required=True)
    named, rest = legacy.parse_known_args(argv)
    return [*command, named.src, named.out, *rest]


def run_tool(argv: Sequence[str] | None, command: Sequence[str], prog: str,
             src_option: str | None = None, out_option: str | None = None) -> int:
    """Run a tool's arguments as `selfreward COMMAND ...`: 0, or 1 after a one-line `error: `."""
    from megatron_selfreward.cli import main

    args = cli_argv(sys.argv[1:] if argv is None else argv, command, prog, src_option, out_option)
    with contextlib.redirect_stderr(_ToolErrorLine(sys.stderr)):
        status = main(args)
    return 0 if status == 0 else TOOL_FAILED
