"""ClickHouse's own parser (chdb's ``formatQuery``) for statements the worker generates.

chdb cannot run ``CREATE USER / ROW POLICY / QUOTA / SETTINGS PROFILE`` (clickhouse-local has no
writable access storage, ../shared/reference/infra.md §4), but its parser is the real 26.9 one:
``formatQuery`` returns a valid statement normalised and raises ``Code: 62`` on a syntax error.

It runs in a child process on ``:memory:``: this test process may have a chdb directory open
(the engine is process-wide, one directory at a time) and forks flow processes (chdb must not be
loaded before a fork), so the parser never shares an engine with them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["format_queries"]

_CHILD = r"""
import json, sys
import chdb

out = []
for sql in json.load(sys.stdin):
    literal = "'" + sql.replace("\\", "\\\\").replace("'", "\\'") + "'"
    try:
        text = chdb.query(f"SELECT formatQuerySingleLine({literal})", "TSVRaw").bytes().decode()
        out.append({"ok": text.rstrip("\n")})
    except Exception as exc:
        out.append({"error": str(exc)})
json.dump(out, sys.stdout)
"""


def format_queries(statements: Sequence[str], timeout: float = 120.0) -> list[str]:
    """Each statement as ClickHouse's parser normalises it (on one line).

    Raises:
        AssertionError: the parser refused one (the message quotes the parser's error).
    """
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps(list(statements)),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    results = json.loads(done.stdout)
    refused = [(s, r["error"]) for s, r in zip(statements, results, strict=True) if "error" in r]
    assert not refused, f"ClickHouse's parser refused: {refused}"
    return [r["ok"] for r in results]
