import os
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
HH = SHARED / "data" / "hh-rlhf"
PANDALM = SHARED / "data" / "pandalm" / "testset-v1.json"

needs_shared = pytest.mark.skipif(not STORIES.exists(), reason=f"../shared is absent ({SHARED}): real model and data tests skipped")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory):
    """A private cache for the embedded default model, trained once per test session."""
    root = tmp_path_factory.mktemp("prefrank-cache")
    old = os.environ.get("PREFRANK_CACHE")
    os.environ["PREFRANK_CACHE"] = str(root)
    from prefrank.demo.default import ensure_default
    paths = ensure_default(log=lambda m: None)
    yield paths
    if old is None:
        os.environ.pop("PREFRANK_CACHE", None)
    else:
        os.environ["PREFRANK_CACHE"] = old


def free_port() -> int:
    """A free loopback port for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def interrupted_at_chunk(chunk: int):
    """Within the block, writing part `chunk` of a score table raises KeyboardInterrupt (a Ctrl-C
    mid-run: the parts before it stay on disk for --resume)."""
    from prefrank.io import Parts
    real_write = Parts.write

    def crash(self, c, *args, **kwargs):
        if c == chunk:
            raise KeyboardInterrupt
        real_write(self, c, *args, **kwargs)

    Parts.write = crash
    try:
        yield
    finally:
        Parts.write = real_write
