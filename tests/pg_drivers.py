"""Which PostgreSQL driver the fleet's queue uses, measured (issue 17):
psycopg 3 against asyncpg on the operations a PostgreSQL task queue makes,
on a throwaway PostgreSQL (tests/postgres.py): a lone committed insert, a
batch of 500 inserts in one transaction, a claim of up to 10 tasks with
FOR UPDATE SKIP LOCKED, and a NOTIFY heard by a LISTENing connection.
Rounds alternate between the drivers; each figure is the median over
rounds of wall time and of this process's CPU time per operation. Neither
driver is a dependency yet, so install both first:

    .venv/bin/pip install "psycopg[binary]==3.3.9" asyncpg==0.32.0
    .venv/bin/python -m tests.pg_drivers [ROUNDS]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import asyncpg
import psutil
import psycopg

from tests.postgres import Postgres, installed

SCHEMA = """
DROP TABLE IF EXISTS tasks;
CREATE TABLE tasks (id bigserial PRIMARY KEY, text text NOT NULL,
  state text NOT NULL DEFAULT 'queued', holder text);
CREATE INDEX ON tasks (id) WHERE state = 'queued';
"""
INSERT = "INSERT INTO tasks (text) VALUES ($1) RETURNING id"
CLAIM = """UPDATE tasks SET state = 'held', holder = $1 WHERE id IN (
  SELECT id FROM tasks WHERE state = 'queued' ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED)
  RETURNING id, text"""
PROC = psutil.Process()


def cpu() -> float:
    times = PROC.cpu_times()
    return times.user + times.system


Figures = dict[str, tuple[float, float]]  # operation -> (wall µs, CPU µs) per operation


async def timed(ops: int, work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(wall µs per op, CPU µs per op) of `ops` calls of work()."""
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(ops):
        await work()
    return (time.perf_counter() - t0) / ops * 1e6, (cpu() - c0) / ops * 1e6


async def asyncpg_round(url: str) -> Figures:
    conn = await asyncpg.connect(url)
    listener = await asyncpg.connect(url)
    await conn.execute(SCHEMA)
    out: Figures = {}
    out["lone insert"] = await timed(500, lambda: conn.fetchval(INSERT, "task"))

    async def batch() -> None:
        async with conn.transaction():
            await conn.executemany("INSERT INTO tasks (text) VALUES ($1)", [("t",)] * 500)

    wall, c = await timed(20, batch)
    out["batch of 500, per task"] = (wall / 500, c / 500)

    async def claim() -> None:
        await conn.fetch(CLAIM.replace("$1", "$1::text"), "c1")

    out["claim 10"] = await timed(500, claim)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("wake", lambda *args: heard.put_nowait(str(args[3])))

    async def notify() -> None:
        await conn.execute("NOTIFY wake, 'x'")
        await asyncio.wait_for(heard.get(), 5)

    out["notify heard"] = await timed(500, notify)
    await conn.close()
    await listener.close()
    return out


async def psycopg_round(url: str) -> Figures:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    listener = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute(SCHEMA)
    insert, claim_sql = INSERT.replace("$1", "%s"), CLAIM.replace("$1", "%s")
    out: Figures = {}

    async def lone() -> None:
        await (await conn.execute(insert, ("task",))).fetchone()

    out["lone insert"] = await timed(500, lone)

    async def batch() -> None:
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany("INSERT INTO tasks (text) VALUES (%s)", [("t",)] * 500)

    wall, c = await timed(20, batch)
    out["batch of 500, per task"] = (wall / 500, c / 500)

    async def claim() -> None:
        await (await conn.execute(claim_sql, ("c1",))).fetchall()

    out["claim 10"] = await timed(500, claim)
    await listener.execute("LISTEN wake")
    notifies = listener.notifies()

    async def notify() -> None:
        await conn.execute("NOTIFY wake, 'x'")
        await asyncio.wait_for(anext(notifies), 5)

    out["notify heard"] = await timed(500, notify)
    await conn.close()
    await listener.close()
    return out


async def compare(url: str, rounds: int) -> None:
    results: dict[str, dict[str, list[tuple[float, float]]]] = {"asyncpg": {}, "psycopg": {}}
    runs: tuple[tuple[str, Callable[[str], Awaitable[Figures]]], ...] = (
        ("asyncpg", asyncpg_round),
        ("psycopg", psycopg_round),
    )
    for _ in range(rounds):  # alternately, so that the machine's swings hit both
        for name, run in runs:
            for op, figure in (await run(url)).items():
                results[name].setdefault(op, []).append(figure)
    print(f"asyncpg {asyncpg.__version__}, psycopg {psycopg.__version__}; medians of {rounds}")
    print(f"{'operation':28} {'asyncpg wall/CPU µs':>22} {'psycopg wall/CPU µs':>22}")
    for op in results["asyncpg"]:
        cells = []
        for name in ("asyncpg", "psycopg"):
            walls = [w for w, _ in results[name][op]]
            cpus = [c for _, c in results[name][op]]
            cells.append(f"{statistics.median(walls):9.0f} / {statistics.median(cpus):6.0f}")
        print(f"{op:28} {cells[0]:>22} {cells[1]:>22}")


def main() -> None:
    database = Postgres(installed())
    try:
        asyncio.run(compare(database.url, int(sys.argv[1]) if len(sys.argv) > 1 else 5))
    finally:
        database.stop()


if __name__ == "__main__":
    main()
