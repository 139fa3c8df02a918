"""Hostile inputs and faults, second round (issue 30): each escape the audits found, one test each."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import free_port
from prefrank.cli import main
from prefrank.demo.default import build_tokenizer
from tiny_models import float64_logp, tiny_model

GOOD = [{"id": f"g{i}", "prompt": f"Q: {i}+{i}=?\nA:", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"}
        for i in range(4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama", seed=0).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def score(data, model, out, *extra):
    return main(["score", "--data", str(data), "--model", str(model), "--out", str(out), *extra])


def one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- every non-blank JSONL line is a row

def test_json_lines_that_are_not_objects_are_error_rows_naming_the_line(model_dir, tmp_path, capsys):
    lines = [json.dumps(GOOD[0]), "null", "", "3", '"text"', "true", "[]", json.dumps(GOOD[1])]
    out = tmp_path / "s.parquet"
    assert score(write_lines(tmp_path / "d.jsonl", lines), model_dir, out) == 0, capsys.readouterr().err
    table = pq.read_table(out).to_pylist()
    assert [r["id"] for r in table] == ["g0", "1", "2", "3", "4", "5", "g1"]  # fallback ids do not shift
    assert [r["status"] for r in table] == ["ok"] + ["error"] * 5 + ["ok"]
    for row, (line, kind) in zip(table[1:6], [(2, "null"), (4, "number"), (5, "string"), (6, "boolean"),
                                              (7, "array")]):
        assert row["error"] == f"line {line}: a JSON {kind}, not an object", row["error"]
    assert table[6]["logp_chosen"] == pytest.approx(float64_logp(model_dir, GOOD[1]["prompt"], GOOD[1]["chosen"]),
                                                    abs=1e-4)


def test_a_file_of_null_lines_is_not_a_clean_empty_run(model_dir, tmp_path, capsys):
    out = tmp_path / "s.parquet"
    assert score(write_lines(tmp_path / "d.jsonl", ["null"] * 3), model_dir, out) == 2
    err = capsys.readouterr().err
    assert "none of the 3 rows could be scored" in err and "line 1: a JSON null, not an object" in err, err
    assert "NoneType" not in err
    assert pq.read_table(out).num_rows == 3


def test_json_array_null_element_is_named_as_json(model_dir, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([GOOD[0], None, GOOD[1]]))
    out = tmp_path / "s.parquet"
    assert score(data, model_dir, out) == 0
    table = pq.read_table(out).to_pylist()
    assert [r["status"] for r in table] == ["ok", "error", "ok"]
    assert table[1]["error"] == "row is a JSON null, not an object"


# ---------------------------------------------------------------- no tracebacks

def test_group_key_with_a_lone_surrogate_is_a_key_like_any_other(model_dir, tmp_path, capsys):
    rows = [{**GOOD[0], "q": "a", "v": 1}, {**GOOD[1], "q": "b\ud800", "v": 2}, {**GOOD[0], "q": "a", "v": 1},
            {**GOOD[1], "q": "b\ud800", "v": 1}]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])  # the surrogate escaped: valid JSON
    out = tmp_path / "s.parquet"
    assert score(data, model_dir, out, "--vote-cols", "v", "--group-by", "q") == 0, capsys.readouterr().err
    table = pq.read_table(out).to_pylist()
    assert [(r["id"], r["status"], r["alpha"], r["n_votes"]) for r in table] == [("g0", "ok", 1.0, 2),
                                                                                ("g1", "ok", 0.5, 2)]
    assert not (tmp_path / "s.parquet.parts").exists()


def test_chat_template_that_is_not_utf8_is_one_line(model_dir, tmp_path, capsys):
    template = tmp_path / "t.jinja"
    template.write_bytes(b"{% for m in messages %}\xff{{ m.content }}{% endfor %}")
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD[0])])
    assert score(data, model_dir, tmp_path / "s.parquet", "--chat-template", str(template)) == 2
    err = one_line(capsys.readouterr().err)
    assert str(template) in err and "UTF-8" in err and "offset 23" in err


@pytest.mark.parametrize("device", ["meta", "cpu:1", "cuda:99"])
def test_devices_prefrank_cannot_use_are_refused_naming_those_it_can(model_dir, tmp_path, capsys, device):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD[0])])
    assert score(data, model_dir, tmp_path / "s.parquet", "--device", device) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--device {device}" in err and "cpu" in err, err
    assert not list(tmp_path.glob("s.parquet*"))


@pytest.mark.parametrize("flag", ["--out", "--pairs-out"])
def test_analyze_output_in_a_missing_folder_is_refused_in_one_line(model_dir, tmp_path, capsys, flag):
    table = tmp_path / "s.parquet"
    assert score(write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in GOOD]), model_dir, table) == 0
    capsys.readouterr()
    target = tmp_path / "missing" / "x.json"
    assert main(["analyze", str(table), flag, str(target)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{flag} {target}: the folder {target.parent} does not exist" in err, err


# ---------------------------------------------------------------- SIGTERM stops a run as Ctrl-C does

def test_sigterm_releases_the_lock_keeps_the_parts_and_resume_finishes(model_dir, tmp_path, capsys, monkeypatch):
    from prefrank.io import Parts
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in GOOD])
    clean = tmp_path / "clean.parquet"
    assert score(data, model_dir, clean, "--chunk-rows", "1") == 0
    real_write, written, unhandled = Parts.write, [], []

    def write(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        written.append(1)
        if len(written) == 2:  # as `timeout` or a scheduler would, between two parts
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Parts, "write", write)
    def note(*_):  # the test's own handler, which main() replaces while it runs: on a SIGTERM main() misses
        unhandled.append(1)

    previous = signal.signal(signal.SIGTERM, note)
    try:
        out = tmp_path / "s.parquet"
        capsys.readouterr()
        code = score(data, model_dir, out, "--chunk-rows", "1")
        assert signal.getsignal(signal.SIGTERM) is note  # main() restored the caller's handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert not unhandled and code == 128 + signal.SIGTERM, (code, err)
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert not Path(str(out) + ".lock").exists() and not out.exists()
    assert len(list(Parts(str(out)).dir.glob("part-*.parquet"))) == 2
    monkeypatch.setattr(Parts, "write", real_write)
    assert score(data, model_dir, out, "--chunk-rows", "1", "--resume") == 0
    assert pq.read_table(out).equals(pq.read_table(clean))


# ---------------------------------------------------------------- --strict under torchrun

def test_strict_under_torchrun_stops_every_rank_in_one_line_and_reruns(model_dir, tmp_path, capsys):
    """A bad row on rank 1 (chunk 1 of 2 rows): every rank exits 2, the job says it in one line (no
    rank's traceback: rank 0 used to fail in its next collective), and nothing is left behind, so
    the same command reruns (it used to be refused: the parts folder stayed); once the rows are
    fixed, it scores them as one process does."""
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(GOOD * 2)]
    bad = {3: {"id": "bad", "prompt": "Q"}, 7: {"id": "later", "prompt": "Q"}}  # chunks 1 and 3: rank 1's
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(bad.get(i, r)) for i, r in enumerate(rows)])
    out = tmp_path / "s.parquet"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", "PORT", "-m", "prefrank", "score", "--data", str(data), "--model", str(model_dir),
           "--out", str(out), "--chunk-rows", "2", "--strict"]

    def torchrun():
        return subprocess.run([str(free_port()) if a == "PORT" else a for a in cmd], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    result = torchrun()
    lines = [line for line in result.stderr.splitlines() if line.startswith("prefrank score")]
    assert lines == ["prefrank score: error: row 3 (id bad): missing field 'chosen' (--strict)"], result.stderr
    # torchrun reports its failed job in its own words (exit 1, a summary of each rank's exit code)
    assert result.returncode == 1 and "failed (exitcode: 2)" in result.stderr, result.stderr
    assert "[rank" not in result.stderr and "Error:" not in result.stderr.split("ChildFailedError")[0], \
        result.stderr  # no rank's traceback
    assert not list(tmp_path.glob("s.parquet*"))  # no table, parts folder or lock
    write_lines(data, [json.dumps(r) for r in rows])
    result = torchrun()  # the same command: a parts folder left behind would make it refuse
    assert result.returncode == 0, result.stderr
    assert score(data, model_dir, tmp_path / "one.parquet", "--strict") == 0
    got, one = pq.read_table(out).to_pylist(), pq.read_table(tmp_path / "one.parquet").to_pylist()
    assert [(r["id"], r["status"], r["n_chosen"]) for r in got] == [(r["id"], r["status"], r["n_chosen"]) for r in one]
    for g, o in zip(got, one):  # the last bits may differ: other batches (README, torchrun)
        assert g["logp_chosen"] == pytest.approx(o["logp_chosen"], rel=1e-5)


# ---------------------------------------------------------------- messages that say what is wrong

def test_tokenizer_folder_without_a_tokenizer_says_so(model_dir, tmp_path, capsys):
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD[0])])
    assert score(data, model_dir, tmp_path / "s.parquet", "--tokenizer", str(empty)) == 2
    err = one_line(capsys.readouterr().err)
    assert "no tokenizer file" in err and str(empty) in err and "sentencepiece" not in err, err


@pytest.mark.parametrize("kind", ["device", "symlink-loop"])
def test_data_that_is_there_but_no_file_is_not_called_missing(model_dir, tmp_path, capsys, kind):
    if kind == "device":
        data, needle = Path(os.devnull), "not a regular file"
    else:
        data = tmp_path / "loop.jsonl"
        data.symlink_to(tmp_path / "loop.jsonl")
        needle = os.strerror(40)  # ELOOP: "Too many levels of symbolic links"
    assert score(data, model_dir, tmp_path / "s.parquet") == 2
    err = one_line(capsys.readouterr().err)
    assert needle in err and str(data) in err and "not found" not in err, err


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_csv_invalid_byte_names_its_line(model_dir, tmp_path, capsys, suffix):
    import gzip
    text = b'prompt,chosen,rejected\n"Q: 1+1=?",\xe9 2, 3\n"Q: 2+2=?", 4, 5\n'
    data = tmp_path / f"d{suffix}"
    data.write_bytes(gzip.compress(text) if suffix.endswith(".gz") else text)
    assert score(data, model_dir, tmp_path / "s.parquet") == 2
    err = one_line(capsys.readouterr().err)
    byte = text.split(b"\n")[1].index(b"\xe9")
    assert f"{data}: invalid UTF-8 on line 2 (byte {byte} of the line)" in err, err


def test_float16_overflow_in_the_head_check_suggests_another_dtype(tmp_path, capsys):
    """A model whose float16 logits overflow on the token ids the head check feeds it (0..7): the
    check says overflow and names the dtypes that work, not --method naive."""
    from test_reliability import fp16_overflow_model
    tokenizer = build_tokenizer()
    model = tmp_path / "overflow"
    fp16_overflow_model(model, tokenizer, token=tokenizer.convert_ids_to_tokens(5))
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD[0])])
    for method in ("auto", "kv", "packed"):
        assert score(data, model, tmp_path / "s.parquet", "--dtype", "float16", "--method", method) == 2
        err = one_line(capsys.readouterr().err)
        assert "overflows" in err and "--dtype bfloat16 or float32" in err and "naive" not in err, err
    assert score(data, model, tmp_path / "s.parquet", "--dtype", "float32") == 0


# ---------------------------------------------------------------- --resume compares the weights' contents

def interrupt_after(monkeypatch, n_parts: int):
    """Parts.write stops the run (as Ctrl-C would) once n_parts parts are written; returns the undo."""
    from prefrank.io import Parts
    real_write, written = Parts.write, []

    def write(self, *args, **kwargs):
        if len(written) == n_parts:
            raise KeyboardInterrupt
        real_write(self, *args, **kwargs)
        written.append(1)

    monkeypatch.setattr(Parts, "write", write)
    return lambda: monkeypatch.setattr(Parts, "write", real_write)


def test_resume_refuses_weights_replaced_with_size_and_mtime_kept(model_dir, tmp_path, capsys, monkeypatch):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    other = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other)  # the same shapes: the same size and header
    weights = model / "model.safetensors"
    assert weights.stat().st_size == (other / "model.safetensors").stat().st_size
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in GOOD])
    out = tmp_path / "s.parquet"
    undo = interrupt_after(monkeypatch, 2)
    assert score(data, model, out, "--chunk-rows", "1") == 130
    undo()
    before = weights.stat()
    shutil.copyfile(other / "model.safetensors", weights)  # as `cp -p` or `rsync -a` would: mtime kept
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    capsys.readouterr()
    assert score(data, model, out, "--chunk-rows", "1", "--resume") == 2
    err = one_line(capsys.readouterr().err)
    assert "model.safetensors of --model" in err, err


def test_resume_accepts_the_same_weights_with_a_new_mtime(model_dir, tmp_path, capsys, monkeypatch):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in GOOD])
    clean = tmp_path / "clean.parquet"
    assert score(data, model, clean, "--chunk-rows", "1") == 0
    out = tmp_path / "s.parquet"
    undo = interrupt_after(monkeypatch, 2)
    assert score(data, model, out, "--chunk-rows", "1") == 130
    undo()
    for file in model.iterdir():  # an identical copy, every file with a new mtime
        shutil.copyfile(file, tmp_path / "tmp")
        os.replace(tmp_path / "tmp", file)
    assert score(data, model, out, "--chunk-rows", "1", "--resume") == 0, capsys.readouterr().err
    assert "2 parts were on disk" in capsys.readouterr().err
    assert pq.read_table(out).equals(pq.read_table(clean))


# ---------------------------------------------------------------- a hostile chat template cannot stall a run

HOSTILE_TEMPLATE = (
    "{% if messages[0].content == 'loop' %}{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}"
    "{% endfor %}{% endif %}"
    "{% if messages[0].content == 'big' %}{{ 'x' * 30000000 }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}{{ 'Q' if m.role == 'user' else 'A' }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}")


@pytest.mark.parametrize("tokenization", ["joint", "separate"])
def test_chat_template_render_is_bounded_in_time_and_size(model_dir, tmp_path, capsys, monkeypatch, tokenization):
    import time

    from prefrank import tokenization as tok
    monkeypatch.setattr(tok, "RENDER_SECONDS", 1.0)  # the bound itself, made short for the test
    template = tmp_path / "t.jinja"
    template.write_text(HOSTILE_TEMPLATE)

    def row(question):
        return {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": "3"}],
                "rejected": [{"role": "assistant", "content": "4"}]}
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(row(q)) for q in ("1+2", "loop", "big", "2+1")])
    out = tmp_path / "s.parquet"
    start = time.monotonic()
    assert score(data, model_dir, out, "--chat-template", str(template), "--tokenization", tokenization) == 0, \
        capsys.readouterr().err
    assert time.monotonic() - start < 30
    table = pq.read_table(out).to_pylist()
    assert [r["status"] for r in table] == ["ok", "error", "error", "ok"]
    assert "took over 1 s to render" in table[1]["error"], table[1]["error"]
    assert "30,000,0" in table[2]["error"] and "over the limit" in table[2]["error"], table[2]["error"]
    # the rows the template renders plainly are scored as their text: BOS Q: ...\nA: + the answer
    assert table[0]["logp_chosen"] == pytest.approx(float64_logp(model_dir, "Q: 1+2\nA:", " 3\n"), abs=1e-4)
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_render_deadline_restores_the_callers_alarm(model_dir):
    from transformers import AutoTokenizer

    from prefrank.tokenization import _apply_chat_template
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = HOSTILE_TEMPLATE

    def outer(*_):
        raise AssertionError("the caller's alarm went off during the test")

    previous = signal.signal(signal.SIGALRM, outer)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert _apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}]) == "<s>Q: hi\n"
        assert signal.getsignal(signal.SIGALRM) is outer and 90 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- what the documented features need is declared

def test_install_requires_declares_what_tp_needs():
    """--tp loads models with a tensor-parallel plan, which transformers refuses without accelerate
    (the test extra pulls it in through TRL, so the tests alone would not notice a plain install
    lacking it); the content fingerprint needs xxhash."""
    import ast
    setup = ast.parse((Path(__file__).parents[1] / "setup.py").read_text())
    call = next(node for node in ast.walk(setup) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    requires = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requires}
    assert {"accelerate", "xxhash"} <= names, names
