"""The score table's contract (prefrank.table): a layout is recognised from the columns it writes, the
run's totals are the sums of the parts' statistics, and a sidecar reads back as it was written."""
import itertools
import json
from dataclasses import asdict, fields

import pytest

from prefrank.table import RunStats, Sidecar, TableLayout, read_sidecar, sidecar_path


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=5)))
def test_every_layout_is_recognised_from_its_columns(flags):
    layout = TableLayout(**dict(zip([f.name for f in fields(TableLayout)], flags)))
    names = layout.schema().names
    assert len(names) == len(set(names))
    assert TableLayout.of_names(names) == layout
    # pairs spread each per-completion value over chosen/rejected; K-wise tables keep one list column
    assert ("logps" in names) == layout.kwise and ("alpha" in names) == (not layout.kwise)


def test_run_totals_are_the_sums_of_the_parts():
    parts = [RunStats(rows=3, ok=2, errors=1, real_tokens=10, methods={"kv": 2}, seconds=0.5, first_error=None),
             RunStats(rows=4, ok=4, glued=1, methods={"kv": 1, "packed": 2}, seconds=0.25, first_error="row 5: x"),
             RunStats(rows=1, errors=1, first_error="row 7: y")]
    totals = RunStats()
    for part in parts:
        totals.add(part)
    assert (totals.rows, totals.ok, totals.errors, totals.glued, totals.real_tokens) == (8, 6, 2, 1, 10)
    assert totals.methods == {"kv": 3, "packed": 2} and totals.seconds == 0.75
    assert totals.first_error == "row 5: x"  # the first part's that had one, in input order


def test_a_sidecar_reads_back_as_written(tmp_path):
    sidecar = Sidecar(table=TableLayout(with_ref=True, ches=True), prefrank_version="0", dtype="float32",
                      read_as="format x", options={"columns": {"votes": ["a"]}}, alpha_source="votes",
                      summary=RunStats(rows=2, ok=2, methods={"kv": 1}))
    path = sidecar_path(tmp_path / "s.parquet")
    path.write_text(json.dumps(sidecar.to_json()))
    assert read_sidecar(tmp_path / "s.parquet") == sidecar
    on_disk = json.loads(path.read_text())
    assert on_disk["table"] == asdict(sidecar.table) and on_disk["join"] is None  # unset fields stay, as null
    assert "key" not in on_disk and "trl" not in on_disk  # the reference cache's own fields are its alone
    # an older sidecar: fields it lacks take their defaults, keys this version does not know are ignored
    path.write_text(json.dumps({"table": {"with_ref": False, "per_token": True, "kwise": False}, "legacy": 1,
                                "summary": {"rows": 1, "ok": 1, "retired_count": 3}}))
    old = read_sidecar(tmp_path / "s.parquet")
    assert old.table == TableLayout(per_token=True) and old.summary == RunStats(rows=1, ok=1) and old.read_as == ""
    path.write_text("[1, 2]")
    with pytest.raises(ValueError):
        read_sidecar(tmp_path / "s.parquet")
