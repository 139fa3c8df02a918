"""A corpus of hostile inputs through the command line (issue 30): rows, files, options, chat
templates and faults, all generated here, on a tiny random Llama with the built-in character
tokenizer. For every kind: no traceback, exit 0 or 2 (130/143 for an interruption), done within a
time bound, every input row in the table in its place, each bad row an error naming its field or
line, each good row ok and equal to a clean run of the good rows alone."""
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefrank.cli import main
from prefrank.demo.default import build_tokenizer
from tiny_models import tiny_model

SECONDS = 60  # per command: none of these should take more than a few


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus-model")
    tiny_model("llama", seed=0).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def cli(args, capsys, codes=(0, 2)) -> tuple[int, str]:
    """Run the command line in-process under a time bound; checks no traceback and the exit code."""
    def hang(*_):
        raise AssertionError(f"no exit within {SECONDS} s: prefrank {' '.join(map(str, args))}")

    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    try:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse refuses an option value: usage and one error line
            code = e.code
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert "Traceback" not in err and code in codes, (code, err)
    return code, err


def cli_process(args) -> tuple[int, str]:
    """The same through the real entry point, in its own process (`python -m prefrank`): what cli()
    checks in-process, there for the exit code and stderr a shell sees."""
    proc = subprocess.run([sys.executable, "-m", "prefrank", *map(str, args)], capture_output=True, text=True,
                          timeout=SECONDS, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 2), (proc.returncode, proc.stderr)
    return proc.returncode, proc.stderr


def refusal(err: str) -> str:
    """The one error line of a refused command (argparse prints its usage above it)."""
    lines = [line for line in err.strip().splitlines() if line.startswith("prefrank")]
    assert len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


