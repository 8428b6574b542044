"""Name the frames of a native stack printed by bench/abort_backtrace.c (`/path/lib.so(+0x1234)[0x7f...]` lines):
each offset against the nearest symbol below it, from the library's full symbol table when it has one (libtorch_cpu
does), else its dynamic one (libcupti: only exported names, so large offsets mean "somewhere inside").

    python3 bench/resolve_stack.py abort_trace.txt      (on the machine that printed it: the same library files)

Session 8 resolved the abort at exit this way (bench/RESULTS.md).
"""

from __future__ import annotations

import bisect
import re
import subprocess
import sys
from functools import cache

FRAME = re.compile(r"^(/\S+?\.so[.\d]*)\(\+(0x[0-9a-f]+)\)")


@cache
def symbols(path: str) -> tuple[str, list[int], list[str]]:
    """(table used, sorted addresses, names) of a library: the full table if it has any entries, else the dynamic."""
    for table, flags in (("full", ["--defined-only"]), ("dynamic", ["-D", "--defined-only"])):
        out = subprocess.run(["nm", *flags, path], capture_output=True, text=True).stdout
        rows = sorted((int(a, 16), n) for a, _, n in (line.split(" ", 2) for line in out.splitlines()
                                                      if line.count(" ") >= 2 and line[0] in "0123456789abcdef"))
        if rows:
            return table, [a for a, _ in rows], [n for _, n in rows]
    return "none", [], []


def name_of(path: str, offset: int) -> str:
    table, addresses, names = symbols(path)
    i = bisect.bisect_right(addresses, offset) - 1
    if i < 0:
        return f"? ({table} symbols)"
    demangled = subprocess.run(["c++filt"], input=names[i], capture_output=True, text=True).stdout.strip()
    return f"{demangled} +{offset - addresses[i]:#x} ({table} symbols)"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8", errors="replace") as f:
        for line in f:
            m = FRAME.match(line.strip())
            if m:
                path, offset = m.group(1), int(m.group(2), 16)
                print(f"{path.rsplit('/', 1)[-1]}+{offset:#x}: {name_of(path, offset)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
