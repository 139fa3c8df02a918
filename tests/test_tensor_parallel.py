"""Tensor-parallel scoring (issue 18): `--tp 2` under torchrun with gloo on the CPU, real sharding
by transformers' tensor-parallel plans (DTensor), against one process scoring the same rows."""
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import free_port
from prefrank.cli import main
from prefrank.demo.default import build_tokenizer
from prefrank.demo.task import make_pairs
from prefrank.io import Parts
from tiny_models import tiny_model

FLOATS = ("logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected", "ches", "ches_normalized",
          "ref_ches", "ref_ches_normalized")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A Llama policy and a Qwen2 reference (untied head), random-init, 4 heads / 2 KV heads (split
    in two), vocabulary 101 (odd: the head's shards are uneven); 120 pairs, one bad row."""
    root = tmp_path_factory.mktemp("tp")
    for arch in ("llama", "qwen2"):
        tiny_model(arch).save_pretrained(root / arch)
        build_tokenizer().save_pretrained(root / arch)
    rows = make_pairs(120, seed=5)
    rows[17]["chosen"] = rows[17]["rejected"]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def score_args(root, out, *extra):
    return ["score", "--data", str(root / "pairs.jsonl"), "--model", str(root / "llama"), "--ref-model",
            str(root / "qwen2"), "--out", str(out), "--chunk-rows", "9", "--ches", *extra]


def torchrun(nproc, args, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "prefrank", *args]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, **kwargs)


def run(nproc, args):
    proc = torchrun(nproc, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]


def assert_same_table(got, expected):
    """Ids, statuses, errors and token counts equal; the sums within fp32 rounding (a sharded
    matmul adds its partial sums in another order): 1e-5 relative for log-probs, 1e-4 for CHES,
    a difference of two inner products of like size (the tolerance of test_ches)."""
    got, expected = pq.read_table(got).to_pydict(), pq.read_table(expected).to_pydict()
    assert got.keys() == expected.keys()
    worst = {}
    for name in expected:
        if name in FLOATS:
            a, b = (np.array(v, dtype=np.float64) for v in (got[name], expected[name]))
            assert np.array_equal(np.isnan(a), np.isnan(b)), name
            worst[name] = float(np.nanmax(np.abs(a - b) / np.maximum(1.0, np.abs(b))))
        else:
            assert got[name] == expected[name], name
    print("max relative difference:", worst)
    for name, err in worst.items():
        assert err < (1e-4 if "ches" in name else 1e-5), name


@pytest.mark.parametrize("method", ["packed", "kv", "naive"])
def test_tp2_equals_one_process(setup, tmp_path, method):
    single, sharded = tmp_path / "single.parquet", tmp_path / "tp.parquet"
    assert main(score_args(setup, single, "--method", method)) == 0
    run(2, score_args(setup, sharded, "--method", method, "--tp", "2"))
    assert_same_table(sharded, single)
    meta = json.loads(sharded.with_name("tp.parquet.meta.json").read_text())
    assert meta["world_size"] == 2 and meta["options"]["tp"] == 2 and meta["summary"]["methods"] == {method: 28}
    assert meta["summary"]["rows"] == 120 and meta["summary"]["errors"] == 1


def test_two_groups_of_tp2_equal_one_process(setup, tmp_path):
    """4 processes: 2 data-parallel groups of 2 tensor-parallel ranks, chunks alternating; 15 chunks,
    so the groups score 8 and 7 (a collective between the groups would hang the run)."""
    single, sharded = tmp_path / "single.parquet", tmp_path / "tp.parquet"
    assert main(score_args(setup, single, "--chunk-rows", "8")) == 0
    run(4, score_args(setup, sharded, "--tp", "2", "--chunk-rows", "8"))
    assert_same_table(sharded, single)


