"""How a prompt meets its answers (Columns.join, `--join`): the instruction/response formats render
the instruction as the user's message and each answer as the assistant's with the chat template, or
put a blank line between them without one; `--join TEXT` puts any text there; given as they are, an
answer glued to its prompt's last character is counted and warned about. Each scored number is
checked against an independent float64 forward on the text (or the chat template's ids) built here."""
import json

import pyarrow.parquet as pq
import pytest
import torch

from conftest import STORIES, needs_shared
from prefrank.cli import main
from tiny_models import float64_logp

pytestmark = needs_shared

INSTRUCTION = "Tell me about a man who was a weatherman."
GOOD, BAD = "He learned to read the clouds as a boy.", "Clouds are white."

# one row of each instruction/response format's published schema: (row, the prompt text it holds)
ROWS = {
    "llmbar": ({"input": INSTRUCTION, "output_1": GOOD, "output_2": BAD, "label": 1}, INSTRUCTION),
    "pandalm": ({"idx": 7, "instruction": INSTRUCTION, "input": "Keep it short.", "response1": GOOD,
                 "response2": BAD, "annotator1": 1, "annotator2": 1, "annotator3": 2},
                INSTRUCTION + "\n\nKeep it short."),
    "pku-saferlhf": ({"prompt": INSTRUCTION, "response_0": GOOD, "response_1": BAD, "better_response_id": 0,
                      "safer_response_id": 1}, INSTRUCTION),
    "auto-j-pairwise": ({"scenario": "default", "label": 0, "prompt": INSTRUCTION, "response 1": GOOD,
                         "response 2": BAD}, INSTRUCTION),
    "shp": ({"history": INSTRUCTION, "human_ref_A": GOOD, "human_ref_B": BAD, "labels": 1}, INSTRUCTION),
    "alpacafarm-human-preference": ({"instruction": INSTRUCTION, "input": "", "output_1": GOOD, "output_2": BAD,
                                     "preference": 1}, INSTRUCTION),
    "alpaca-eval-annotations": ({"instruction": INSTRUCTION, "output_1": GOOD, "generator_1": "a",
                                 "output_2": BAD, "generator_2": "b", "annotator": "gpt4", "preference": 1.0},
                                INSTRUCTION),
}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def score(tmp_path, name, rows, *extra) -> tuple[dict, dict, int]:
    data, out = write_jsonl(tmp_path / f"{name}.jsonl", rows), tmp_path / f"{name}.parquet"
    code = main(["score", "--data", data, "--model", str(STORIES), "--out", str(out), *extra])
    if code != 0:
        return {}, {}, code
    return pq.read_table(out).to_pydict(), json.loads(out.with_name(out.name + ".meta.json").read_text()), code


