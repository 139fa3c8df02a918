"""Nothing wrong is ever written as ok (issue 20): verified parts, model fingerprints, guarded
outputs, a lock per output, non-finite and hostile rows as error rows, failed runs that can be rerun."""
import errno
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import free_port
from prefrank.cli import main
from prefrank.data import Columns, to_example
from prefrank.demo.default import build_tokenizer
from prefrank.demo.task import make_pairs
from prefrank.io import Parts
from tiny_models import tiny_model

N_ROWS, CHUNK = 300, 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    models = []
    for seed in (0, 1):
        model = root / f"model{seed}"
        tiny_model("llama", seed=seed).save_pretrained(model)
        build_tokenizer().save_pretrained(model)
        models.append(model)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(N_ROWS, seed=5)))
    clean = root / "clean.parquet"
    assert main(["score", "--data", str(data), "--model", str(models[0]), "--out", str(clean),
                 "--chunk-rows", str(CHUNK)]) == 0
    return {"root": root, "models": models, "data": data, "clean": pq.read_table(clean)}


def score_args(data, model, out, *extra):
    return ["score", "--data", str(data), "--model", str(model), "--out", str(out), "--chunk-rows", str(CHUNK),
            *extra]


def one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def record_writes(monkeypatch):
    """The chunks Parts.write writes; crash_after(n) makes the run die (as if killed) after n parts."""
    real_write = Parts.write
    state = {"written": [], "crash_after": None}

    def write(self, chunk, *args, **kwargs):
        if state["crash_after"] is not None and len(state["written"]) >= state["crash_after"]:
            raise KeyboardInterrupt
        real_write(self, chunk, *args, **kwargs)
        state["written"].append(chunk)

    monkeypatch.setattr(Parts, "write", write)
    return state


def interrupted_run(setup, out, record_writes, n_parts=6, model=None):
    record_writes["crash_after"] = n_parts
    assert main(score_args(setup["data"], model or setup["models"][0], out)) == 130
    record_writes.update(crash_after=None, written=[])


# ---------------------------------------------------------------- 1. corrupt parts are never reused