def test_kill_9_then_resume_under_tp(setup, tmp_path):
    out, clean = tmp_path / "s.parquet", tmp_path / "clean.parquet"
    proc = torchrun(2, score_args(setup, out, "--tp", "2", "--chunk-rows", "3"), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True)
    parts_dir = Parts(str(out)).dir
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts_dir.glob("part-*.json"))) < 8:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    assert not out.exists() and len(list(parts_dir.glob("part-*.json"))) >= 8
    run(2, score_args(setup, out, "--tp", "2", "--chunk-rows", "3", "--resume"))
    run(2, score_args(setup, clean, "--tp", "2", "--chunk-rows", "3"))
    resumed, expected = pq.read_table(out), pq.read_table(clean)
    for name in expected.column_names:  # the same layout and chunks: the same bits
        assert resumed.column(name).to_pylist() == expected.column(name).to_pylist(), name


def test_tp_needs_a_multiple_of_its_processes(setup, tmp_path, capsys):
    assert main(score_args(setup, tmp_path / "s.parquet", "--tp", "2")) == 2
    assert "--tp 2 needs a torchrun job of a multiple of 2 processes" in capsys.readouterr().err
    assert main(score_args(setup, tmp_path / "s.parquet", "--tp", "2", "--device", "cpu")) == 2
    assert "--device cannot be given with --tp" in capsys.readouterr().err


def test_a_model_without_a_tensor_parallel_plan_is_refused(setup, tmp_path):
    """GPT-2 has no tensor-parallel plan in transformers: one line, and the job fails."""
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    build_tokenizer().save_pretrained(tmp_path / "gpt2")
    args = ["score", "--data", str(setup / "pairs.jsonl"), "--model", str(tmp_path / "gpt2"), "--out",
            str(tmp_path / "s.parquet"), "--tp", "2"]
    proc = torchrun(2, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("prefrank score: error:")]
    # every rank that gets to say it says the same one line (torchrun may stop a rank once another failed)
    assert lines and all("has no `tp_plan`" in line for line in lines), stderr[-2000:]
    assert not (tmp_path / "s.parquet").exists()  # (the traceback on stderr is torchrun's, of its failed child)


def _plain_install() -> set[str]:
    """The distributions `pip install -e .` brings: setup.py's install_requires (read from the source, as
    an editable install's metadata may predate it), then their requirements, recursively (markers evaluated)."""
    import ast
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    tree = ast.parse((Path(__file__).parents[1] / "setup.py").read_text())
    declared = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                    for k in node.keywords if k.arg == "install_requires")
    wanted, todo = set(), [None]
    while todo:
        name = todo.pop()
        try:
            reqs = declared if name is None else requires(name) or []
        except PackageNotFoundError:  # optional here (its marker held, not installed)
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                key = canonicalize_name(req.name)
                if key not in wanted:
                    wanted.add(key)
                    todo.append(key)
    return wanted


def _plain_environment(root: Path) -> Path:
    """A virtual environment at `root` holding only the installed files of the plain install's distributions
    (links into this one): the interpreter finds nothing else, as on a machine that ran `pip install -e .`."""
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name
    plain = _plain_install() | {"prefrank"}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next((root / "lib").glob("python*/site-packages"))
    linked = set()
    for dist in distributions(path=[sysconfig.get_paths()["purelib"]]):  # installed here, not a source tree's
        if canonicalize_name(dist.metadata["Name"]) not in plain:
            continue
        for file in dist.files or []:
            top = file.parts[0]
            if top != ".." and top not in linked and (source := Path(dist.locate_file(top))).exists():
                (site / top).symlink_to(source)
                linked.add(top)
    return root / "bin" / "python"


def test_tp_runs_from_the_plain_install(setup, tmp_path):
    """`--tp 2` under torchrun from an environment holding only what `pip install -e .` installs: the test
    extra (TRL) pulls accelerate in, which --tp needs, so an undeclared dependency passes every other test
    and fails for a user."""
    python = _plain_environment(tmp_path / "venv")
    probe = "import importlib.util as u; print(u.find_spec('trl') is None, u.find_spec('accelerate') is not None)"
    seen = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path).stdout.split()
    print("plain install: trl absent, accelerate present:", seen)
    assert seen[0] == "True"  # the test extra is out: the environment is the plain install's
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "prefrank",
           *score_args(setup, tmp_path / "tp.parquet", "--tp", "2", "--limit", "12")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pq.read_table(tmp_path / "tp.parquet").num_rows == 12