def chat_logp(prompt: str, completion: str, sibling: str, template: str = TEMPLATE) -> float:
    """Independent: transformers' apply_chat_template ids of [user] (generation prompt) and [user,
    assistant], the prompt being what they share with both answers' ids; one float64 forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.chat_template = template
    user = [{"role": "user", "content": prompt}]

    def ids(messages, generation=False):
        out = tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    full = ids(user + [{"role": "assistant", "content": completion}])
    other = ids(user + [{"role": "assistant", "content": sibling}])
    own = ids(user, generation=True)
    n = min(next((i for i, (a, b) in enumerate(zip(own, f)) if a != b), min(len(own), len(f))) for f in (full, other))
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0], -1)
    return sum(logp[j - 1, full[j]].item() for j in range(n, len(full)))


@pytest.mark.parametrize("name", ROWS)
def test_instruction_formats_put_a_blank_line_between_prompt_and_answer_without_a_template(name, tmp_path, capsys):
    row, prompt = ROWS[name]
    got, sidecar, code = score(tmp_path, name, [row], "--format", name)
    assert code == 0 and got["status"] == ["ok"]
    for column, answer, sibling in (("logp_chosen", GOOD, BAD), ("logp_rejected", BAD, GOOD)):
        expected = float64_logp(STORIES, prompt + "\n\n", answer, siblings=[sibling])
        print(f"{name} {column}: {got[column][0]:.6f} vs float64 {expected:.6f}")
        assert got[column][0] == pytest.approx(expected, abs=1e-4)
    assert sidecar["join"] == "\n\n" and sidecar["options"]["columns"]["join"] == "chat"
    err = capsys.readouterr().err
    assert f"read as format {name}; '\\n\\n' between a text prompt and each answer (join chat: the tokenizer has no " \
           "chat template)" in err
    assert "no space between" not in err


@pytest.mark.parametrize("name", ["llmbar", "pandalm"])
def test_instruction_formats_render_user_and_assistant_with_the_chat_template(name, tmp_path, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    row, prompt = ROWS[name]
    got, sidecar, code = score(tmp_path, name, [row], "--chat-template", str(template))
    assert code == 0 and got["status"] == ["ok"]
    for column, answer, sibling in (("logp_chosen", GOOD, BAD), ("logp_rejected", BAD, GOOD)):
        expected = chat_logp(prompt, answer, sibling)
        print(f"{name} {column}: {got[column][0]:.6f} vs float64 chat template {expected:.6f}")
        assert got[column][0] == pytest.approx(expected, abs=1e-4)
    assert sidecar["join"] == "chat"
    assert "rendered with the chat template" in capsys.readouterr().err


def test_a_template_that_puts_no_bos_first_is_counted_and_warned_about(tmp_path, capsys):
    """stories260K's tokenizer puts BOS before text: rows rendered by a template without
    {{ bos_token }} are scored as rendered (transformers' ids, no BOS) and counted; with it, not."""
    rows = [ROWS["llmbar"][0], {**ROWS["llmbar"][0], "input": "Say hi."}]
    for name, template, missing in (("bos", TEMPLATE, 0), ("nobos", TEMPLATE.removeprefix("{{ bos_token }}"), 2)):
        (tmp_path / f"{name}.jinja").write_text(template)
        got, sidecar, code = score(tmp_path, name, rows, "--chat-template", str(tmp_path / f"{name}.jinja"))
        assert code == 0 and sidecar["summary"]["no_bos"] == missing
        assert got["logp_chosen"][0] == pytest.approx(chat_logp(INSTRUCTION, GOOD, BAD, template), abs=1e-4)
        err = capsys.readouterr().err
        assert (f"\n{missing} rows were rendered by a chat template that puts no BOS token first" in err) == bool(missing)


def test_kwise_instruction_formats_join_too(tmp_path):
    answers = [GOOD, BAD, "Rain."]
    row = {"instruction": INSTRUCTION, "completions": [{"response": a, "overall_score": s}
                                                        for a, s in zip(answers, (9, 2, 5))]}
    got, sidecar, code = score(tmp_path, "uf", [row])
    assert code == 0 and sidecar["options"]["columns"]["format"] == "ultrafeedback"
    for k, answer in enumerate(answers):
        expected = float64_logp(STORIES, INSTRUCTION + "\n\n", answer, siblings=answers)
        assert got["logps"][0][k] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("join, text", [(" ", " "), ("\\n\\n", "\n\n"), ("\\tA: ", "\tA: ")])
def test_join_puts_its_text_between_explicit_columns(join, text, tmp_path):
    rows = [{"prompt": INSTRUCTION, "chosen": GOOD, "rejected": BAD}]
    got, sidecar, code = score(tmp_path, "explicit", rows, "--join", join)
    assert code == 0 and sidecar["join"] == text
    assert got["logp_chosen"][0] == pytest.approx(float64_logp(STORIES, INSTRUCTION + text, GOOD, [BAD]), abs=1e-4)


def test_answers_glued_to_their_prompt_are_counted_and_warned_about(tmp_path, capsys):
    """Given as they are (the default mapping): rows whose prompt ends in a non-space character and a
    completion starts with one are counted; a space on either side, or a join, is not glued."""
    rows = [{"prompt": "a weatherman.", "chosen": "He learned.", "rejected": "No."},      # glued
            {"prompt": "a weatherman. ", "chosen": "He learned.", "rejected": "No."},     # prompt ends in a space
            {"prompt": "a weatherman.", "chosen": " He learned.", "rejected": "\nNo."},   # both answers start with one
            {"prompt": "Q:", "chosen": " yes", "rejected": "no"}]                         # one answer glued
    expected = sum(not r["prompt"][-1].isspace() and any(not r[c][0].isspace() for c in ("chosen", "rejected"))
                   for r in rows)
    got, sidecar, code = score(tmp_path, "glued", rows)
    assert code == 0 and expected == 2 and sidecar["summary"]["glued"] == expected
    err = capsys.readouterr().err
    assert f"\n{expected} rows have a completion that follows its prompt's last character with no space" in err
    assert "read as the default mapping (the first row's columns match no format); text prompts and answers " \
           "concatenated as given" in err
    got, sidecar, code = score(tmp_path, "joined", rows, "--join", " ")
    assert code == 0 and sidecar["summary"]["glued"] == 0 and "no space between" not in capsys.readouterr().err


def test_a_join_that_cannot_apply_is_refused(tmp_path, capsys):
    hh = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}]
    assert score(tmp_path, "hh", hh, "--join", " ")[2] == 2
    assert "joins a prompt column to each answer, but the rows have none" in capsys.readouterr().err
    rows = [{"prompt": "Hi. ", "chosen": "Hi. Hello.", "rejected": "Hi. Go."}]
    assert score(tmp_path, "inc", rows, "--join", " ", "--completions-include-prompt")[2] == 2
    assert "already hold their prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        score(tmp_path, "esc", rows, "--join", "\\x")
    assert e.value.code == 2 and "unknown escape \\x" in capsys.readouterr().err
    chat = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "assistant", "content": "Go"}]}]
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    assert score(tmp_path, "chat", chat, "--join", " ", "--chat-template", str(template))[2] == 2  # no row ok
    got = pq.read_table(tmp_path / "chat.parquet").to_pydict()  # the table is written all the same
    assert got["status"] == ["error"]
    assert got["error"] == ["the join ' ' puts text between a text prompt and its answers; this row's are message "
                            "lists, which the chat template joins"]


def test_join_alone_keeps_the_format_detected(tmp_path, capsys):
    """--join says how, not where: given without --format, the format is still detected and its
    join replaced."""
    row, prompt = ROWS["llmbar"]
    got, sidecar, code = score(tmp_path, "llmbar", [row], "--join", " ")
    assert code == 0 and sidecar["options"]["columns"]["format"] == "llmbar" and sidecar["join"] == " "
    assert got["logp_chosen"][0] == pytest.approx(float64_logp(STORIES, prompt + " ", GOOD, [BAD]), abs=1e-4)
    assert "read as format llmbar (detected from the first row's columns); ' ' between" in capsys.readouterr().err
