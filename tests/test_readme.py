"""The README opens with the two commands, and CI runs the second one verbatim."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.split("\n", 2)[2].startswith("```bash\n"), "the commands come first"
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("prefrank demo") and "pytest" in commands[1]
    assert commands[1].index("ruff check") < commands[1].index("pytest"), "the test command lints first"


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_the_python_section_runs_as_written(tmp_path, monkeypatch):
    """The README's Python example, pasted into a script, its placeholder paths pointing at a tiny
    model and real-shaped rows (a missing import once made it fail at the first model load)."""
    import json

    from prefrank.demo.default import build_tokenizer
    from prefrank.demo.task import make_pairs
    from tiny_models import tiny_model
    text = (ROOT / "README.md").read_text()
    code = text.split("### Python\n\n```python\n", 1)[1].split("```", 1)[0]
    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model)
    build_tokenizer().save_pretrained(model)
    rows = make_pairs(12, seed=1)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    code = code.replace('"path"', repr(str(model))).replace('"ref"', repr(str(model)))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "scores.parquet").exists() and len(scope["scores"].logps) == 2 * len(scope["items"]) > 0


def fsdp2_batch(pairs: slice):
    """The FSDP2 example's data: (input_ids, labels [2b, 8] of the given pairs of 4, chosen rows first,
    3 prompt tokens labelled -100; reference log-probs chosen [b], rejected [b])."""
    import torch

    from tiny_models import VOCAB
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (4, 2, 8), generator=g)[pairs]
    ref = (-30 - 5 * torch.rand(2, 4, generator=g, dtype=torch.float64))[:, pairs]
    ids = torch.cat([ids[:, 0], ids[:, 1]])
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels, ref[0], ref[1]


def test_the_fsdp2_section_runs_under_torchrun(tmp_path):
    """The README's FSDP2 loop as written (its model path pointing at a float64 tiny Llama), one step
    on 2 gloo ranks with 2 pairs each: the ranks' losses average to, and every parameter's gradient
    (gathered from its shards) on each rank equals, one process computing DPO in plain float64 torch
    from the model's own logits on all 4 pairs."""
    import os
    import subprocess
    import sys

    import torch
    import torch.nn.functional as F

    from conftest import free_port
    from tiny_models import tiny_model
    text = (ROOT / "README.md").read_text()
    code = text.split("### Use it in your trainer: FSDP2\n\n```python\n", 1)[1].split("```", 1)[0]
    model_dir = tmp_path / "model"
    tiny_model("llama").double().save_pretrained(model_dir)
    driver = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_readme import fsdp2_batch
rank = dist.get_rank()
loss, metrics = step(*fsdp2_batch(slice(2 * rank, 2 * rank + 2)))
grads = {{n: p.grad.full_tensor() for n, p in model.named_parameters()}}
torch.save({{"loss": loss.detach(), "grads": grads}}, {str(tmp_path)!r} + f"/rank{{rank}}.pt")
"""
    (tmp_path / "train.py").write_text(code.replace('"path"', repr(str(model_dir))) + driver)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(tmp_path / "train.py")]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    model = tiny_model("llama").double()
    ids, labels, ref_c, ref_r = fsdp2_batch(slice(None))
    logp = model(ids).logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    token = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    seq = token.sum(-1)
    loss = -F.logsigmoid(0.1 * ((seq[:4] - seq[4:]) - (ref_c - ref_r))).mean()
    loss.backward()
    loss = loss.detach()
    worst = {"loss": float(((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - loss).abs() / loss.abs())}
    for name, p in model.named_parameters():
        for r in (0, 1):
            got = ranks[r]["grads"][name]
            worst[f"{name}@{r}"] = float((got - p.grad).abs().max() / p.grad.abs().max())
    print("max relative error:", max(worst.values()), max(worst, key=worst.get))
    assert len(worst) == 1 + 2 * len(list(model.parameters()))
    assert max(worst.values()) <= 1e-10
