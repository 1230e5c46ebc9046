"""Slurm host lists ('gpu[01-03,07],rack[1-2]-node[01-02]') expanded into host names.

`scontrol show hostnames` is the authority and is used wherever it runs. Containers started by
pyxis often have no Slurm client, so the same grammar is also written out here: comma-separated
hosts, each a name with any number of bracket groups of numbers and zero-padded ranges, expanded
as a product with the first group outermost (rack1-node01 rack1-node02 rack2-node01 ...), as
Slurm 22.05's scontrol does. Width comes from the range's lower bound: n[9-10] -> n9 n10,
n[001-3] -> n001 n002 n003.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess

SCONTROL_TIMEOUT_S = 20


class HostlistError(ValueError):
    pass


def _split_top_level(nodelist: str) -> list[str]:
    """The list's hosts at bracket depth 0 (commas inside brackets separate numbers)."""
    items, depth, current = [], 0, []
    for char in nodelist:
        if char == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"host list {nodelist!r}: nested '['")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"host list {nodelist!r}: ']' without '['")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise HostlistError(f"host list {nodelist!r}: '[' without ']'")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _numbers(group: str, nodelist: str) -> list[str]:
    out = []
    for entry in group.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", entry)
        if not match:
            raise HostlistError(f"host list {nodelist!r}: bad range {entry!r} in [{group}]")
        lo, hi = match.group(1), match.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise HostlistError(f"host list {nodelist!r}: range {entry!r} runs backwards")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def parse_hostlist(nodelist: str) -> list[str]:
    """The pure-Python expansion (no Slurm needed); HostlistError on a malformed list."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        # Alternating literal text and bracket contents: "rack", "1-2", "-node", "01-02", "".
        parts = re.split(r"\[([^\]]*)\]", item)
        choices = [[text] if i % 2 == 0 else _numbers(text, nodelist) for i, text in enumerate(parts)]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm host list, in Slurm's order: `scontrol show hostnames` where
    scontrol runs, else `parse_hostlist`."""
    if not nodelist.strip():
        return []
    if "[" not in nodelist:
        return _split_top_level(nodelist)  # nothing to expand: no process to start
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            proc = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                  timeout=SCONTROL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc = None
        if proc is not None and proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()
    # No Slurm client here (a container), or no slurm.conf it can read.
    return parse_hostlist(nodelist)
