"""The `sql` tool: read-only queries over a SQLite database, and the bundled demo shop.

Where it sits: a built-in tool of the agent (agent/tools.py), given with `--db FILE` (or
`--db demo`). Four independent locks keep it read-only and bounded:
1. the file is opened with `mode=ro` (SQLite refuses every write at the VFS level);
2. an authorizer allows only reading (SELECT, table reads, recursive CTEs, an allow-list of plain
   read-only functions) and denies ATTACH/DETACH, PRAGMA, writes, schema changes, transactions and
   every other function (`fts3_tokenizer` hands out and accepts raw pointers, `load_extension`
   loads code);
3. exactly one statement per call;
4. a progress handler aborts any query that runs past `time_limit` seconds, SQLite's own limits
   cap the size of any value, the SQL text and expression depth, at most `max_rows` rows come back
   and the whole reply is cut at `max_chars` (the result says when either cut happened).
`schema_text()` is what the model sees: one line per table with its columns.
"""
from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path

from ownllm.errors import OwnLLMError


class SQLToolError(ValueError):
    pass


_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
# Plainly read-only scalar, aggregate and window functions. Left out on purpose: fts3_tokenizer,
# load_extension, sqlite_log, rtree*/fts5* internals and FTS auxiliaries (pointer-taking),
# randomblob/zeroblob and printf/format (a width of 2^31 runs for seconds inside one call, where
# the time limit cannot stop it), the compile-option probes.
SAFE_FUNCTIONS = frozenset("""
abs acos acosh asin asinh atan atan2 atanh avg ceil ceiling char coalesce cos cosh count cume_dist
current_date current_time current_timestamp date datetime degrees dense_rank exp first_value floor
glob group_concat hex ifnull iif instr json json_array json_array_length json_extract
json_group_array json_group_object json_insert json_object json_patch json_quote json_remove
json_replace json_set json_type json_valid julianday lag last_value lead length like likelihood
likely ln log log10 log2 lower ltrim max min mod nth_value ntile nullif percent_rank pi pow power
quote radians random rank replace round row_number rtrim sign sin sinh soundex sqrt strftime
string_agg substr substring sum tan tanh time total trim trunc typeof unicode unixepoch unlikely
upper -> ->>
""".split())
# SQLite's run-time limits: a value of at most 1 MB, a statement of at most 100 kB, bounded depth.
LIMITS = {"SQLITE_LIMIT_LENGTH": 1_000_000, "SQLITE_LIMIT_SQL_LENGTH": 100_000,
          "SQLITE_LIMIT_EXPR_DEPTH": 200, "SQLITE_LIMIT_COMPOUND_SELECT": 50,
          "SQLITE_LIMIT_FUNCTION_ARG": 32, "SQLITE_LIMIT_ATTACHED": 0, "SQLITE_LIMIT_LIKE_PATTERN_LENGTH": 1000}
MAX_CELL_CHARS = 500


