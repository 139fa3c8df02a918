"""Huge datasets: parts, resume after kill -9, corrupt parts, torchrun with gloo, merge."""
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import free_port
from prefrank.cli import main
from prefrank.demo.default import build_tokenizer
from prefrank.demo.task import make_pairs
from prefrank.io import Parts
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout")
    model = root / "model"
    tiny_model("llama").save_pretrained(model)
    build_tokenizer().save_pretrained(model)
    data = root / "pairs.jsonl"
    rows = make_pairs(300, seed=5)
    rows[17]["chosen"] = rows[17]["rejected"]  # one bad row, to carry through
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clean = root / "clean.parquet"
    assert main(["score", "--data", str(data), "--model", str(model), "--out", str(clean), "--chunk-rows", "7"]) == 0
    return {"root": root, "model": str(model), "data": str(data), "clean": pq.read_table(clean)}


def score_args(setup, out, *extra, chunk_rows=7):
    return ["score", "--data", setup["data"], "--model", setup["model"], "--out", str(out),
            "--chunk-rows", str(chunk_rows), *extra]


def test_parts_are_gone_and_table_complete(setup):
    table = setup["clean"]
    assert table.num_rows == 300 and table.column("status").to_pylist().count("error") == 1
    assert not (setup["root"] / "clean.parquet.parts").exists()


def test_resume_reuses_complete_parts_and_redoes_corrupt_ones(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.parquet"
    written = []
    real_write = Parts.write

    def write_then_crash(self, chunk, *a, **k):
        if len(written) == 6:
            raise KeyboardInterrupt  # the run dies after six parts
        real_write(self, chunk, *a, **k)
        written.append(chunk)

    monkeypatch.setattr(Parts, "write", write_then_crash)
    assert main(score_args(setup, out)) == 130  # interrupted
    parts = Parts(str(out))
    assert not out.exists() and sorted(p.name for p in parts.dir.glob("part-*.parquet")) == [
        f"part-{c:06d}.parquet" for c in range(6)]
    # without --resume the parts are not silently overwritten
    assert main(score_args(setup, out)) == 2 and "pass --resume" in capsys.readouterr().err
    # replace part 1 by a valid Parquet file with the same rows and other numbers, and truncate part 2
    p1 = pq.read_table(parts.part(1))
    column = p1.schema.get_field_index("logp_chosen")
    tampered = p1.set_column(column, p1.schema.field(column), pa.array([123.0] * p1.num_rows))
    pq.write_table(tampered, parts.part(1))
    data = parts.part(2).read_bytes()
    parts.part(2).write_bytes(data[: len(data) // 2])
    written.clear()
    monkeypatch.setattr(Parts, "write", lambda self, chunk, *a, **k: (written.append(chunk),
                                                                       real_write(self, chunk, *a, **k)))
    assert main(score_args(setup, out, "--resume")) == 0
    assert sorted(written) == [1, 2] + list(range(6, 43))  # 0, 3, 4 and 5 reused; 1 and 2 fail their checksums
    table = pq.read_table(out)
    assert table.equals(setup["clean"])


def test_resume_refuses_another_run(setup, tmp_path, capsys):
    out = tmp_path / "s.parquet"
    Parts(str(out)).dir.mkdir()
    (Parts(str(out)).dir / "manifest.json").write_text(json.dumps({"input": "other"}))
    assert main(score_args(setup, out, "--resume")) == 2
    assert "come from a run with other" in capsys.readouterr().err


def test_kill_9_then_resume_equals_a_clean_run(setup, tmp_path):
    out = tmp_path / "s.parquet"
    cmd = [sys.executable, "-m", "prefrank", *score_args(setup, out, chunk_rows=3)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    parts_dir = Parts(str(out)).dir
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts_dir.glob("part-*"))) < 8:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(list(parts_dir.glob("part-*"))) >= 8
    assert subprocess.run(cmd + ["--resume"], stderr=subprocess.DEVNULL).returncode == 0
    # bit-equality needs the same chunks (batch composition changes float rounding)
    assert main(score_args(setup, tmp_path / "clean.parquet", chunk_rows=3)) == 0
    resumed, clean = pq.read_table(out), pq.read_table(tmp_path / "clean.parquet")
    assert resumed.column("id").to_pylist() == clean.column("id").to_pylist()
    for col in ("logp_chosen", "logp_rejected", "n_chosen", "status", "error"):
        assert resumed.column(col).to_pylist() == clean.column(col).to_pylist(), col


def test_torchrun_two_ranks_equal_one_process(setup, tmp_path):
    out = tmp_path / "s.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "prefrank", *score_args(setup, out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(out)
    assert table.equals(setup["clean"])
    meta = json.loads((tmp_path / "s.parquet.meta.json").read_text())
    assert meta["world_size"] == 2 and meta["summary"]["rows"] == 300 and meta["summary"]["errors"] == 1


GLOO_THREADS = '''
import os, torch
from prefrank.models import load_model
from prefrank.runtime import distributed, shutdown
distributed()
load_model({model!r}, dtype=torch.float32, device=torch.device("cpu"))
shutdown()
names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("gloo threads left:", sorted(n for n in names if "gloo" in n))
'''


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process's threads from /proc")
def test_a_torchrun_process_ends_its_process_group_after_loading_a_model(setup):
    """shutdown() leaves no gloo thread behind once a model is loaded: transformers imports
    torch.distributed.nn.functional while loading, which pinned the default group if imported after
    it was made; its threads then outlived destroy_process_group and now and then aborted the
    process at exit (SIGABRT, seen as a --strict job's rank dying instead of exiting 2)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", sys.executable, "-c",
           GLOO_THREADS.format(model=setup["model"])]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines().count("gloo threads left: []") == 2, result.stdout


def test_merge_assembles_left_parts(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.parquet"
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Parts, "merge", crash)
    assert main(score_args(setup, out)) == 130
    monkeypatch.undo()
    assert not out.exists()
    assert main(["merge", str(out)]) == 0
    assert pq.read_table(out).equals(setup["clean"])
    assert main(["merge", str(tmp_path / "none.parquet")]) == 2
