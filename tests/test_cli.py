"""`prefrank score` end to end: the table, the sidecar, bad rows, bad invocations."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from conftest import interrupted_at_chunk
from prefrank.cli import main
from prefrank.demo.default import build_tokenizer
from prefrank.io import Parts
from tiny_models import float64_logp, tiny_model


def read_sidecar(table) -> dict:
    """The sidecar's JSON as the file holds it (OUT.meta.json beside the table)."""
    return json.loads(open(f"{table}.meta.json").read())

GOOD = [{"id": f"g{i}", "prompt": f"Q: {i}+{i}=?\nA:", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"}
        for i in range(6)]


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.writelines(line + "\n" for line in raw_lines)
    return str(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two different tiny random-init Llamas with the character tokenizer, saved as safetensors."""
    paths = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"model{seed}")
        tiny_model("llama", seed=seed).save_pretrained(path)
        build_tokenizer().save_pretrained(path)
        paths.append(str(path))
    return paths


def run(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_embedded_default(default_cache, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    code, err = run(["score", "--out", str(out)], capsys)
    assert code == 0, err
    table = pq.read_table(out).to_pylist()
    data_path, model_path = default_cache
    rows = [json.loads(line) for line in open(data_path)]
    assert len(table) == len(rows) == 1000
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    assert all(r["status"] == "ok" for r in table)
    # the task's alpha is the raters' share for its chosen answer: the table's chosen is the raters' side
    assert [r["alpha"] for r in table] == [max(r["alpha"], 1 - r["alpha"]) for r in rows]
    assert [r["reoriented"] for r in table] == [r["alpha"] < 0.5 for r in rows]
    swapped = next(i for i, r in enumerate(rows) if r["alpha"] < 0.5)
    for r, t in [*zip(rows, table)][:3] + [(rows[swapped], table[swapped])]:
        chosen, rejected = (r["rejected"], r["chosen"]) if r["alpha"] < 0.5 else (r["chosen"], r["rejected"])
        assert t["logp_chosen"] == pytest.approx(float64_logp(model_path, r["prompt"], chosen), abs=1e-4)
        assert t["logp_rejected"] == pytest.approx(float64_logp(model_path, r["prompt"], rejected), abs=1e-4)
    meta = read_sidecar(out)
    assert meta["method"] == "auto" and meta["summary"]["rows"] == 1000 and meta["input"]["hash"].startswith("sha256:")
    methods = meta["summary"]["methods"]  # the one chunk of 1000 rows: one scoring, by whichever method auto chose
    assert sum(methods.values()) == 1 and set(methods) <= {"packed", "kv"}
    assert meta["model"]["class"] == "LlamaForCausalLM" and "torch" in meta["versions"]


def test_bad_rows_are_kept_in_order(model_dirs, tmp_path, capsys):
    bad = [{"prompt": "Q:", "chosen": " 1"}, {"prompt": "Q:", "chosen": " 1", "rejected": " 1"},
           {"prompt": "Q:", "chosen": 5, "rejected": " 1"}, {"prompt": "Q:", "chosen": "", "rejected": " 1"}]
    data = write_jsonl(tmp_path / "d.jsonl", GOOD[:2] + bad + GOOD[2:], raw_lines=["{oops", "[3]"])
    out = tmp_path / "s.parquet"
    code, err = run(["score", "--data", data, "--model", model_dirs[0], "--out", str(out)], capsys)
    assert code == 0, err
    table = pq.read_table(out).to_pylist()
    assert len(table) == len(GOOD) + len(bad) + 2
    assert [r["status"] for r in table] == ["ok"] * 2 + ["error"] * 4 + ["ok"] * 4 + ["error"] * 2
    errors = [r["error"] for r in table if r["status"] == "error"]
    for needle, message in zip(["missing field 'rejected'", "identical", "must be a string", "empty or whitespace",
                                "invalid JSON", "not an object"], errors):
        assert needle in message
    assert all(r["logp_chosen"] is None for r in table if r["status"] == "error")
    assert "6 ok, 6 errors" in err and "first error: row 2" in err
    code, err = run(["score", "--data", data, "--model", model_dirs[0], "--out", str(tmp_path / "x.parquet"),
                     "--strict"], capsys)
    assert code == 2 and "row 2 (id 2): missing field 'rejected' (--strict)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "s.parquet", "s.parquet.meta.json"]


def test_error_rows_keep_what_was_read_before_the_failure(model_dirs, tmp_path, capsys):
    """A labelled pair refused for its texts (identical or empty completions) keeps its alpha, votes, tie,
    orientation and multi-turn flag, as an ok row would have them; a K-wise row its human scores."""
    msg = lambda role, text: {"role": role, "content": text}  # noqa: E731
    rows = [{"prompt": "Q:", "chosen": " 1", "rejected": " 1", "votes": [0, 0, 1]},  # rejected side won 2 of 3
            {"prompt": "Q:", "chosen": "", "rejected": " 2", "alpha": 0.5},
            {"prompt": [msg("user", "hi")], "chosen": [msg("assistant", "a"), msg("user", "b"), msg("assistant", "c")],
             "rejected": [msg("assistant", "a"), msg("user", "b"), msg("assistant", "c")], "votes": [1]},
            GOOD[0]]  # a run with no ok row exits 2
    out = tmp_path / "s.parquet"
    code, err = run(["score", "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--model", model_dirs[0],
                     "--out", str(out), "--chat-template", str(_template(tmp_path))], capsys)
    assert code == 0, err
    table = pq.read_table(out).to_pylist()
    assert [r["status"] for r in table] == ["error"] * 3 + ["ok"]
    expected = [(2 / 3, 3, False, True, False), (0.5, None, True, False, False), (1.0, 1, False, False, True)]
    assert [(r["alpha"], r["n_votes"], r["tie"], r["reoriented"], r["multi_turn"]) for r in table[:3]] == expected
    kwise = [{"prompt": "Q:", "completions": [" 1", " 2", " 1"], "scores": [3, 1, 2]},
             {"prompt": "Q:", "completions": [" 1", " 2", " 3"], "scores": [3, 1, 2]}]
    code, err = run(["score", "--data", write_jsonl(tmp_path / "k.jsonl", kwise), "--model", model_dirs[0],
                     "--out", str(tmp_path / "k.parquet"), "--completions-col", "completions",
                     "--scores-col", "scores"], capsys)
    assert code == 0, err
    row = pq.read_table(tmp_path / "k.parquet").to_pylist()[0]
    assert row["status"] == "error" and "identical" in row["error"] and row["human_scores"] == [3.0, 1.0, 2.0]


def _template(folder):
    path = folder / "chat.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    return path


def test_reference_model_and_per_token(model_dirs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    policy, reference = model_dirs
    out = tmp_path / "s.parquet"
    code, err = run(["score", "--data", data, "--model", policy, "--ref-model", reference, "--out", str(out),
                     "--per-token"], capsys)
    assert code == 0, err
    table = pq.read_table(out).to_pylist()
    for row, r in zip(GOOD, table):
        assert r["logp_chosen"] == pytest.approx(float64_logp(policy, row["prompt"], row["chosen"]), abs=1e-4)
        assert r["ref_logp_rejected"] == pytest.approx(float64_logp(reference, row["prompt"], row["rejected"]),
                                                       abs=1e-4)
        assert r["n_chosen"] == len(row["chosen"]) == len(r["token_logps_chosen"])
        assert sum(r["ref_token_logps_chosen"]) == pytest.approx(r["ref_logp_chosen"], abs=1e-4)


def test_methods_match_naive(model_dirs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    tables = {}
    runs = {"kv": ["--method", "kv"], "packed": ["--method", "packed"], "naive": ["--method", "naive"],
            "compiled": ["--compile"]}
    for name, args in runs.items():
        out = tmp_path / f"{name}.parquet"
        assert run(["score", "--data", data, "--model", model_dirs[0], "--out", str(out), *args], capsys)[0] == 0
        tables[name] = pq.read_table(out).to_pylist()
    sidecar = read_sidecar(tmp_path / "compiled.parquet")
    assert sidecar["options"]["compile"] and set(sidecar["summary"]["methods"]) == {"packed"}
    for method in ("kv", "packed", "compiled"):
        for a, b in zip(tables[method], tables["naive"]):
            assert a["logp_chosen"] == pytest.approx(b["logp_chosen"], abs=1e-4)
            assert a["logp_rejected"] == pytest.approx(b["logp_rejected"], abs=1e-4)


def test_parquet_input_column_mapping_and_limit(model_dirs, tmp_path, capsys):
    import pyarrow as pa
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "v1": 1, "v2": 0} for r in GOOD]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    out = tmp_path / "s.parquet"
    code, err = run(["score", "--data", str(tmp_path / "d.parquet"), "--model", model_dirs[0], "--out", str(out),
                     "--prompt-cols", "q", "--chosen-col", "good", "--rejected-col", "bad", "--vote-cols", "v1,v2",
                     "--limit", "4"], capsys)
    assert code == 0, err
    table = pq.read_table(out).to_pylist()
    assert [r["id"] for r in table] == ["0", "1", "2", "3"] and all(r["alpha"] == 0.75 for r in table)
    assert table[1]["logp_chosen"] == pytest.approx(
        float64_logp(model_dirs[0], GOOD[1]["prompt"], GOOD[1]["chosen"]), abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl", "--model", "M"], "data file not found: missing.jsonl"),
    (["--data", "D", "--model", "./no/such/model"], "model not found: ./no/such/model"),
    (["--data", "D"], "--data needs --model"),
    (["--data", "D", "--model", "M", "--chosen-col", "nope"], "unknown column(s) 'nope'"),
    (["--data", "D", "--model", "M", "--ref-model", "/no/ref"], "model not found: /no/ref"),
    (["--data", "D", "--model", "M", "--method", "kv", "--compile"], "--method kv cannot score with"),
    (["--data", "D", "--model", "M", "--group-by", "prompt"],
     "--group-by pools the votes of a pair's rows: it needs vote columns (--vote-cols) and pairs (not "
     "--completions-col)"),
    (["--data", "D", "--model", "M", "--tokenization", "trl", "--append-eos"],
     "--append-eos with --tokenization trl: that mode appends the EOS text itself"),
    (["--data", "D", "--model", "M", "--max-length", "1"], "--max-length 1: a scored sequence needs at least"),
])
def test_bad_invocations_exit_2_with_one_line(model_dirs, tmp_path, capsys, args, message):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    args = [data if a == "D" else model_dirs[0] if a == "M" else a for a in args]
    code, err = run(["score", "--out", str(tmp_path / "s.parquet"), *args], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_pickled_weights_need_a_flag(tmp_path, capsys):
    path = tmp_path / "pickled"
    model = tiny_model("llama")
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()  # keep only a pickled checkpoint
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    build_tokenizer().save_pretrained(path)
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    code, err = run(["score", "--data", data, "--model", str(path), "--out", str(tmp_path / "s.parquet")], capsys)
    assert code == 2 and "--allow-pickle" in err
    code, err = run(["score", "--data", data, "--model", str(path), "--out", str(tmp_path / "s.parquet"),
                     "--allow-pickle"], capsys)
    assert code == 0, err


def test_help_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "prefrank", "score", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--ref-model" in out.stdout and "embedded default" in out.stdout


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    """A tiny random-init Llama with a byte-level BPE whose merges cross prompt/completion boundaries."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import byte_level_bpe
    tokenizer = byte_level_bpe()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, initializer_range=0.3))
    path = tmp_path_factory.mktemp("bpe-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


MERGING = [{"id": "m0", "prompt": "Say: Hel", "chosen": "lo world!!", "rejected": "p me"},  # "Hel" + "lo" merge
           {"id": "m1", "prompt": "Q: 1+2=?\nA:", "chosen": " 3.", "rejected": " 4."},
           {"id": "m2", "prompt": "Wow!", "chosen": "? How are you?", "rejected": "! Well"},  # "!?" / "!!" merge
           {"id": "m3", "prompt": "The cat sat", "chosen": "... on the mat", "rejected": " on it"}]


def test_tokenization_modes_end_to_end(bpe_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    moved = sum(any(tok(r["prompt"] + r[k])["input_ids"][:len(tok(r["prompt"])["input_ids"])]
                    != tok(r["prompt"])["input_ids"] for k in ("chosen", "rejected")) for r in MERGING)
    assert moved >= 2  # the rows this is about
    data = write_jsonl(tmp_path / "m.jsonl", MERGING)
    out = tmp_path / "joint.parquet"
    code, err = run(["score", "--data", data, "--model", bpe_model_dir, "--out", str(out)], capsys)
    assert code == 0, err
    meta = read_sidecar(out)
    assert meta["tokenization"] == "joint" and meta["options"]["tokenization"] == "joint"
    assert meta["summary"]["boundary_moved"] == moved and f"{moved} rows had their prompt's last tokens" in err
    table = pq.read_table(out).to_pylist()
    for r, t in zip(MERGING, table):
        own = tok(r["prompt"])["input_ids"]
        full = {k: tok(r["prompt"] + r[k])["input_ids"] for k in ("chosen", "rejected")}
        shared = min(next((i for i, (a, b) in enumerate(zip(own, ids)) if a != b), len(own)) for ids in full.values())
        for k, other in (("chosen", "rejected"), ("rejected", "chosen")):
            expected = float64_logp(bpe_model_dir, r["prompt"], r[k], siblings=[r[other]])
            assert t[f"logp_{k}"] == pytest.approx(expected, abs=1e-4)
            assert t[f"n_{k}"] == len(full[k]) - shared
    # another mode is another run: --resume refuses to mix them
    Parts(str(tmp_path / "sep.parquet")).dir.mkdir()
    code, err = run(["score", "--data", data, "--model", bpe_model_dir, "--out", str(tmp_path / "sep.parquet"),
                     "--tokenization", "separate"], capsys)
    assert code == 2
    import shutil
    shutil.rmtree(Parts(str(tmp_path / "sep.parquet")).dir)
    args = ["score", "--data", data, "--model", bpe_model_dir, "--out", str(tmp_path / "sep.parquet"),
            "--chunk-rows", "2"]
    assert run(args + ["--tokenization", "separate"], capsys)[0] == 0
    separate = pq.read_table(tmp_path / "sep.parquet").to_pylist()
    assert [t["n_chosen"] for t in separate] == [len(tok(r["chosen"], add_special_tokens=False)["input_ids"])
                                                  for r in MERGING]
    assert read_sidecar(tmp_path / "sep.parquet")["summary"]["boundary_moved"] == 0
    code, err = run(["score", "--data", data, "--model", bpe_model_dir, "--out", str(tmp_path / "x.parquet"),
                     "--tokenization", "trl", "--append-eos"], capsys)
    assert code == 2 and "--append-eos with --tokenization trl" in err


def test_resume_refuses_another_tokenization(bpe_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "m.jsonl", MERGING)
    out = tmp_path / "s.parquet"
    args = ["score", "--data", data, "--model", bpe_model_dir, "--out", str(out), "--chunk-rows", "2"]
    with interrupted_at_chunk(1):
        assert main(args) == 130
    assert "rerun the same command with --resume" in capsys.readouterr().err  # Ctrl-C says how to go on
    code, err = run(args + ["--resume", "--tokenization", "trl"], capsys)
    assert code == 2 and "other --tokenization" in err
    code, err = run(args + ["--resume"], capsys)
    assert code == 0 and "resumed: 1 parts were on disk" in err  # part 0 was written before the crash


def test_an_interruption_before_any_part_says_there_is_nothing_to_resume(model_dirs, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the models load: no parts exist, so the message does not promise any; a --resume then
    says it found nothing and scored from the start."""
    import prefrank.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    args = ["score", "--data", write_jsonl(tmp_path / "d.jsonl", GOOD), "--model", model_dirs[0], "--out",
            str(tmp_path / "s.parquet")]
    with monkeypatch.context() as patch:
        patch.setattr(prefrank.pipeline, "load_run_tokenizer", interrupted)
        code, err = run(args, capsys)
    assert code == 130 and "before any part was written: nothing to resume" in err and "--resume" not in err
    code, err = run(args + ["--resume"], capsys)
    assert code == 0 and "--resume: no parts of an earlier run were on disk: scored from the start" in err


def test_an_internal_error_keeps_its_traceback(model_dirs, tmp_path, monkeypatch):
    """Only the user's mistakes (InputError) become one line: a bug elsewhere surfaces with its
    traceback, even when it is a ValueError."""
    import prefrank.scoring

    def broken(*args, **kwargs):
        raise ValueError("too many values to unpack (expected 2)")

    monkeypatch.setattr(prefrank.scoring, "score_packed", broken)
    monkeypatch.setattr(prefrank.scoring, "score_kv", broken)
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    with pytest.raises(ValueError, match="too many values to unpack"):  # not caught: Python prints its traceback
        main(["score", "--data", data, "--model", model_dirs[0], "--out", str(tmp_path / "s.parquet")])


@pytest.mark.parametrize("error", [MemoryError(), TypeError("unsupported operand"), AttributeError("no attr"),
                                   RuntimeError("CUDA out of memory")])
def test_out_of_memory_and_bugs_at_model_loading_keep_their_traceback(model_dirs, tmp_path, monkeypatch, error):
    """Loading a model turns only what libraries raise for a bad input into one line (OSError, ValueError,
    ...); out of memory or a bug in the loading code surfaces as it is."""
    import transformers

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", failing)
    with pytest.raises(type(error)):
        main(["score", "--data", write_jsonl(tmp_path / "d.jsonl", GOOD), "--model", model_dirs[0], "--out",
              str(tmp_path / "s.parquet")])


@pytest.mark.parametrize("damage, needle", [
    ("{not json", "JSONDecodeError"),  # json's error, a ValueError
    ({"type": "Nope"}, "untagged enum"),  # an unknown model: the tokenizers parser's bare Exception
])
def test_a_damaged_tokenizer_is_one_line(model_dirs, tmp_path, capsys, damage, needle):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(model_dirs[0], folder)
    if isinstance(damage, dict):
        damage = json.dumps({**json.loads((folder / "tokenizer.json").read_text()), "model": damage})
    (folder / "tokenizer.json").write_text(damage)
    code, err = run(["score", "--data", write_jsonl(tmp_path / "d.jsonl", GOOD), "--model", str(folder), "--out",
                     str(tmp_path / "s.parquet")], capsys)
    assert code == 2 and "cannot load tokenizer" in err and needle in err and "Traceback" not in err, err


def test_a_model_that_cannot_be_fingerprinted_is_an_error(model_dirs, tmp_path, monkeypatch):
    """A hub id missing from the local cache cannot be fingerprinted: --resume could not compare it, so
    the run says so (it used to record no files and resume over any model)."""
    from prefrank import models
    from prefrank.errors import InputError
    with pytest.raises(InputError, match="cannot fingerprint 'no-org/no-such-model'"):
        models.fingerprint("no-org/no-such-model")
    assert models.fingerprint(model_dirs[0])["model.safetensors"]["size"] > 0


def test_option_names_in_messages(capsys):
    """Library messages name options (<name>): the Python API reads the parameter's name, the
    command line its flag."""
    from prefrank.cli import option_flags
    from prefrank.errors import InputError
    from prefrank.tokenization import TokenizeOptions
    with pytest.raises(InputError) as caught:
        TokenizeOptions(tokenization="trl", append_eos=True)
    assert str(caught.value) == "append_eos with tokenization trl: that mode appends the EOS text itself"
    assert caught.value.text(option_flags()) == ("--append-eos with --tokenization trl: that mode appends the EOS "
                                                 "text itself")
    assert InputError("a <token> that is no option, and <model>").text(option_flags()) == \
        "a <token> that is no option, and --model"


@pytest.mark.parametrize("values, message", [
    (dict(chunk_rows=0), "chunk_rows must be positive, got 0"), (dict(limit=0), "limit must be positive, got 0"),
    (dict(limit=-3), "limit must be positive, got -3"),
    (dict(method="fast"), "method 'fast': expected one of auto, packed, kv, naive"),
    (dict(dtype="fp8"), "dtype 'fp8': expected one of auto, float32, bfloat16, float16")])
def test_options_built_in_python_check_what_the_parsers_check(values, message):
    """ScoreOptions(chunk_rows=0) used to write an empty table without a word (tryout)."""
    from prefrank.errors import InputError
    from prefrank.pipeline import ScoreOptions
    with pytest.raises(InputError) as caught:
        ScoreOptions(data="d.jsonl", model="m", **values)
    assert str(caught.value) == message
