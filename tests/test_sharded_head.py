"""Output heads held as DTensors (issue 24, point 4): FSDP2 with the lm_head as its own
`fully_shard` unit, 2 gloo ranks on the CPU (one torchrun for the module, tests/sharded_worker.py),
against one process computing the whole batch in plain float64 torch. Before ops/sharded.py every
case failed ("aten.mm.default got mixed torch.Tensor and DTensor")."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sharded_worker
from conftest import free_port

WORKER = Path(__file__).parent / "sharded_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), str(out)]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("case", ["dpo", "logprobs", "dpo_ref_hidden"])
def test_fsdp2_head_unit_equals_one_process(ranks, case):
    """Each rank's loss on its half of the batch averages to the one-process loss on the whole batch,
    and every parameter's gradient on every rank is a Shard(0) DTensor whose local shard is that
    rank's rows of the one-process gradient (the head's too: rank-averaged like FSDP2's own)."""
    loss, grads = sharded_worker.reference(case)
    got_loss = (ranks[0][case][0] + ranks[1][case][0]) / 2
    worst = {"loss": float((got_loss - loss).abs() / loss.abs())}
    for name, full in grads.items():
        for r in (0, 1):
            local, placements = ranks[r][case][1][name]
            assert placements == "(Shard(dim=0),)", (name, placements)
            expected = torch.chunk(full, 2)[r]
            worst[f"{name}@{r}"] = float((local - expected).abs().max() / full.abs().max())
    print("max relative error:", worst)
    assert len(worst) == 1 + 2 * 5  # embed, body weight and bias, lm_head weight and bias
    assert max(worst.values()) <= 1e-12


@pytest.mark.parametrize("layout", ["Shard(1)", "Partial", "Replicate", "2-D mesh"])
@pytest.mark.parametrize("entry", ["fused_linear_dpo_loss", "logprobs_from_hidden"])
def test_other_layouts_are_refused_naming_them(ranks, layout, entry):
    for r in (0, 1):
        message = ranks[r]["refusals"][layout, entry]
        print(r, message)
        assert message is not None and "\n" not in message and message.startswith("weight: a DTensor")
        named = {"Shard(1)": "Shard(dim=1)", "Partial": "Partial(", "Replicate": "Replicate()",
                 "2-D mesh": "2-D mesh"}[layout]
        assert named in message
