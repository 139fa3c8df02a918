"""The score table on disk: Parquet written a row group per chunk, in input order, plus a JSON
sidecar (its columns, statistics and sidecar are defined in prefrank.table).

Rows are written as parts (one per chunk of input rows) that a killed run keeps and --resume
reuses once their checksums verify; the final table is assembled from verified parts under a
temporary name and renamed when complete, so a crashed run never leaves a partial table under the
final name. One run at a time writes an output (OutputLock), and an output may not be, or sit
inside, one of the run's inputs (check_output).
"""
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefrank.errors import InputError, WriteError
from prefrank.table import RunStats, Sidecar, TableLayout, sidecar_path


def _temporary(path: Path, suffix: str = ".tmp") -> Path:
    """A name beside `path` that no other process uses (pid and random)."""
    return path.with_name(f".{path.name}{suffix}-{os.getpid()}-{secrets.token_hex(4)}")


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def _write_atomic(path: Path, data: bytes):
    """`path` holds `data` entirely or not at all (written under a temporary name, then renamed)."""
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {e.strerror or e}; free space (or fix the folder) and rerun "
                         f"with <resume>: what is written so far is kept") from None


class Parts:
    """A score table under construction: OUT.parts/ holds one Parquet part per chunk of input rows
    (part-000012.parquet: rows 12·chunk_rows ...), each written under a temporary name and renamed,
    then its record (part-000012.json: the sha256 of the part's bytes, its row ids' hash and its
    statistics), so a part counts only once its bytes verify against its record; a manifest
    of the run, so that --resume continues only the same run; the sidecar's static part; and one
    done-RANK.json per process that read the whole input. merge() verifies each part before reading
    it, writes OUT in input order, then the sidecar, then removes the folder."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")

    def part(self, chunk: int) -> Path:
        return self.dir / f"part-{chunk:06d}.parquet"

    def record(self, chunk: int) -> Path:
        return self.part(chunk).with_suffix(".json")

    def _write_json(self, name: str, obj):
        _write_atomic(self.dir / name, _json_bytes(obj))

    def read_json(self, name: str):
        return json.loads((self.dir / name).read_text())

    def prepare(self, manifest: dict, sidecar: Sidecar, resume: bool) -> bool:
        """Start a run, or check that the parts on disk come from this same run (--resume).
        Returns whether the folder is new."""
        if self.dir.exists():
            if not resume:
                raise InputError(f"{self.dir} holds parts of an earlier run: pass <resume> to continue it, "
                                 f"or remove the folder")
            try:
                old = self.read_json("manifest.json")
            except (OSError, ValueError):
                raise InputError(f"{self.dir} has no readable manifest.json: not prefrank's parts") from None
            manifest = json.loads(_json_bytes(manifest))  # as it was stored: tuples become lists
            differs = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            if differs:
                raise InputError(f"<resume>: the parts in {self.dir} come from a run with other "
                                 f"{', '.join(differs)}; remove the folder or choose another <out>")
            for stale in self.dir.glob("done-*.json"):
                stale.unlink()
            # temporaries of runs that died (this run holds the output's lock: no other is writing)
            partials = self.out.parent.glob(glob.escape(f".{self.out.name}") + ".partial-*")
            for stale in [*self.dir.glob(".*.tmp-*"), *partials]:
                stale.unlink(missing_ok=True)
            created = False
        else:
            self.dir.mkdir()
            try:
                self._write_json("manifest.json", manifest)
            except WriteError:
                self.discard()
                raise
            created = True
        self._write_json("sidecar.json", sidecar.to_json())
        return created

    def sidecar(self) -> Sidecar:
        """The run's sidecar as its first process recorded it (InputError if the folder has none)."""
        try:
            return Sidecar.from_json(self.read_json("sidecar.json"))
        except (OSError, ValueError, TypeError):
            raise InputError(f"{self.dir} has no readable sidecar.json: not the parts of a prefrank run that "
                             f"started scoring") from None

    def discard(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def _verified(self, chunk: int) -> tuple[bytes, dict] | None:
        """The bytes and record of `chunk`'s part if its bytes hash to its record, else None (absent,
        truncated, damaged, or written by a run killed before the record)."""
        try:
            record = json.loads(self.record(chunk).read_text())
            data = self.part(chunk).read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("sha256") != hashlib.sha256(data).hexdigest():
            return None
        return data, record

    def is_complete(self, chunk: int, ids: list[str]) -> bool:
        """Does a verified part for `chunk` hold exactly these rows?"""
        verified = self._verified(chunk)
        return verified is not None and verified[1].get("ids") == _ids_digest(ids)

    def write(self, chunk: int, columns: dict[str, list], layout: TableLayout, stats: RunStats):
        schema = layout.schema()
        table = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        data = buffer.getvalue().to_pybytes()
        _write_atomic(self.part(chunk), data)
        # the record comes after the part: a part without one is redone
        self._write_json(self.record(chunk).name, {"sha256": hashlib.sha256(data).hexdigest(),
                                                   "ids": _ids_digest(columns["id"]), "stats": asdict(stats)})

    def mark_done(self, rank: int, n_chunks: int):
        self._write_json(f"done-{rank}.json", {"chunks": n_chunks})

    def merge(self) -> tuple[RunStats, Sidecar]:
        """Write the final table from the parts, in input order, each verified against its record
        before it is read, and its sidecar with the run's totals (the sum of the parts' statistics);
        returns the totals and the sidecar."""
        sidecar = self.sidecar()
        schema = sidecar.table.schema()
        done = [json.loads(p.read_text())["chunks"] for p in self.dir.glob("done-*.json")]
        if not done:
            raise InputError(f"{self.dir}: no process finished reading the input; rerun with <resume>")
        n_chunks = done[0]
        missing = [c for c in range(n_chunks) if not (self.part(c).exists() and self.record(c).exists())]
        if missing:
            raise InputError(f"{self.dir}: parts {missing[:10]} are missing; rerun with <resume>")
        totals = RunStats()
        tmp = _temporary(self.out, ".partial")
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                for c in range(n_chunks):
                    verified = self._verified(c)
                    if verified is None:
                        raise InputError(f"{self.part(c)} does not match the checksum recorded when it was written "
                                         f"(damaged or truncated): rerun with <resume>, which redoes it")
                    data, record = verified
                    totals.add(RunStats.from_json(record["stats"]))
                    writer.write_table(pq.read_table(pa.BufferReader(data)).cast(schema))
            os.replace(tmp, self.out)
        except OSError as e:
            raise WriteError(f"cannot write {self.out}: {e.strerror or e}; free space and rerun with <resume> "
                             f"(or `prefrank merge {self.out}`): the parts are kept") from None
        finally:
            tmp.unlink(missing_ok=True)
        sidecar = replace(sidecar, summary=totals)
        write_sidecar(self.out, sidecar)
        shutil.rmtree(self.dir)
        return totals, sidecar


class OutputLock:
    """OUT.lock: one run at a time writes an output. Created exclusively (O_CREAT | O_EXCL) holding the
    owner's pid, host and start time, removed when the run ends however it ends; a lock whose pid
    no longer runs on this host is stale and taken over (a run killed with -9 leaves one); any other
    makes the run stop with one line naming its owner."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + ".lock")
        self.text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nonce": secrets.token_hex(8)})
        self.held = False

    def acquire(self):
        for _ in range(5):  # a few rounds: runs starting at once may take over the same stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise InputError(f"{self.out}: cannot create {self.path}: {e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                f.write(self.text)
            self.held = True
            return
        raise InputError(f"{self.out}: other runs keep taking {self.path}; start one run at a time")

    def _take_over_if_stale(self):
        try:
            text = self.path.read_text()
            owner = json.loads(text)
            pid, host, started = int(owner["pid"]), str(owner["host"]), owner.get("started", "?")
        except FileNotFoundError:  # its run just ended
            return
        except (OSError, ValueError, KeyError, TypeError):  # being written by a run starting now, or not ours
            raise InputError(f"{self.out}: {self.path} exists but names no owner; remove it if no run is "
                             f"writing {self.out}") from None
        if host != socket.gethostname() or (pid != os.getpid() and _running(pid)):
            raise InputError(f"{self.out} is locked by another run (pid {pid} on {host}, started {started}): "
                             f"wait for it to finish, or remove {self.path} if that run is gone")
        print(f"prefrank: taking over the stale lock {self.path} of pid {pid} (no longer running)", file=sys.stderr)
        # Rename, then check: of several runs taking over the same lock, one moves it aside; a fresh
        # lock moved by mistake (another run took over first) goes back.
        aside = _temporary(self.path)
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() == text:
            aside.unlink()
        else:
            os.rename(aside, self.path)

    def release(self):
        if self.held:
            try:
                if self.path.read_text() == self.text:
                    self.path.unlink()
            except OSError:
                pass
            self.held = False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_output(out: str, inputs: dict[str, str | None]):
    """Refuse, before anything is loaded or written, an output that cannot be written, or that is,
    or is inside, or contains one of the run's local inputs (`inputs`: option → path or hub id)."""
    out = Path(out)
    for path in [out, Parts(str(out)).dir, sidecar_path(out), OutputLock(str(out)).path]:
        check_apart(path, inputs, f"<out> {out}: {path}")
    check_writable(out)
    # what else the run writes beside it: checked now, not found out after the scoring
    for path, folder, what in ((Parts(str(out)).dir, True, "its parts folder"), (sidecar_path(out), False, "its sidecar")):
        if path.exists() and path.is_dir() != folder:
            raise InputError(f"<out> {out}: {path} is a {'file' if folder else 'folder'}, where the run writes "
                             f"{what}: move it away or choose another <out>")


def check_apart(path, inputs: dict[str, str | None], name: str):
    """Refuse a path to be written (`name`: how messages name it) that is, or is inside, or contains
    one of the local `inputs` (option → path or hub id), under any spelling or link."""
    path = Path(path)
    target = path.resolve()
    for option, source in inputs.items():
        if source is None or not os.path.exists(source):
            continue
        read = Path(source).resolve()
        if (target == read or read in target.parents or target in read.parents
                or (path.exists() and os.path.samefile(path, read))):
            raise InputError(f"{name} is, is inside or contains the input {option} {source}: write it elsewhere")


def check_writable(path, option: str = "<out>"):
    """Refuse an output file (`option`: how messages name it) that cannot be written: a directory,
    in a missing or unwritable folder, or read-only."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory: give the file's name")
    if not path.parent.is_dir():
        raise InputError(f"{option} {path}: the folder {path.parent} does not exist")
    if path.exists() and not (path.stat().st_mode & 0o222 and os.access(path, os.W_OK)):
        raise InputError(f"{option} {path} is read-only: make it writable or choose another {option}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: cannot write in {path.parent}")


def write_sidecar(table_path, sidecar: Sidecar):
    _write_atomic(sidecar_path(table_path), _json_bytes(sidecar.to_json()))


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def hash_file(digest, path):
    """Feed the bytes of the file at `path` to `digest` (a hashlib object), a MiB at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def input_hash(source: str) -> str | None:
    """sha256 of an input file, or of a local folder's files (names and bytes); None for a hub dataset."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        hash_file(digest, file)
    return "sha256:" + digest.hexdigest()
