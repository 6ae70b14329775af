"""Concurrency: readers never see a half-written stage; a second `dvc repro` is refused by DVC's lock.

- A writer subprocess replaces a stage file in a loop (through `write_stage`, as every stage does)
  with tables whose rows carry their version and a checksum, while this process reads them through
  `fret sql`'s own path (`sqlshell.run_query`) in a loop. Every read must see one complete version:
  a single version per table, the row count and checksum of that version, and the two tables of
  the file agreeing with each other.
- In a scratch git + DVC repository whose only stage waits for the test's signal, a second
  `dvc repro` started while the first runs must fail on DVC's lock and change nothing; the first
  completes normally once released.
Both are ordered by handshakes (files), never by how fast the machine is: each waits for the other
side's signal, with a bound only against a hang.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, file_digests

from pipeline.warehouse import sqlshell

VERSIONS = 25

WRITER = """
import sys
import pyarrow as pa
from pipeline import warehouse as wh

root = sys.argv[1]

def rows(v):  # version v: 20000 + 997 * v rows
    return 20000 + 997 * v

import pathlib, time
acks = pathlib.Path(sys.argv[4]) if len(sys.argv) > 4 else None

for v in range(int(sys.argv[2]), int(sys.argv[3])):
    n = rows(v)
    with wh.write_stage("versioned", warehouse=root) as con:
        con.execute(f"CREATE TABLE items AS SELECT {v} AS version, i, hash(i, {v}) AS check_value FROM range({n}) t(i)")
        con.execute(f"CREATE TABLE manifest AS SELECT {v} AS version, {n} AS n_rows, "
                    f"(SELECT sum(check_value % 1000003) FROM items) AS checksum")
        if v == int(sys.argv[2]):
            print("writing", flush=True)
    # Replace version v only once the reader has seen it: on a loaded machine a free-running writer
    # could finish every version between two reads, and the test would check nothing.
    deadline = time.monotonic() + 120
    while acks is not None and not (acks / str(v)).exists():
        if time.monotonic() > deadline:
            sys.exit(f"the reader never saw version {v}")
        time.sleep(0.005)
"""

READ = """
SELECT m.version AS manifest_version, m.n_rows, m.checksum,
       (SELECT count(DISTINCT version) FROM items) AS versions,
       (SELECT min(version) FROM items) AS item_version,
       (SELECT count(*) FROM items) AS item_rows,
       (SELECT sum(check_value % 1000003) FROM items) AS item_checksum,
       (SELECT count(*) FROM items WHERE check_value != hash(i, version)) AS bad_rows
FROM manifest m
"""


def test_fret_sql_sees_the_old_or_the_new_table_never_a_partial_one(tmp_path):
    root = tmp_path / "warehouse"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", WRITER, str(root), "0", "1"], check=True, env=env, cwd=tmp_path)
    acks = tmp_path / "acks"
    acks.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), "1", str(VERSIONS), str(acks)], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    seen, reads, deadline = set(), 0, time.monotonic() + 240
    try:
        assert writer.stdout.readline().strip() == b"writing"
        while writer.poll() is None and time.monotonic() < deadline and reads < 2000:
            result = sqlshell.run_query(READ, root)
            (row,) = result.rows
            version, n_rows, checksum, versions, item_version, item_rows, item_checksum, bad = row
            assert versions == 1 and item_version == version, row  # one version, the manifest's own
            assert n_rows == item_rows == 20000 + 997 * version, row  # every row of it, no more
            assert checksum == item_checksum and bad == 0, row  # and the right rows
            seen.add(version)
            (acks / str(version)).touch()  # the writer may now replace this version
            reads += 1
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait(timeout=30)
    assert writer.returncode == 0, writer.stderr.read().decode()[-2000:]
    assert reads >= 10 and len(seen) >= 3, (reads, seen)  # the reads really overlapped the rewrites
    (row,) = sqlshell.run_query(READ, root).rows
    assert row[0] == VERSIONS - 1
    assert sorted(p.name for p in root.iterdir()) == ["versioned.duckdb"]


DVC_YAML = """\
stages:
  slow:
    cmd: {python} hold.py
    deps:
      - hold.py
    outs:
      - out.txt
"""


# The stage: says it started, then holds until the test writes `release` (bounded against a hang).
HOLD = """\
import pathlib, time
pathlib.Path("started").write_text("1")
deadline = time.monotonic() + 240
while not pathlib.Path("release").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
pathlib.Path("out.txt").write_text("done")
"""


def state(repo: Path) -> dict[str, str]:
    """The repository's files but DVC's own lock files (.dvc/tmp), which record who holds the lock."""
    files = {f"repo/{k}": v for k, v in file_digests(repo).items() if not k.startswith((".dvc/tmp/", ".git/"))}
    return files


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git for a DVC repository")
def test_a_second_dvc_repro_is_refused_by_the_lock(tmp_path):
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=60)
    (repo / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable))
    (repo / "hold.py").write_text(HOLD)
    first = subprocess.Popen([dvc, "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (repo / "started").exists():
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline, "the first dvc repro never started its stage"
            time.sleep(0.05)
        before = state(repo)
        # The stage holds until `release` exists, so the first run is still inside it whatever the
        # second one's start-up costs on a loaded machine.
        second = subprocess.run([dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=240)
        still_running = first.poll() is None
        lock_file = (repo / "dvc.lock").exists()
        after = state(repo)
        (repo / "release").write_text("go")
        out, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode != 0 and "lock" in (second.stdout + second.stderr).lower(), second.stdout + second.stderr
    assert still_running, "the second dvc repro waited for the first instead of being refused"
    assert after == before and not lock_file  # the refused run wrote nothing
    assert first.returncode == 0, out.decode()
    assert (repo / "out.txt").read_text() == "done"
    status = subprocess.run([dvc, "status"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
