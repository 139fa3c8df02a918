"""The vocabulary-parallel output head (issue 24, point 4): the head's weight split Shard(0) over 2
gloo ranks that hold the same batch, as tensor parallelism has it (one torchrun for the module,
tests/vocab_parallel_worker.py), against one process computing the full logits in plain float64
torch. On main before it, `vocab_parallel` did not exist and `prefrank score --tp` gathered the head."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vocab_parallel_worker as worker
from conftest import free_port
from tiny_models import tiny_model

WORKER = Path(__file__).parent / "vocab_parallel_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    tiny_model("llama").save_pretrained(out / "llama")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), str(out), str(out / "llama")]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def _compare(ranks, key, value, grads) -> dict:
    """Relative errors of every rank's result and gradients against the one-process ones: d hidden
    whole on each rank, d weight and d bias as that rank's Shard(0) rows, returned as DTensors."""
    worst = {}
    scale = lambda t: t.abs().max().clamp(min=torch.finfo(t.dtype).tiny)  # noqa: E731 (all 0 at a 1-token vocabulary)
    for r in (0, 1):
        got, got_grads = ranks[r][key]
        worst[f"value@{r}"] = float((got - value).abs().max() / scale(value))
        assert got_grads.keys() == grads.keys()
        for name, full in grads.items():
            local, placements = got_grads[name]
            rows = -(-full.shape[0] // 2)  # torch's Shard(0): ceil(V / 2) rows per rank, the last rank's maybe none
            expected = full if name == "hidden" else full[r * rows:(r + 1) * rows]
            assert placements == (None if name == "hidden" else "(Shard(dim=0),)"), (name, placements)
            assert local.shape == expected.shape, (name, local.shape, expected.shape)
            diff = (local - expected).abs()
            worst[f"{name}@{r}"] = float(diff.max() / scale(full)) if diff.numel() else 0.0
    print("max relative error:", worst)
    return worst


@pytest.mark.parametrize("case", list(worker.OP_CASES))
def test_logprobs_from_hidden_vocab_parallel_equals_one_process(ranks, case):
    """Log-probs (ignored rows 0; targets at both sides of the shards' border), and the gradients of
    hidden, the weight shard and the bias shard, with softcap and temperature, with several chunks, and
    with a one-token vocabulary (rank 1's shard empty)."""
    logp, grads = worker.op_reference(case)
    worst = _compare(ranks, ("op", case), logp, grads)
    assert max(worst.values()) <= 1e-12


@pytest.mark.parametrize("case", list(worker.DPO_CASES))
def test_fused_dpo_loss_vocab_parallel_equals_one_process(ranks, case):
    loss, grads = worker.dpo_reference(case)
    worst = _compare(ranks, ("dpo", case), loss, grads)
    assert max(worst.values()) <= 1e-12


@pytest.mark.parametrize("layout", ["plain", "Shard(1)", "Partial", "Replicate", "2-D mesh"])
@pytest.mark.parametrize("entry", ["fused_linear_dpo_loss", "logprobs_from_hidden"])
def test_other_layouts_are_refused_naming_them(ranks, layout, entry):
    named = {"plain": "a plain Tensor", "Shard(1)": "Shard(dim=1)", "Partial": "Partial(", "Replicate": "Replicate()",
             "2-D mesh": "2-D mesh"}[layout]
    for r in (0, 1):
        message = ranks[r]["refusals"][layout, entry]
        print(r, message)
        assert message is not None and "\n" not in message and message.startswith("weight: ")
        assert named in message and "vocab_parallel=True" in message


def test_what_needs_the_whole_vocabulary_is_refused(ranks):
    """sequence_stats (entropy, mean logit, argmax per token) is refused, not computed from one shard;
    a plain ref_weight is refused under its own name."""
    for r in (0, 1):
        stats, ref = ranks[r]["refusals"]["sequence_stats"], ranks[r]["refusals"]["ref_weight"]
        print(r, stats, ref, sep="\n")
        assert stats is not None and stats.startswith("sequence_stats: ") and "\n" not in stats
        assert ref is not None and ref.startswith("ref_weight: ") and "a plain Tensor" in ref


def test_opcheck_the_registered_ops(ranks):
    """torch.library.opcheck passed on both ranks for the op and its backward (the worker raises otherwise)."""
    for r in (0, 1):
        assert ranks[r]["opcheck"] == ["prefrank.vocab_parallel_logprobs",
                                       "prefrank.vocab_parallel_logprobs_backward"]


def test_score_tp_keeps_the_head_sharded(ranks):
    """`prefrank score --tp 2`'s CausalLM (runtime.load_lm) holds its rows of the head as a DTensor,
    not a gathered V × d copy, passes vocab_parallel=True to the op, and its head check passes."""
    for r, rows in ((0, 51), (1, 50)):
        got = ranks[r]["score_head"]
        print(r, got)
        assert got == {"type": "DTensor", "shape": (101, 32), "local_shape": (rows, 32),
                       "placements": "(Shard(dim=0),)", "vocab_parallel": True, "vocab_size": 101, "hidden_size": 32}