def _authorizer(action, arg1, arg2, db_name, source):
    if action in _ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in SAFE_FUNCTIONS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ReadOnlyDB:
    def __init__(self, path: str | Path, max_rows: int = 50, time_limit: float = 2.0, max_chars: int = 8000):
        self.path = Path(path)
        if not self.path.is_file():
            raise OwnLLMError(f"--db {self.path}: no such database file")
        try:
            # as_uri() percent-encodes '#', '?' and '%', so the path names this file and no other
            self.db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
            self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            raise OwnLLMError(f"--db {self.path}: not a SQLite database ({e})") from None
        self._schema = self._read_schema()
        for name, value in LIMITS.items():
            if hasattr(sqlite3, name):
                self.db.setlimit(getattr(sqlite3, name), value)
        self.db.set_authorizer(_authorizer)
        self.max_rows, self.time_limit, self.max_chars = max_rows, time_limit, max_chars
        self.lock = threading.Lock()  # one connection, used from the server's threads one at a time

    def _read_schema(self) -> dict[str, list[str]]:
        tables = [r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {t: [r[1] for r in self.db.execute(f"PRAGMA table_info({quote_identifier(t)})")] for t in tables}

    def schema_text(self) -> str:
        return "\n".join(f"{t}({', '.join(cols)})" for t, cols in self._schema.items())

    def query(self, sql: str) -> str:
        """Rows as a small text table: a header line, then one line per row, ' | ' between columns."""
        if not isinstance(sql, str) or not sql.strip():
            raise SQLToolError("query must be a non-empty string")
        with self.lock:
            return self._query(sql)

    def _query(self, sql: str) -> str:
        deadline = time.monotonic() + self.time_limit
        self.db.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
        try:
            cur = self.db.execute(sql)
            rows = cur.fetchmany(self.max_rows + 1)
        except sqlite3.ProgrammingError as e:  # more than one statement
            raise SQLToolError(f"one statement per call ({e})") from None
        except sqlite3.DatabaseError as e:
            msg = str(e)
            if "interrupted" in msg:
                raise SQLToolError(f"query stopped after {self.time_limit:g}s (time limit)") from None
            if "use function" in msg:
                raise SQLToolError(f"{msg.split(':')[-1].strip()}() is not allowed (only plain read-only functions)") from None
            if "authoriz" in msg or "prohibited" in msg:
                raise SQLToolError("only read-only SELECT queries are allowed") from None
            if "too big" in msg or "too large" in msg:
                raise SQLToolError(f"a value or the query is over the size limit ({msg})") from None
            raise SQLToolError(msg) from None
        except (MemoryError, OverflowError, RecursionError) as e:
            raise SQLToolError(f"query too large ({type(e).__name__})") from None
        finally:
            self.db.set_progress_handler(None, 0)
        names = [d[0] for d in cur.description or []]
        more = len(rows) > self.max_rows
        lines = [" | ".join(names)] + [" | ".join(_cell(v) for v in r) for r in rows[: self.max_rows]]
        if more:
            lines.append(f"(more than {self.max_rows} rows; showing {self.max_rows})")
        text = "\n".join(lines) if rows else " | ".join(names) + "\n(no rows)"
        if len(text) > self.max_chars:
            text = text[: self.max_chars] + f"\n(reply cut at {self.max_chars} characters)"
        return text

    def close(self) -> None:
        self.db.close()


def _cell(v) -> str:
    if v is None:
        return "NULL"
    text = v.hex() if isinstance(v, bytes) else str(v)
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + f"…({len(text)} chars)"


# -- the demo shop ---------------------------------------------------------------------------------
FIRST = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lia", "Moe", "Nia",
         "Oto", "Pia", "Quin", "Rae", "Sol", "Tia"]
LAST = ["Reed", "Shaw", "Vance", "Wolfe", "Yates", "Zeller", "Abbot", "Brandt", "Crane", "Doyle"]
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Seoul"]
PRODUCTS = [("pen", 3), ("notebook", 7), ("lamp", 25), ("mug", 9), ("kettle", 40), ("chair", 85), ("rug", 60),
            ("clock", 33), ("vase", 18), ("towel", 12), ("candle", 6), ("mirror", 55)]


def build_demo_shop(path: str | Path, seed: int = 7) -> Path:
    """A small shop: customers(id, name, city), products(id, name, price), orders(id, customer_id,
    product_id, quantity, day). Deterministic for a seed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    r = random.Random(seed)
    db = sqlite3.connect(tmp)
    db.executescript("""
        CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL);
        CREATE TABLE products(id INTEGER PRIMARY KEY, name TEXT NOT NULL, price INTEGER NOT NULL);
        CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                            product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL,
                            day TEXT NOT NULL);
    """)
    names = r.sample([f"{f} {l}" for f in FIRST for l in LAST], 60)
    db.executemany("INSERT INTO customers(id, name, city) VALUES(?,?,?)",
                   [(i + 1, n, r.choice(CITIES)) for i, n in enumerate(names)])
    db.executemany("INSERT INTO products(id, name, price) VALUES(?,?,?)",
                   [(i + 1, n, p) for i, (n, p) in enumerate(PRODUCTS)])
    orders = []
    for i in range(400):
        orders.append((i + 1, r.randint(1, len(names)), r.randint(1, len(PRODUCTS)), r.randint(1, 5),
                       f"2026-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"))
    db.executemany("INSERT INTO orders VALUES(?,?,?,?,?)", orders)
    db.commit()
    db.close()
    tmp.replace(path)
    return path


def demo_shop_path() -> Path:
    from ownllm.files import home

    p = home() / "demo-shop.sqlite"
    return p if p.is_file() else build_demo_shop(p)


def resolve_db(db: str) -> Path:
    return demo_shop_path() if db == "demo" else Path(db)
