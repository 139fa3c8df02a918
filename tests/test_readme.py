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