def rows_of(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


SCORED = ("logp_chosen", "logp_rejected", "n_chosen", "n_rejected", "alpha", "reoriented", "truncated")


def assert_same_scores(got: list[dict], clean: list[dict]):
    """The same rows and scores; the log-prob sums equal up to float32 rounding (a row batched with other
    neighbours sums in another order: ~1e-7 relative; README, scoring under torchrun)."""
    assert len(got) == len(clean)
    for g, c in zip(got, clean):
        assert g["status"] == c["status"] == "ok", (g, c)
        assert {k: g[k] for k in ("id", *SCORED) if not k.startswith("logp")} == \
            {k: c[k] for k in ("id", *SCORED) if not k.startswith("logp")}, (g, c)
        for key in ("logp_chosen", "logp_rejected"):
            assert g[key] == pytest.approx(c[key], rel=1e-6, abs=1e-6), (key, g, c)


def score_args(data, model, out, *extra):
    return ["score", "--data", data, "--model", model, "--out", out, *extra]


# ---------------------------------------------------------------- rows

def pair(i, **fields):
    return {"id": f"r{i}", "prompt": f"Q: {i % 10}+{i % 7}=?\nA:", "chosen": f" {i % 10 + i % 7}",
            "rejected": f" {i % 10 + i % 7 + 1}", **fields}


def chat(content="1+2"):
    return {"prompt": [{"role": "user", "content": content}], "chosen": [{"role": "assistant", "content": "3"}],
            "rejected": [{"role": "assistant", "content": "4"}]}


def escaped(row: dict) -> bytes:
    """The same object with every ASCII letter of its strings written as a \\u escape."""
    text = json.dumps(row)
    out, in_string, i = [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            out.append(text[i:i + 2])
            i += 2
            continue
        if ch == '"':
            in_string = not in_string
        out.append(f"\\u{ord(ch):04x}" if in_string and ch.isalpha() else ch)
        i += 1
    return "".join(out).encode()


# (kind, the line's bytes, what comes out: a dict = a good row equal to its clean run; a str = the
# error's text, {line} standing for the line's number)
ROWS = [
    ("plain", None, pair(0)),
    ("extra fields", None, pair(1, source="web", score=[1, 2], meta={"x": None})),
    ("keys in another order", json.dumps(dict(reversed(list(pair(2).items())))).encode(), pair(2)),
    ("ASCII written as \\u escapes", escaped(pair(3)), pair(3)),
    ("CRLF line end", json.dumps(pair(4)).encode() + b"\r", pair(4)),
    ("spaces and tabs around", b" \t" + json.dumps(pair(5)).encode() + b" \t", pair(5)),
    ("emoji, CJK, RTL text", None, pair(6, prompt="Q: 😀 中文 עברית 1+1=?\nA:")),
    ("NUL and control characters", None, pair(7, chosen=" 1\x00\x01\x1b")),
    ("raw U+2028 and U+2029", json.dumps(pair(8, prompt="Q:\u2028 1\u2029=?\nA:"), ensure_ascii=False).encode(),
     pair(8, prompt="Q:\u2028 1\u2029=?\nA:")),
    ("text that looks like Jinja", None, pair(9, prompt="Q: {{ 7*7 }}{% for x in y %}=?\nA:")),
    ("HH marker inside the prompt", None, pair(10, prompt="\n\nHuman: 1+1?\n\nAssistant:")),
    ("alpha 0.5 (a tie)", None, pair(11, alpha=0.5)),
    ("alpha 0.2 (reoriented)", None, pair(12, alpha=0.2)),
    ("votes with a tie", None, pair(13, votes=[1, 0, 0.5])),
    ("numeric id", None, {**pair(14), "id": 14}),
    ("implicit transcripts", None, {"id": "r15", "chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
                                    "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}),
    ("long prompt within the limit", None, pair(16, prompt="Q: " + "1+" * 90 + "1=?\nA:")),
    ("null", b"null", "line {line}: a JSON null, not an object"),
    ("number", b"3", "line {line}: a JSON number, not an object"),
    ("string", b'"prompt"', "line {line}: a JSON string, not an object"),
    ("array", b"[1, 2]", "line {line}: a JSON array, not an object"),
    ("boolean", b"true", "line {line}: a JSON boolean, not an object"),
    ("truncated JSON", json.dumps(pair(20)).encode()[:15], "line {line}: invalid JSON"),
    ("trailing garbage", json.dumps(pair(21)).encode() + b" x", "line {line}: invalid JSON"),
    ("BOM in mid-file", b"\xef\xbb\xbf" + json.dumps(pair(22)).encode(), "line {line}: invalid JSON"),
    ("invalid UTF-8", json.dumps(pair(23)).encode()[:-2] + b"\xff\xfe\"}", "line {line}: invalid UTF-8"),
    ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, "line {line}: JSON nested too deeply"),
    ("integer of 5,000 digits", b'{"prompt": ' + b"7" * 5000 + b"}", "line {line}: invalid JSON"),
    ("a key given twice", b'{"prompt": "A", "prompt": "B", "chosen": " 1", "rejected": " 2"}',
     "line {line}: invalid JSON (key 'prompt' appears twice in one object)"),
    ("a message key given twice", json.dumps({**chat(), "id": "r46"}).encode().replace(b'"role": "user"',
                                                                                     b'"role": "user", "role": "x"'),
     "line {line}: invalid JSON (key 'role' appears twice in one object)"),
    ("empty object", b"{}", "missing field 'chosen'"),
    ("missing rejected", json.dumps({k: v for k, v in pair(24).items() if k != "rejected"}).encode(),
     "missing field 'rejected'"),
    ("null prompt", None, pair(25, prompt=None), "field 'prompt' is null"),
    ("null chosen", None, pair(26, chosen=None), "field 'chosen' is null"),
    ("number chosen", None, pair(27, chosen=5), "field 'chosen' must be a string, got int"),
    ("list of numbers rejected", None, pair(28, rejected=[1, 2]), "field 'rejected' must be a string, got list"),
    ("object prompt", None, pair(29, prompt={"text": "Q"}), "field 'prompt' must be a string, got dict"),
    ("boolean rejected", None, pair(30, rejected=False), "field 'rejected' must be a string, got bool"),
    ("empty chosen", None, pair(31, chosen=""), "empty or whitespace-only completion"),
    ("whitespace rejected", None, pair(32, rejected=" \n\t"), "empty or whitespace-only completion"),
    ("identical completions", None, pair(33, rejected=pair(33)["chosen"]), "chosen and rejected are identical"),
    ("lone surrogate in a completion", None, pair(34, chosen=" 3\ud800"), "a completion holds a lone surrogate"),
    ("lone surrogate in the prompt", None, pair(35, prompt="Q\udfff:"), "the prompt holds a lone surrogate"),
    ("lone surrogate in the id", None, pair(36, id="x\ud800"), "the id holds a lone surrogate"),
    ("alpha above 1", None, pair(37, alpha=1.5), "'alpha' must be a number in [0, 1]"),
    ("alpha NaN", json.dumps(pair(38, alpha=float("nan"))).encode(), "'alpha' must be a number in [0, 1]"),
    ("alpha text", None, pair(39, alpha="high"), "'alpha' must be a number in [0, 1]"),
    ("alpha boolean", None, pair(40, alpha=True), "'alpha' must be a number in [0, 1]"),
    ("votes not a list", None, pair(41, votes=1), "'votes' must be a non-empty list"),
    ("votes empty", None, pair(42, votes=[]), "'votes' must be a non-empty list"),
    ("a vote of 2", None, pair(43, votes=[1, 2]), "'votes' must be a non-empty list"),
    ("over the model's length", None, pair(44, chosen=" " + "1" * 300), "exceed the maximum length"),
    ("conversation without a chat template", None, {**chat(), "id": "r45"},
     "conversational row, but the tokenizer has no chat template"),
    ("message without content", None, {**chat(), "chosen": [{"role": "assistant"}]},
     "chosen: every message needs string 'role' and 'content'"),
    ("messages and text mixed", None, {**chat(), "rejected": " 4"},
     "'rejected' must be a message list like the other completions"),
    ("text prompt, message completions", None, {**chat(), "prompt": "Q:"},
     "'prompt' must be a message list when the completions are"),
]


def _corpus():
    """(lines of the hostile file, per non-blank line: expected good row or error text, kinds)."""
    lines, expected, kinds = [], [], []
    for entry in ROWS:
        kind, raw, want = entry[:3]
        if len(entry) == 4:  # a dict written as it is, with an error
            raw, want = json.dumps(want).encode(), entry[3]
        elif raw is None:
            raw = json.dumps(want).encode()
        if kind in ("null", "truncated JSON", "empty object"):
            lines.append(b"")  # blank lines are no rows, and line numbers count them
        lines.append(raw)
        expected.append(want if isinstance(want, dict) else want.format(line=len(lines)))
        kinds.append(kind)
    return lines, expected, kinds


def test_hostile_rows_are_error_rows_in_place_and_good_rows_score_as_alone(model_dir, tmp_path, capsys):
    lines, expected, kinds = _corpus()
    assert len(kinds) >= 50
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "hostile.parquet"
    code, err = cli_process(score_args(data, model_dir, out, "--chunk-rows", 7))
    assert code == 0 and f"{sum(isinstance(w, str) for w in expected)} errors" in err, err
    table = rows_of(out)
    assert len(table) == len(expected)  # every non-blank line is a row, in order
    good = [want for want in expected if isinstance(want, dict)]
    clean_data = tmp_path / "clean.jsonl"
    clean_data.write_text("".join(json.dumps(row) + "\n" for row in good))
    clean = tmp_path / "clean.parquet"
    cli(score_args(clean_data, model_dir, clean), capsys)
    clean_rows = iter(rows_of(clean))
    for index, (kind, want, got) in enumerate(zip(kinds, expected, table)):
        if isinstance(want, dict):
            assert got["status"] == "ok", (kind, got["error"])
            assert_same_scores([got], [next(clean_rows)])
        else:
            assert got["status"] == "error" and want in got["error"], (kind, want, got["error"])
            assert got["logp_chosen"] is None and got["logp_rejected"] is None
            if kind == "lone surrogate in the id":
                assert got["id"] == str(index)  # an id that is no Unicode text: the row's index


def kwise(i, **fields):
    return {"id": f"k{i}", "prompt": f"Q: {i}+1=?\nA:", "completions": [f" {i + 1}", f" {i}", f" {i + 2}"],
            "scores": [3, 1, 2], **fields}


K_ROWS = [  # (kind, row, a good row (None) or the error's text)
    ("plain", kwise(0), None),
    ("two completions", kwise(1, completions=[" 2", " 3"], scores=[1, 0]), None),
    ("tied scores", kwise(2, scores=[1, 1, 1]), None),
    ("float scores", kwise(3, scores=[0.5, -1e30, 2.25]), None),
    ("completions a string", kwise(4, completions=" 5"), "field 'completions' must be a list of at least 2"),
    ("one completion", kwise(5, completions=[" 6"], scores=[1]), "field 'completions' must be a list of at least 2"),
    ("a completion a number", kwise(6, completions=[" 7", 8, " 9"]), "field 'completions[1]' must be a string"),
    ("a completion null", kwise(7, completions=[" 7", None, " 9"]), "completions[1]"),
    ("an empty completion", kwise(8, completions=[" 7", "", " 9"]), "empty or whitespace-only completion"),
    ("fewer scores", kwise(9, scores=[1, 2]), "'scores' must be a list of 3 finite numbers"),
    ("a score text", kwise(10, scores=[1, "a", 2]), "'scores' must be a list of 3 finite numbers"),
    ("a score NaN", kwise(11, scores=[1, float("nan"), 2]), "'scores' must be a list of 3 finite numbers"),
    ("a score infinite", kwise(12, scores=[1, float("inf"), 2]), "'scores' must be a list of 3 finite numbers"),
    ("scores null", kwise(13, scores=None), "'scores'"),
    ("no prompt: the implicit format", {k: v for k, v in kwise(14).items() if k != "prompt"}, None),
    ("prompt null", kwise(15, prompt=None), "field 'prompt' is null"),
]


def test_hostile_kwise_rows(model_dir, tmp_path, capsys):
    """K completions per prompt (--completions-col): bad rows are errors in place, good rows equal a clean run."""
    args = ["--completions-col", "completions", "--scores-col", "scores"]
    data = tmp_path / "k.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for _, row, _ in K_ROWS))  # NaN, Infinity: Python's JSON
    out = tmp_path / "k.parquet"
    cli(score_args(data, model_dir, out, *args, "--chunk-rows", 4), capsys)
    clean = tmp_path / "clean.parquet"
    cli(score_args(_write_jsonl(tmp_path / "c.jsonl", [row for _, row, want in K_ROWS if want is None]), model_dir,
                   clean, *args), capsys)
    table, clean_rows = rows_of(out), iter(rows_of(clean))
    assert [r["id"] for r in table] == [row["id"] for _, row, _ in K_ROWS]
    for (kind, row, want), got in zip(K_ROWS, table):
        if want is None:
            c = next(clean_rows)
            assert got["status"] == "ok" and got["n_tokens"] == c["n_tokens"], (kind, got)
            assert got["human_scores"] == c["human_scores"] == [float(x) for x in row["scores"]], (kind, got)
            assert got["logps"] == pytest.approx(c["logps"], rel=1e-6, abs=1e-6), (kind, got, c)
        else:
            assert got["status"] == "error" and want in got["error"] and got["logps"] is None, (kind, got)


VOTE_PROMPT = "Q: 1+1=?\nA:"


def vote(pid, v, x=" 2", y=" 3", prompt=VOTE_PROMPT):
    return {"pid": pid, "prompt": prompt, "x": x, "y": y, "v": v}


GROUPS = [  # (kind, its rows, the error's text or None: a good pair)
    ("two votes, one with the candidates swapped", [vote("a", 1), vote("a", 1, " 3", " 2")], None),
    ("a bad vote", [vote("b", "x"), vote("b", 2)], "'v': 'x' is not a vote"),
    ("prompts that disagree", [vote("c", 1), vote("c", 1, prompt="other")], "their prompts differ"),
    ("a null key", [vote(None, 1)], "field 'pid' is null"),
    ("a list as the key", [vote(["l"], 2)], None),
    ("a lone surrogate as the key", [vote("\ud800", 1)], None),
    ("no key", [{k: v for k, v in vote("d", 1).items() if k != "pid"}], "missing field 'pid'"),
]


def test_hostile_vote_groups(model_dir, tmp_path, capsys):
    """--group-by: one output row per pair, in the order of its first row; a pair with a bad row is an error
    naming it, a good pair equals a clean run of the good pairs alone."""
    args = ["--group-by", "pid", "--vote-cols", "v", "--chosen-col", "x", "--rejected-col", "y"]
    out, clean = tmp_path / "g.parquet", tmp_path / "clean.parquet"
    cli(score_args(_write_jsonl(tmp_path / "g.jsonl", [r for _, rows, _ in GROUPS for r in rows]), model_dir, out,
                   *args, "--chunk-rows", 3), capsys)
    cli(score_args(_write_jsonl(tmp_path / "c.jsonl", [r for _, rows, want in GROUPS if want is None for r in rows]),
                   model_dir, clean, *args), capsys)
    table, clean_rows = rows_of(out), iter(rows_of(clean))
    firsts = [sum(len(rows) for _, rows, _ in GROUPS[:k]) for k in range(len(GROUPS))]
    assert [r["id"] for r in table] == [str(i) for i in firsts]  # no id column: each pair's first row
    for (kind, rows, want), got in zip(GROUPS, table):
        if want is None:
            c = next(clean_rows)
            assert {k: got[k] for k in ("status", "n_votes", "alpha", "reoriented", "n_chosen")} == \
                {k: c[k] for k in ("status", "n_votes", "alpha", "reoriented", "n_chosen")}, (kind, got, c)
            assert got["status"] == "ok" and got["n_votes"] == len(rows), (kind, got)
            assert (got["logp_chosen"], got["logp_rejected"]) == pytest.approx((c["logp_chosen"], c["logp_rejected"]),
                                                                               rel=1e-6, abs=1e-6)
        else:
            assert got["status"] == "error" and want in got["error"], (kind, got)


# ---------------------------------------------------------------- files

def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [pair(i) for i in range(5)]


def _file(kind: str, folder: Path):
    """(the --data path, and either ("ok", the good rows it holds, then the errors of the rows after
    them), or ("errors", needle, n rows: all errors), or ("refused", needle))."""
    text = "".join(json.dumps(r) + "\n" for r in GOOD)
    jsonl = folder / "d.jsonl"
    if kind == "empty file":
        jsonl.write_bytes(b"")
        return jsonl, ("ok", [])
    if kind == "blank lines only":
        jsonl.write_text("\n \n\t\n")
        return jsonl, ("ok", [])
    if kind == "null lines only":
        jsonl.write_text("null\nnull\nnull\n")
        return jsonl, ("errors", "a JSON null, not an object", 3)
    if kind == "BOM and CRLF":
        jsonl.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
        return jsonl, ("ok", GOOD)
    if kind == "gzip":
        path = folder / "d.jsonl.gz"
        path.write_bytes(gzip.compress(text.encode()))
        return path, ("ok", GOOD)
    if kind == "truncated gzip":
        path = folder / "d.jsonl.gz"
        blob = gzip.compress((text * 50).encode())
        path.write_bytes(blob[:len(blob) // 2])
        return path, ("refused", "unreadable after")
    if kind == "not gzip":
        path = folder / "d.jsonl.gz"
        path.write_text(text)
        return path, ("refused", "gzip")
    if kind == "unknown extension":
        path = folder / "d.txt"
        path.write_text(text)
        return path, ("refused", "unknown file type")
    if kind == "device":
        return Path(os.devnull), ("refused", "not a regular file")
    if kind == "fifo":
        path = folder / "d.jsonl"
        os.mkfifo(path)
        return path, ("refused", "not a regular file")
    if kind == "symlink loop":
        jsonl.symlink_to(jsonl)
        return jsonl, ("refused", "cannot open")
    if kind == "dangling symlink":
        jsonl.symlink_to(folder / "gone.jsonl")
        return jsonl, ("refused", "cannot open")
    if kind == "missing file":
        return folder / "absent.jsonl", ("refused", "data file not found")
    if kind == "empty folder":
        path = folder / "empty"
        path.mkdir()
        return path, ("refused", "cannot load dataset")
    if kind == "JSON array with BOM":
        path = folder / "d.json"
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD, indent=1).encode())
        return path, ("ok", GOOD)
    if kind == "JSON array with a key given twice":
        path = folder / "d.json"
        path.write_text(json.dumps(GOOD).replace('"id": "r1"', '"id": "r1", "id": "x"'))
        return path, ("refused", "invalid JSON (key 'id' appears twice in one object)")
    if kind == "JSON array unclosed":
        path = folder / "d.json"
        path.write_text(json.dumps(GOOD)[:-1])
        return path, ("refused", "invalid JSON")
    if kind == "JSON array of non-objects":
        path = folder / "d.json"
        path.write_text(json.dumps([None, 3, "x", [1]]))
        return path, ("errors", "row is a JSON", 4)
    if kind == "pretty-printed object":
        path = folder / "d.json"
        path.write_text(json.dumps(GOOD[0], indent=2))
        return path, ("ok", GOOD[:1])  # one JSON document, one row (not JSON lines broken at every line)
    csv_text = "id,prompt,chosen,rejected\n" + "".join(
        f'{r["id"]},"{r["prompt"]}",{r["chosen"]},{r["rejected"]}\n' for r in GOOD)  # a quoted newline in each
    if kind == "CSV with BOM and quoted newlines":
        path = folder / "d.csv"
        path.write_bytes(b"\xef\xbb\xbf" + csv_text.encode())
        return path, ("ok", GOOD)
    if kind == "CSV with an invalid byte":
        path = folder / "d.csv"
        path.write_bytes(csv_text.encode().replace(b"Q: 1", b"Q: \xff", 1))
        return path, ("refused", "invalid UTF-8 on line 4")
    if kind == "CSV with a short record":
        path = folder / "d.csv"
        path.write_text(csv_text + "x,y\n")
        return path, ("ok", GOOD, f"line {2 * len(GOOD) + 2}: 2 fields where the header has 4")
    if kind == "CSV header naming a column twice":
        path = folder / "d.csv"
        path.write_text("prompt,chosen,chosen\na,b,c\n")
        return path, ("refused", "names a column twice")
    if kind == "TSV":
        path = folder / "d.tsv"
        path.write_text("id\tprompt\tchosen\trejected\n" + "".join(
            f'{r["id"]}\t"{r["prompt"]}"\t{r["chosen"]}\t{r["rejected"]}\n' for r in GOOD))
        return path, ("ok", GOOD)
    if kind == "Parquet":
        path = folder / "d.parquet"
        pq.write_table(pa.Table.from_pylist(GOOD), path)
        return path, ("ok", GOOD)
    if kind == "Parquet without its footer":
        path = folder / "d.parquet"
        pq.write_table(pa.Table.from_pylist(GOOD), path)
        path.write_bytes(path.read_bytes()[:-20])
        return path, ("refused", "not a readable Parquet file")
    if kind == "Parquet with a numeric column":
        path = folder / "d.parquet"
        pq.write_table(pa.Table.from_pylist([{**r, "chosen": i} for i, r in enumerate(GOOD)]), path)
        return path, ("errors", "field 'chosen' must be a string", len(GOOD))
    raise ValueError(kind)


FILES = ["empty file", "blank lines only", "null lines only", "BOM and CRLF", "gzip", "truncated gzip", "not gzip",
         "unknown extension", "device", "fifo", "symlink loop", "dangling symlink", "missing file", "empty folder",
         "JSON array with BOM", "JSON array with a key given twice", "JSON array unclosed", "JSON array of non-objects", "pretty-printed object",
         "CSV with BOM and quoted newlines", "CSV with an invalid byte", "CSV with a short record",
         "CSV header naming a column twice", "TSV", "Parquet", "Parquet without its footer",
         "Parquet with a numeric column"]


@pytest.fixture(scope="module")
def clean_good(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    out = folder / "clean.parquet"
    assert main(score_args(str(_write_jsonl(folder / "d.jsonl", GOOD)), str(model_dir), str(out))) == 0
    return rows_of(out)


@pytest.mark.parametrize("kind", FILES)
def test_hostile_files(model_dir, clean_good, tmp_path, capsys, kind):
    data, want = _file(kind, tmp_path)
    out = tmp_path / "s.parquet"
    code, err = cli(score_args(data, model_dir, out), capsys)
    if want[0] == "ok":
        assert code == 0, err
        table = rows_of(out)
        assert len(table) == len(want[1]) + len(want[2:])
        assert_same_scores(table[:len(want[1])], clean_good[:len(want[1])])
        for row, needle in zip(table[len(want[1]):], want[2:]):
            assert row["status"] == "error" and needle in row["error"], row
    elif want[0] == "errors":
        table = rows_of(out)
        assert len(table) == want[2] and all(r["status"] == "error" and want[1] in r["error"] for r in table), table
        assert code == 2 and "none of the" in refusal(err)
    else:
        assert code == 2 and want[1] in refusal(err), err
        assert not out.exists() and not Path(f"{out}.parts").exists() and not Path(f"{out}.lock").exists()


# ---------------------------------------------------------------- options

def _other_vocab_model(folder: Path) -> Path:
    model = tiny_model("llama", seed=2)
    model.resize_token_embeddings(60)
    model.save_pretrained(folder / "vocab60")
    build_tokenizer().save_pretrained(folder / "vocab60")
    return folder / "vocab60"


OPTIONS = {  # kind: (extra arguments, or a function of the folder giving them; the refusal's text)
    "device meta": (["--device", "meta"], "--device meta"),
    "device past the GPUs": (["--device", "cuda:99"], "--device cuda:99"),
    "max length 1": (["--max-length", "1"], "--max-length 1"),
    "chunk rows 0": (["--chunk-rows", "0"], "--chunk-rows"),
    "limit 0": (["--limit", "0"], "--limit"),
    "max tokens per batch 0": (["--max-tokens-per-batch", "0"], "--max-tokens-per-batch"),
    "unknown prompt column": (["--prompt-cols", "question"], "unknown column(s) 'question'"),
    "unknown id column": (["--id-col", "uid"], "unknown column(s) 'uid'"),
    "unknown vote coding": (["--vote-coding", "stars"], "--vote-coding"),
    "unknown format": (["--format", "nope"], "--format"),
    "unknown dtype": (["--dtype", "float64"], "--dtype"),
    "group by without votes": (["--group-by", "id"], "--group-by"),
    "tp without torchrun": (["--tp", "2"], "--tp 2 needs a torchrun job"),
    "K-wise column on pairs": (["--completions-col", "answers"], "unknown column(s) 'answers'"),
    "chat template missing": (lambda f: ["--chat-template", f / "none.jinja"], "cannot read chat template"),
    "chat template syntax error": (lambda f: ["--chat-template", _text(f / "t.jinja", "{% for %}")], "t.jinja, line 1"),
    "chat template empty": (lambda f: ["--chat-template", _text(f / "t.jinja", " \n")], "t.jinja is empty"),
    "chat template not UTF-8": (lambda f: ["--chat-template", _bytes(f / "t.jinja", b"\xff{{ x }}")], "not UTF-8"),
    "tokenizer folder without a tokenizer": (lambda f: ["--tokenizer", _folder(f / "tok")], "no tokenizer file"),
    "tokenizer that is a file": (lambda f: ["--tokenizer", _text(f / "tok.json", "{}")], "is a file"),
    "reference of another vocabulary": (lambda f: ["--ref-model", _other_vocab_model(f)], "must share a vocabulary"),
    "out is a folder": (lambda f: ["--out", _folder(f / "outdir")], "is a directory"),
    "out in a missing folder": (lambda f: ["--out", f / "no" / "s.parquet"], "does not exist"),
    "out is the data": (lambda f: ["--out", f / "d.jsonl"], "is, is inside or contains the input --data"),
    "empty data (an unset variable)": (["--data", ""], "argument --data: is empty"),
    "empty model": (["--model", ""], "argument --model: is empty"),
    "empty out": (["--out", ""], "argument --out: is empty"),
    "empty tokenizer": (["--tokenizer", ""], "argument --tokenizer: is empty"),
    "split of a file": (["--split", "test"], "--split test: "),
    "subset of a file": (["--subset", "en"], "--subset en: "),
    "strict with a bad row": (lambda f: ["--strict", "--data", _write_jsonl(f / "bad.jsonl", [GOOD[0], {"x": 1}])],
                              "missing field 'chosen' (--strict)"),
}


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_hostile_options_are_refused_in_one_line(model_dir, tmp_path, capsys, kind):
    extra, needle = OPTIONS[kind]
    extra = extra(tmp_path) if callable(extra) else extra
    data = _write_jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "s.parquet"
    code, err = cli(score_args(data, model_dir, out, *extra), capsys)
    assert code == 2 and needle in refusal(err), err
    assert not list(tmp_path.glob("s.parquet*")) and not list(tmp_path.glob("*.lock"))


LEFTOVERS = {  # kind: (what lies beside --out before the run, the refusal's text)
    "parts folder that is a file": ("s.parquet.parts", "file", "s.parquet.parts is a file"),
    "sidecar that is a folder": ("s.parquet.meta.json", "folder", "s.parquet.meta.json is a folder"),
    "lock that is a folder": ("s.parquet.lock", "folder", "names no owner"),
    "empty lock": ("s.parquet.lock", "file", "names no owner"),
    "parts of another run": ("s.parquet.parts", "folder", "pass --resume"),
}


@pytest.mark.parametrize("kind", list(LEFTOVERS))
def test_hostile_leftovers_beside_the_output_are_refused_before_scoring(model_dir, tmp_path, capsys, kind):
    """Refused in one line before any row is scored (a sidecar path that was a folder used to fail after the
    scoring, saying to free space and resume), and left as they were."""
    name, what, needle = LEFTOVERS[kind]
    (tmp_path / name).mkdir() if what == "folder" else (tmp_path / name).write_text("")
    out = tmp_path / "s.parquet"
    code, err = cli(score_args(_write_jsonl(tmp_path / "d.jsonl", GOOD), model_dir, out), capsys)
    assert code == 2 and needle in refusal(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d.jsonl", name])
    assert (tmp_path / name).is_dir() == (what == "folder")


def _analysis_case(kind: str, table: Path, folder: Path) -> tuple[list, str]:
    """(the command's arguments, the refusal's text) of one hostile analyze or merge invocation."""
    if kind == "summary over the table":
        return ["analyze", table, "--out", table], "--out"
    if kind == "pair table over a link to the table":
        (folder / "link.parquet").symlink_to(table)
        return ["analyze", table, "--pairs-out", folder / "link.parquet"], "is, is inside or contains the input scores"
    if kind == "summary over the pair table":
        return ["analyze", table, "--pairs-out", folder / "p.parquet", "--out", folder / "." / "p.parquet"], \
            "both name"
    if kind == "summary over the reference table":
        return ["analyze", table, "--ref-scores", table, "--out", table], "is, is inside or contains the input"
    if kind == "a Parquet file that is no score table":
        pq.write_table(pa.table({"a": [1]}), folder / "other.parquet")
        return ["analyze", folder / "other.parquet"], "not a prefrank score table"
    if kind == "text named .parquet":
        return ["analyze", _text(folder / "t.parquet", "hello")], "cannot read score table"
    if kind == "merge without parts":
        return ["merge", folder / "none.parquet"], "no parts to merge"
    if kind == "merge of an empty parts folder":
        (folder / "e.parquet.parts").mkdir()
        return ["merge", folder / "e.parquet"], "has no readable sidecar.json"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["summary over the table", "pair table over a link to the table",
                                  "summary over the pair table", "summary over the reference table",
                                  "a Parquet file that is no score table", "text named .parquet",
                                  "merge without parts", "merge of an empty parts folder"])
def test_hostile_analyze_and_merge_invocations(model_dir, tmp_path, capsys, kind):
    """Refused in one line, the score table untouched (a summary --out naming it used to replace it), and no
    lock left (an empty parts folder made merge fail with a traceback)."""
    table = tmp_path / "s.parquet"
    cli(score_args(_write_jsonl(tmp_path / "d.jsonl", GOOD[:2]), model_dir, table), capsys)
    before = table.read_bytes()
    args, needle = _analysis_case(kind, table, tmp_path)
    code, err = cli(args, capsys)
    assert code == 2 and needle in refusal(err), err
    assert table.read_bytes() == before and not list(tmp_path.glob("*.lock"))


@pytest.mark.parametrize("args", [["score", "--data", ""], ["analyze", "absent.parquet"]])  # argparse; InputError
def test_refusals_through_the_real_entry_point(args):
    """Exit 2 and one line from `python -m prefrank` itself (the in-process cli() reads argparse's exit)."""
    code, err = cli_process(args)
    assert code == 2 and refusal(err), err


def test_model_options_refused_in_one_line(model_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", GOOD)
    for args, needle in [(["score", "--data", data, "--out", tmp_path / "s.parquet"], "--data needs --model"),
                         (score_args(data, tmp_path / "absent", tmp_path / "s.parquet"), "model not found"),
                         (score_args(data, data, tmp_path / "s.parquet"), "is a file"),
                         (["analyze", tmp_path / "absent.parquet"], "absent.parquet")]:
        code, err = cli(args, capsys)
        assert code == 2 and needle in refusal(err), (args, err)


# ---------------------------------------------------------------- chat templates

TEMPLATE = (
    "{% if messages[0].content == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "{% if messages[0].content == 'escape' %}{{ messages[0].content.__class__.__mro__ }}{% endif %}"
    "{% if messages[0].content == 'loop' %}{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}"
    "{% endfor %}{% endif %}"
    "{% if messages[0].content == 'big' %}{{ 'x' * 30000000 }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}{{ 'Q' if m.role == 'user' else 'A' }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}")


def test_hostile_chat_templates_fail_their_rows_only(model_dir, tmp_path, capsys, monkeypatch):
    from prefrank import tokenization
    monkeypatch.setattr(tokenization, "RENDER_SECONDS", 1.0)  # the bound (10 s) made short for the test
    template = _text(tmp_path / "t.jinja", TEMPLATE)
    rows = [chat("1+2"), chat("tool"), chat("escape"), chat("loop"), chat("big"), chat("2+2")]
    needles = [None, "no tools here", "SecurityError", "took over 1 s", "over the limit", None]
    out = tmp_path / "s.parquet"
    cli(score_args(_write_jsonl(tmp_path / "d.jsonl", rows), model_dir, out, "--chat-template", template), capsys)
    clean = tmp_path / "clean.parquet"
    cli(score_args(_write_jsonl(tmp_path / "c.jsonl", [rows[0], rows[5]]), model_dir, clean, "--chat-template",
                   template), capsys)
    table = rows_of(out)
    assert len(table) == len(rows)
    for row, needle in zip(table, needles):
        assert (row["status"], needle is None or needle in (row["error"] or "")) == (
            "ok" if needle is None else "error", True), row
    got = [table[0], table[5]]
    for g in got:
        g["id"] = {"0": "0", "5": "1"}[g["id"]]  # the clean file numbers its two rows 0 and 1
    assert_same_scores(got, rows_of(clean))


# ---------------------------------------------------------------- faults

@pytest.fixture
def interrupt_at(monkeypatch):
    """interrupt_at(n, error): the run's n-th part write raises `error` (as a signal handler would)."""
    from prefrank.io import Parts
    real_write = Parts.write
    state = {"at": None, "error": KeyboardInterrupt, "written": 0}

    def write(self, *args, **kwargs):
        if state["written"] == state["at"]:
            state["at"] = None
            if state["error"] == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)  # its handler raises at the next bytecode
            else:
                raise state["error"]
        real_write(self, *args, **kwargs)
        state["written"] += 1

    monkeypatch.setattr(Parts, "write", write)

    def arm(n, error=KeyboardInterrupt):
        state.update(at=n, error=error, written=0)
    return arm


@pytest.mark.parametrize("fault", ["Ctrl-C", "SIGTERM", "damaged part", "parts without --resume", "stale lock",
                                   "live lock", "read-only output", "weights replaced, mtime kept",
                                   "data edited, mtime kept"])
def test_faults_stop_cleanly_and_resume_to_the_clean_table(model_dir, clean_good, tmp_path, capsys, interrupt_at,
                                                           fault):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    data = _write_jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "s.parquet"
    args = score_args(data, model, out, "--chunk-rows", 1)
    lock = Path(f"{out}.lock")
    if fault in ("Ctrl-C", "SIGTERM", "damaged part", "parts without --resume", "weights replaced, mtime kept",
                 "data edited, mtime kept"):
        interrupt_at(2, "SIGTERM" if fault == "SIGTERM" else KeyboardInterrupt)
        code, err = cli(args, capsys, codes=(130, 143))
        assert code == (143 if fault == "SIGTERM" else 130) and "--resume" in err and not lock.exists()
        parts = sorted(Path(f"{out}.parts").glob("part-*.parquet"))
        assert len(parts) == 2
        if fault == "damaged part":
            parts[1].write_bytes(parts[1].read_bytes()[:-30])
        if fault == "parts without --resume":
            code, err = cli(args, capsys)
            assert code == 2 and "--resume" in refusal(err)
        if fault == "weights replaced, mtime kept":
            weights = model / "model.safetensors"
            before = weights.stat()
            tiny_model("llama", seed=1).save_pretrained(tmp_path / "other")
            shutil.copyfile(tmp_path / "other" / "model.safetensors", weights)
            os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
            code, err = cli([*args, "--resume"], capsys)
            assert code == 2 and "model.safetensors of --model" in refusal(err)
            return
        if fault == "data edited, mtime kept":  # the same size too: one answer changed
            before = data.stat()
            data.write_text(data.read_text().replace('"chosen": " 4"', '"chosen": " 9"', 1))
            assert data.stat().st_size == before.st_size
            os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
            code, err = cli([*args, "--resume"], capsys)
            assert code == 2 and "contents of --data" in refusal(err)
            return
        code, err = cli([*args, "--resume"], capsys)
    elif fault in ("stale lock", "live lock"):
        pid = 1 if fault == "live lock" else _dead_pid()
        lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
        code, err = cli(args, capsys)
        if fault == "live lock":
            assert code == 2 and "locked by another run" in refusal(err) and lock.exists()
            return
        assert "taking over the stale lock" in err
    else:
        out.write_text("")
        out.chmod(0o444)
        code, err = cli(args, capsys)
        assert code == 2 and "read-only" in refusal(err)
        return
    assert code == 0, err
    assert not lock.exists() and not Path(f"{out}.parts").exists()
    assert_same_scores(rows_of(out), clean_good)


def _dead_pid() -> int:
    """A pid that no process has: a finished child's."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