def flip_in_data_page(path: Path, column: str):
    """Flip one byte inside the values of `column`'s data page (located from the Parquet metadata),
    checking with pyarrow itself that the part now reads differently or not at all."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(j).path for j in range(meta.num_columns)]
    chunk = meta.row_group(0).column(names.index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size
    original = path.read_bytes()
    before = pq.read_table(pa.BufferReader(original)).column(column).to_pylist()
    for pos in range(end - 1, chunk.data_page_offset + 8, -1):  # from the page's last value byte backwards
        data = bytearray(original)
        data[pos] ^= 0x5A
        try:
            changed = pq.read_table(pa.BufferReader(bytes(data))).column(column).to_pylist() != before
        except (OSError, ValueError, pa.ArrowException):
            changed = True
        if changed:
            path.write_bytes(bytes(data))
            return pos
    raise AssertionError(f"no byte of {column}'s data page changes what it reads")


def test_resume_redoes_parts_with_flipped_data_bytes(setup, tmp_path, record_writes):
    out = tmp_path / "s.parquet"
    interrupted_run(setup, out, record_writes)
    parts = Parts(str(out))
    flip_in_data_page(parts.part(1), "logp_chosen")
    flip_in_data_page(parts.part(3), "logp_rejected")
    flip_in_data_page(parts.part(3), "n_chosen")
    flip_in_data_page(parts.part(4), "status")
    flip_in_data_page(parts.part(5), "alpha")
    data = parts.part(2).read_bytes()
    parts.part(2).write_bytes(data[: len(data) // 2])  # a truncated part
    assert main(score_args(setup["data"], setup["models"][0], out, "--resume")) == 0
    # every damaged part was redone, the intact one (0) reused, and the table is the clean run's
    assert sorted(record_writes["written"]) == [1, 2, 3, 4, 5] + list(range(6, -(-N_ROWS // CHUNK)))
    assert pq.read_table(out).equals(setup["clean"])


def test_merge_never_reads_an_unverified_part(setup, tmp_path, record_writes, monkeypatch, capsys):
    out = tmp_path / "s.parquet"
    real_merge = Parts.merge
    monkeypatch.setattr(Parts, "merge", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(score_args(setup["data"], setup["models"][0], out)) == 130  # every part written, not merged
    monkeypatch.setattr(Parts, "merge", real_merge)
    record_writes["written"] = []
    flip_in_data_page(Parts(str(out)).part(3), "logp_chosen")
    capsys.readouterr()
    assert main(["merge", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "part-000003.parquet" in err and "--resume" in err and not out.exists()
    # temporaries a killed run left behind (pid and random in their names): the next run that holds the lock
    # removes them
    leftovers = [Parts(str(out)).dir / ".part-000003.parquet.tmp-1-0a1b2c3d", tmp_path / ".s.parquet.partial-1-0a1b"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    assert main(score_args(setup["data"], setup["models"][0], out, "--resume")) == 0
    assert record_writes["written"] == [3] and not any(p.exists() for p in leftovers)
    assert pq.read_table(out).equals(setup["clean"])


# ---------------------------------------------------------------- 2. resume never mixes models

def test_resume_refuses_replaced_weights_and_tokenizer(setup, tmp_path, record_writes, capsys):
    model = tmp_path / "model"
    shutil.copytree(setup["models"][0], model)
    out = tmp_path / "s.parquet"
    interrupted_run(setup, out, record_writes, model=model)
    # other weights of the same shapes under the same path: same size, same safetensors header
    shutil.copyfile(setup["models"][1] / "model.safetensors", model / "model.safetensors")
    capsys.readouterr()
    assert main(score_args(setup["data"], model, out, "--resume")) == 2
    err = one_line(capsys.readouterr().err)
    assert "model.safetensors" in err and "--model" in err and record_writes["written"] == []

    model2 = tmp_path / "model2"
    shutil.copytree(setup["models"][0], model2)
    out2 = tmp_path / "s2.parquet"
    interrupted_run(setup, out2, record_writes, model=model2)
    config = json.loads((model2 / "tokenizer_config.json").read_text())
    (model2 / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 32}))
    capsys.readouterr()
    assert main(score_args(setup["data"], model2, out2, "--resume")) == 2
    err = one_line(capsys.readouterr().err)
    assert "tokenizer_config.json" in err and record_writes["written"] == []


def test_hub_ids_fingerprint_their_cached_files(setup, tmp_path, monkeypatch):
    import huggingface_hub

    from prefrank.models import fingerprint
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / revision
    shutil.copytree(setup["models"][0], snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    by_id = fingerprint("org/tiny")
    assert by_id == fingerprint(str(snapshot)) and "model.safetensors" in by_id
    shutil.copyfile(setup["models"][1] / "model.safetensors", snapshot / "model.safetensors")
    assert fingerprint("org/tiny") != by_id


# ---------------------------------------------------------------- 3. the output never overwrites an input

@pytest.mark.parametrize("kind", ["jsonl", "parquet", "symlink", "inside-model", "relative"])
def test_output_that_is_or_is_inside_an_input_is_refused(setup, tmp_path, monkeypatch, capsys, kind):
    data = tmp_path / "d.jsonl"
    shutil.copyfile(setup["data"], data)
    model = setup["models"][0]
    out = data
    if kind == "parquet":
        data = out = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(make_pairs(20, seed=1)), data)
    elif kind == "symlink":
        out = tmp_path / "link.parquet"
        out.symlink_to(data)
    elif kind == "inside-model":
        model = tmp_path / "model"
        shutil.copytree(setup["models"][0], model)
        out = model / "scores.parquet"
    elif kind == "relative":
        monkeypatch.chdir(tmp_path)
        out = Path("d.jsonl")
    before = data.read_bytes()
    code = main(score_args(data, model, out))
    assert code == 2 and "input" in one_line(capsys.readouterr().err)
    assert data.read_bytes() == before and not Parts(str(out)).dir.exists()


# ---------------------------------------------------------------- 4. one run per output

# the first run, slowed down (a part every 0.1 s) so that the second surely starts while it runs
SLOW_RUN = ("import sys, time; from prefrank.io import Parts; write = Parts.write; "
            "Parts.write = lambda self, *a, **k: (time.sleep(0.1), write(self, *a, **k)); "
            "from prefrank.cli import main; sys.exit(main(sys.argv[1:]))")


def test_second_live_run_on_the_same_output_is_refused(setup, tmp_path):
    out = tmp_path / "s.parquet"
    args = score_args(setup["data"], setup["models"][0], out)
    first = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *args], stderr=subprocess.PIPE, text=True)
    parts_dir = Parts(str(out)).dir
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts_dir.glob("part-*.parquet")):
        time.sleep(0.02)
    # the user believes the first run died and resumes it while it is still writing
    second = subprocess.run([sys.executable, "-m", "prefrank", *args, "--resume"], capture_output=True, text=True,
                            timeout=120)
    assert first.poll() is None, "the first run ended before the second started"
    assert second.returncode == 2, second.stderr
    err = one_line(second.stderr)
    assert f"pid {first.pid} on {socket.gethostname()}" in err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert not Path(str(out) + ".lock").exists()
    assert pq.read_table(out).equals(setup["clean"])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out: Path, pid: int, host: str):
    Path(str(out) + ".lock").write_text(json.dumps({"pid": pid, "host": host, "started": "2025-01-01T00:00:00"}))


def test_stale_lock_is_taken_over_and_foreign_lock_refused(setup, tmp_path, capsys):
    out = tmp_path / "s.parquet"
    pid = dead_pid()
    write_lock(out, pid, socket.gethostname())
    assert main(score_args(setup["data"], setup["models"][0], out)) == 0
    err = capsys.readouterr().err
    assert "stale lock" in err and f"pid {pid}" in err and not Path(str(out) + ".lock").exists()
    assert pq.read_table(out).equals(setup["clean"])
    write_lock(out, 1, "another-host")  # a run on another machine sharing the folder: cannot be judged dead
    assert main(score_args(setup["data"], setup["models"][0], out)) == 2
    err = one_line(capsys.readouterr().err)
    assert "pid 1 on another-host" in err and ".lock" in err


def test_torchrun_refused_by_a_held_lock_exits_on_every_rank(setup, tmp_path):
    out = tmp_path / "s.parquet"
    write_lock(out, os.getpid(), socket.gethostname())  # this live process holds it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "prefrank", *score_args(setup["data"], setup["models"][0], out)]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=180)
    lines = [line for line in result.stderr.splitlines() if line.startswith("prefrank score")]
    assert result.returncode != 0 and len(lines) == 1 and f"pid {os.getpid()}" in lines[0], result.stderr  # rank 0's
    assert not Parts(str(out)).dir.exists() and Path(str(out) + ".lock").exists()  # the owner's lock stays


# ---------------------------------------------------------------- 5. non-finite log-probs are errors

def fp16_overflow_model(path: Path, tokenizer, token: str = "9"):
    """A tiny Llama whose logits overflow float16 (finite in float32) exactly where the input token is
    `token`: hidden dimension 0 carries only that token's embedding, layers neither read nor write it,
    and the final norm and the head amplify it past 65504."""
    model = tiny_model("llama")
    nine = tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0
        model.model.embed_tokens.weight[nine, 0] = 100.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
            layer.input_layernorm.weight[0] = 0
            layer.post_attention_layernorm.weight[0] = 0
        model.model.norm.weight[0] = 1e4
        model.lm_head.weight[:, 0] = torch.linspace(-2, 2, model.lm_head.weight.shape[0])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("method", ["packed", "kv", "naive"])
def test_non_finite_log_probs_are_error_rows(setup, tmp_path, capsys, method):
    tokenizer = build_tokenizer()
    model = tmp_path / "overflow"
    fp16_overflow_model(model, tokenizer)
    # a "9" that is not a completion's last token is fed to the model and predicts the next token
    rows = [{"id": f"r{i}", "prompt": f"Q: {i % 5}+{i % 7}=?\nA:", "chosen": c, "rejected": r}
            for i, (c, r) in enumerate([(" 12", " 13"), (" 94", " 14"), (" 15", " 196"), (" 16", " 17")] * 5)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tables = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / f"{dtype}.parquet"
        assert main(["score", "--data", str(data), "--model", str(model), "--ref-model", str(setup["models"][1]),
                     "--out", str(out), "--dtype", dtype, "--method", method, "--per-token"]) == 0
        tables[dtype] = pq.read_table(out).to_pylist()
    err = capsys.readouterr().err
    assert all(r["status"] == "ok" for r in tables["float32"])  # the model is fine in float32
    for row, got in zip(rows, tables["float16"]):
        bad = [name for name in ("chosen", "rejected") if "9" in row[name][:-1]]
        if bad:
            assert got["status"] == "error" and got["logp_chosen"] is None and got["token_logps_chosen"] is None
            assert "non-finite" in got["error"] and "policy" in got["error"] and "reference" not in got["error"]
            assert all(name in got["error"] for name in bad)
        else:
            assert got["status"] == "ok", got["error"]
            assert all(v == v and abs(v) != float("inf") for v in (got["logp_chosen"], got["logp_rejected"]))
    assert "10 ok, 10 errors" in err
    assert main(["analyze", str(tmp_path / "float16.parquet")]) == 0
    assert json.loads(capsys.readouterr().out)["n_errors"] == 10


# ---------------------------------------------------------------- 6. a null prompt is not an empty one

@pytest.mark.parametrize("row, cols", [
    ({"prompt": None, "chosen": "Q: 1 A: 2", "rejected": "Q: 1 A: 3"}, Columns()),
    ({"q": None, "chosen": "Q: 1 A: 2", "rejected": "Q: 1 A: 3"}, Columns(prompt=["q"])),
    ({"prompt": "Q:", "chosen": " 2", "rejected": " 3", "idx": None}, Columns(id="idx")),
])
def test_present_but_null_named_fields_are_errors(row, cols):
    ex = to_example(0, row, cols)
    assert ex.error is not None and "null" in ex.error, ex.error
    assert to_example(0, {"chosen": "Q: 1 A: 2", "rejected": "Q: 1 A: 3"}, Columns()).error is None  # absent: implicit


# ---------------------------------------------------------------- 7. hostile rows are error rows

CHAT_TEMPLATE = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}"
                 "{% elif m.role == 'system' %}{{ m.content.__class__.__mro__ }}{% endif %}"
                 "{{ 'Q' if m.role == 'user' else 'A' }}: {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}A:{% endif %}")


def test_hostile_rows_become_error_rows_in_place(setup, tmp_path, capsys):
    model = tmp_path / "chat"
    shutil.copytree(setup["models"][0], model)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    good = {"prompt": "Q: 1+2=?\nA:", "chosen": " 3", "rejected": " 4"}
    user = [{"role": "user", "content": "1+2"}]
    answers = {"chosen": [{"role": "assistant", "content": "3"}], "rejected": [{"role": "assistant", "content": "4"}]}
    lines = [
        b"\xef\xbb\xbf" + json.dumps(good).encode(),  # a UTF-8 BOM before the first row
        json.dumps(good).encode()[:-2] + b"\xff\xfe\"}",  # invalid UTF-8
        json.dumps({**good, "chosen": " 3\ud800"}).encode(),  # a lone surrogate (escaped: valid JSON)
        json.dumps({**good, "id": "x\udfff"}).encode(),
        b"[" * 100_000 + b"]" * 100_000,  # nested 100,000 deep
        json.dumps({"prompt": user + [{"role": "tool", "content": "x"}], **answers}).encode(),  # raise_exception
        json.dumps({"prompt": [{"role": "system", "content": "x"}] + user, **answers}).encode(),  # SecurityError
        json.dumps({"prompt": user, **answers}).encode(),
        b'{"prompt": ' + b"1" * 5000 + b', "chosen": " 3", "rejected": " 4"}',  # an integer past Python's limit
        json.dumps(good).encode(),
    ]
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "s.parquet"
    assert main(["score", "--data", str(data), "--model", str(model), "--out", str(out)]) == 0, capsys.readouterr()
    table = pq.read_table(out).to_pylist()
    assert [r["status"] for r in table] == ["ok"] + ["error"] * 6 + ["ok", "error", "ok"]
    errors = [r["error"] for r in table]
    for i, needle in [(1, "line 2: invalid UTF-8"), (2, "surrogate"), (3, "surrogate"), (4, "line 5"),
                      (5, "no tool role"), (6, "SecurityError"), (8, "line 9")]:
        assert needle in errors[i], (i, errors[i])
    assert table[0]["logp_chosen"] == table[9]["logp_chosen"]  # the BOM'd row is the same row
    assert "3 ok, 7 errors" in capsys.readouterr().err


def test_json_array_with_bom_and_too_deep_json(setup, tmp_path, capsys):
    rows = make_pairs(2, seed=3)
    data = tmp_path / "d.json"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).encode())
    out = tmp_path / "s.parquet"
    assert main(["score", "--data", str(data), "--model", str(setup["models"][0]), "--out", str(out)]) == 0
    table = pq.read_table(out).to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in rows] and all(r["status"] == "ok" for r in table)
    data.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    capsys.readouterr()
    assert main(["score", "--data", str(data), "--model", str(setup["models"][0]), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert str(data) in err and "deep" in err


# ---------------------------------------------------------------- 8. a failed run can be rerun

def bad_input(kind: str, path_dir: Path, rows) -> tuple[Path, str]:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if kind == "truncated-gz":
        path = path_dir / "d.jsonl.gz"
        blob = gzip.compress(text)
        path.write_bytes(blob[: int(len(blob) * 0.7)])
        return path, "line"
    if kind == "not-gz":
        path = path_dir / "d.jsonl.gz"
        path.write_bytes(text)
        return path, "gzip"
    path = path_dir / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)
    if kind == "parquet-footer":
        path.write_bytes(path.read_bytes()[:-100])
        return path, "Parquet"
    meta = pq.ParquetFile(path).metadata.row_group(4).column(0)  # a page header in the middle of the file
    data = bytearray(path.read_bytes())
    data[meta.data_page_offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, "row group 4"


@pytest.mark.parametrize("kind", ["truncated-gz", "not-gz", "parquet-footer", "parquet-page"])
def test_unreadable_input_is_one_line_and_a_plain_rerun_works(setup, tmp_path, capsys, kind):
    rows = make_pairs(N_ROWS, seed=5)
    data, where = bad_input(kind, tmp_path, rows)
    out = tmp_path / "s.parquet"
    assert main(score_args(data, setup["models"][0], out)) == 2
    err = one_line(capsys.readouterr().err)
    assert str(data) in err and where in err
    assert not Parts(str(out)).dir.exists() and not Path(str(out) + ".lock").exists() and not out.exists()
    if data.suffix == ".gz":  # the user fixes the file and reruns the same command
        data.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    else:
        pq.write_table(pa.Table.from_pylist(rows), data, row_group_size=50)
    assert main(score_args(data, setup["models"][0], out)) == 0
    assert pq.read_table(out).equals(setup["clean"])


def test_full_disk_is_one_line_and_resume_finishes(setup, tmp_path, monkeypatch, capsys):
    import builtins

    import prefrank.io
    out = tmp_path / "s.parquet"
    parts_opened = []

    class FullDisk:  # a file on a disk that fills up: half the bytes land, then ENOSPC
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_until_full(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if "w" in mode and ".parquet.tmp" in str(path):
            parts_opened.append(path)
            if len(parts_opened) > 4:
                return FullDisk(f)
        return f

    monkeypatch.setattr(prefrank.io, "open", open_until_full, raising=False)
    assert main(score_args(setup["data"], setup["models"][0], out)) == 2
    err = one_line(capsys.readouterr().err)
    assert "No space left on device" in err and "--resume" in err
    parts = Parts(str(out))
    assert len(list(parts.dir.glob("part-*.json"))) == 4
    assert [p.name for p in parts.dir.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    assert not Path(str(out) + ".lock").exists() and not out.exists()
    monkeypatch.undo()  # space freed

    real_writer = prefrank.io.pq.ParquetWriter  # the disk fills up again while the table is assembled
    class FullWriter(real_writer):
        def write_table(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(prefrank.io.pq, "ParquetWriter", FullWriter)
    assert main(score_args(setup["data"], setup["models"][0], out, "--resume")) == 2
    err = one_line(capsys.readouterr().err)
    assert "No space left on device" in err and str(out) in err
    assert not out.exists() and [p for p in tmp_path.iterdir() if "partial" in p.name] == []
    monkeypatch.undo()
    assert main(score_args(setup["data"], setup["models"][0], out, "--resume")) == 0
    assert pq.read_table(out).equals(setup["clean"])


@pytest.mark.parametrize("kind", ["directory", "read-only", "no-parent", "unwritable-parent"])
def test_unusable_output_is_refused_before_any_model_loads(setup, tmp_path, monkeypatch, capsys, kind):
    import prefrank.runtime
    monkeypatch.setattr(prefrank.runtime, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = {"directory": tmp_path, "read-only": tmp_path / "s.parquet", "no-parent": tmp_path / "no" / "s.parquet",
           "unwritable-parent": Path("/proc/prefrank-s.parquet")}[kind]
    if kind == "read-only":
        out.write_bytes(b"an earlier table")
        out.chmod(0o444)
    assert main(score_args(setup["data"], setup["models"][0], out)) == 2
    assert str(out) in one_line(capsys.readouterr().err)
    assert not Parts(str(out)).dir.exists()


# ---------------------------------------------------------------- 9. never more than the maximum length

def test_max_length_too_small_is_an_invocation_error(setup, tmp_path, capsys):
    assert main(score_args(setup["data"], setup["models"][0], tmp_path / "s.parquet", "--max-length", "1",
                           "--truncate", "keep-end")) == 2
    assert "--max-length" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("max_length", [2, 3, 5])
def test_keep_end_never_exceeds_the_limit(setup, tmp_path, capsys, max_length):
    from transformers import AutoModelForCausalLM
    rows = make_pairs(12, seed=2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "s.parquet"
    model_dir = setup["models"][0]
    assert main(["score", "--data", str(data), "--model", str(model_dir), "--out", str(out), "--max-length",
                 str(max_length), "--truncate", "keep-end"]) == 0
    table = pq.read_table(out).to_pylist()
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    for row, got in zip(rows, table):
        assert got["status"] == "ok" and got["truncated"]
        prompt = tok(row["prompt"])["input_ids"]
        longest = max(len(tok(row[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        # the documented rule, independently: BOS, then k of the prompt's last tokens, as many as leave the
        # longest completion room but at least one while the limit still leaves a completion token; each
        # completion then cut from the right to what is left
        k = min(len(prompt) - 1, max(max_length - 1 - longest, 1), max_length - 2)
        for name in ("chosen", "rejected"):
            completion = tok(row[name], add_special_tokens=False)["input_ids"]
            ids = prompt[:1] + prompt[len(prompt) - k:] + completion[: max_length - 1 - k]
            assert len(ids) <= max_length and got[f"n_{name}"] == len(ids) - 1 - k >= 1
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            expected = sum(logp[j - 1, ids[j]].item() for j in range(1 + k, len(ids)))
            assert got[f"logp_{name}"] == pytest.approx(expected, abs=1e-4)


def test_truncate_keep_end_unit_limits():
    from prefrank.data import Example
    from prefrank.errors import InputError
    from prefrank.tokenization import tokenize_example
    tok = build_tokenizer()
    ex = Example(0, "0", "Q: 11+22=?\nA:", [" 33", " 1234567"])
    for max_length in range(2, 20):
        t = tokenize_example(ex, tok, max_length=max_length, truncate="keep-end")
        assert t.prompt_ids[0] == tok.bos_token_id and all(len(c) >= 1 for c in t.completion_ids)
        assert max(len(t.prompt_ids) + len(c) for c in t.completion_ids) <= max_length
    with pytest.raises(InputError, match="at least a prompt token and a completion token"):
        tokenize_example(ex, tok, max_length=1, truncate="keep-end")


# ---------------------------------------------------------------- 10. minor

def test_summary_seconds_are_the_parts_own_after_resume_and_merge(setup, tmp_path, record_writes, monkeypatch,
                                                                   capsys):
    out = tmp_path / "s.parquet"
    interrupted_run(setup, out, record_writes)
    real_merge = Parts.merge
    monkeypatch.setattr(Parts, "merge", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(score_args(setup["data"], setup["models"][0], out, "--resume")) == 130
    monkeypatch.setattr(Parts, "merge", real_merge)
    parts = Parts(str(out))
    seconds = [parts.read_json(f"part-{c:06d}.json")["stats"]["seconds"] for c in range(-(-N_ROWS // CHUNK))]
    assert all(s > 0 for s in seconds)
    capsys.readouterr()
    assert main(["merge", str(out)]) == 0
    summary = json.loads(Path(str(out) + ".meta.json").read_text())["summary"]
    assert summary["seconds"] == pytest.approx(sum(seconds))
    rate = float(capsys.readouterr().err.split("(")[1].split(" rows/s")[0])
    assert rate == pytest.approx(N_ROWS / sum(seconds), rel=0.05)


def test_unknown_id_column_is_an_invocation_error(setup, tmp_path, capsys):
    assert main(score_args(setup["data"], setup["models"][0], tmp_path / "s.parquet", "--id-col", "idd")) == 2
    assert "unknown column(s) 'idd'" in one_line(capsys.readouterr().err)


def test_resume_with_a_relative_path_and_refusals_name_the_option(setup, tmp_path, record_writes, monkeypatch,
                                                                  capsys):
    out = tmp_path / "s.parquet"
    interrupted_run(setup, out, record_writes)
    capsys.readouterr()
    assert main(score_args(setup["data"], setup["models"][0], out, "--resume", "--append-eos")) == 2
    err = one_line(capsys.readouterr().err)
    assert "--append-eos" in err and "options" not in err
    assert main(score_args(setup["data"], setup["models"][0], out, "--resume", "--chosen-col", "rejected",
                           "--rejected-col", "chosen")) == 2
    err = one_line(capsys.readouterr().err)
    assert "--chosen-col" in err and "--rejected-col" in err
    monkeypatch.chdir(setup["data"].parent)
    assert main(score_args(setup["data"].name, os.path.relpath(setup["models"][0]), out, "--resume")) == 0
    assert pq.read_table(out).equals(setup["clean"])


def test_remote_code_refusal_names_only_its_option(tmp_path, capsys):
    model = tmp_path / "remote"
    tiny_model("llama").save_pretrained(model)
    build_tokenizer().save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text("raise SystemExit('remote code ran')\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(3)))
    assert main(["score", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "s.parquet")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "--trust-remote-code" in err and "--allow-pickle" not in err
