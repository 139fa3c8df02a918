"""Loading causal LMs safely, and the adapter the scorer runs them through.

Safety: `trust_remote_code` is off unless asked for; weights load from safetensors only unless
pickled checkpoints are allowed explicitly. The adapter exposes what the KV-reuse scorer needs:
the decoder's final hidden states (post final norm) with an explicit cache, and the output head
as (weight, bias, softcap, temperature) so log-probs never need the full logits.
"""
import inspect
import os
from pathlib import Path

import torch
import xxhash

from prefrank.errors import InputError, bad_input
from prefrank.io import hash_file
from prefrank.options import option, options


class HeadError(InputError):
    """The model's logits are not the output head prefrank computes from its hidden states."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The files a tokenizer loads from (transformers' fast and slow tokenizers, SentencePiece, tiktoken):
# a folder with none of them holds no tokenizer, whatever else transformers' error then says
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "*.model", "*.spm", "vocab.*", "merges.txt",
                   "*.tiktoken")


@options
class LoadOptions:
    """How models and the tokenizer load: the options `score`, `sft` and `train` share."""
    tokenizer: str | None = option(None, "tokenizer folder or hub id", group="data and models", path=True,
                                   default_text="the policy model's")
    chat_template: str | None = option(None, "a Jinja chat template file for conversational rows, replacing the "
                                       "tokenizer's own (needed when it has none)", group="data and models", path=True)
    device: str = option("auto", "cpu, cuda, cuda:N", group="execution", decides_rows=False)
    trust_remote_code: bool = option(False, "allow models and tokenizers that run their own Python code",
                                     group="safety")
    allow_pickle: bool = option(False, "allow pickled (non-safetensors) weights, which can execute code when "
                                "loaded", group="safety")


def resolve_device(device: str) -> torch.device:
    """The torch device `device` names: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
    Other devices torch knows (meta, mps, xpu ...) are refused: the scorer's kernels and checks run
    on CPU and CUDA tensors only."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"<device> {device!r}: {e}") from None
    usable = "cpu" + (", cuda, " + ", ".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))
                      if torch.cuda.is_available() else "")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"<device> {device}: CUDA is not available on this machine (usable: {usable})")
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise InputError(f"<device> {device}: prefrank scores on {usable} (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"<device> {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(usable: {usable})")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"<dtype> {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_source(path: str, what: str):
    """A local path must exist and be a folder; anything else must look like a hub id ("org/name")."""
    if os.path.exists(path):
        if not os.path.isdir(path):  # transformers would take it for a hub id and try the network
            raise InputError(f"{what} {path} is a file: give the {what}'s folder (or a hub id)")
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise InputError(f"{what} not found: {path}")


def load_tokenizer(path: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer at `path`; `chat_template`: a Jinja file that replaces (or supplies) its chat
    template, for conversational data on tokenizers that have none."""
    from transformers import AutoTokenizer
    _check_source(path, "tokenizer")
    template = None
    if chat_template is not None:
        try:
            template = open(chat_template, encoding="utf-8").read()
        except OSError as e:
            raise InputError(f"cannot read chat template {chat_template}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise InputError(f"chat template {chat_template}: not UTF-8 text (invalid byte at offset {e.start})") \
                from None
        if not template.strip():  # else taken for no template at all, and every conversational row said to lack one
            raise InputError(f"chat template {chat_template} is empty")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        try:  # parsed in the sandbox transformers renders in: a syntax error is the invocation's, not every row's
            ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
        except jinja2.TemplateSyntaxError as e:
            raise InputError(f"chat template {chat_template}, line {e.lineno}: {e.message}") from None
    if os.path.isdir(path) and not any(f.is_file() for pattern in TOKENIZER_FILES
                                                 for f in Path(path).glob(pattern)):
        raise InputError(f"cannot load tokenizer {path!r}: the folder holds no tokenizer file (none of "
                         f"{', '.join(TOKENIZER_FILES)}): give the tokenizer's folder with <tokenizer>")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        if not bad_input(e):
            raise
        raise InputError(f"cannot load tokenizer {path!r}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def load_model(path: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
               allow_pickle: bool = False, distributed_config=None):
    """The model at `path`, in eval mode, on `device`; with a transformers `distributed_config`,
    sharded by the model's tensor-parallel plan, each process loading only its shards onto its own
    device (LOCAL_RANK's GPU, or the CPU)."""
    from transformers import AutoModelForCausalLM
    _check_source(path, "model")
    sharding = {} if distributed_config is None else {"distributed_config": distributed_config}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True,
            **sharding)
    except Exception as e:
        if not bad_input(e):
            raise
        message = " ".join(str(e).split())
        if "trust_remote_code" in message:
            hint = " (its own Python code runs only with <trust_remote_code>)"
        elif "safetensors" in message and not allow_pickle:
            hint = " (only safetensors weights load unless <allow_pickle>)"
        else:
            hint = ""
        raise InputError(f"cannot load model {path!r}{hint}: {type(e).__name__}: {message}") from None
    return (model if sharding else model.to(device)).eval()


def fingerprint(path: str) -> dict[str, dict]:
    """What identifies the files of a model or tokenizer (a local folder, or a hub id's snapshot in the
    local cache): each file's size and the 128-bit XXH3 hash of all its bytes, weights included, so
    other weights under the same path are told apart whatever their size and mtime (`cp -p`, `rsync
    -a`), and an identical copy elsewhere is the same model. XXH3, not sha256: it tells accidental
    replacements apart (not a forgery built to collide) at ~8 GB/s from the page cache, where sha256
    runs at ~1.2 GB/s and blake2b at ~0.4 GB/s on the development CPU (python -m bench.fingerprint,
    a 4.3 GB file: 0.5 s; ~2 s for 8B bf16 weights, which the run has just read to load them)."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download
        try:
            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception as e:  # a loaded hub model is in the cache: this one was loaded from elsewhere
            if not bad_input(e):
                raise
            raise InputError(f"cannot fingerprint {path!r}: no folder, and not in the local hub cache "
                             f"({type(e).__name__}); --resume could not tell whether it changed: give its "
                             f"folder") from None
    files = {}
    for file in sorted(folder.iterdir()):
        if file.name.startswith(".") or not file.is_file():
            continue
        files[file.name] = {"size": file.stat().st_size, "xxh3_128": hash_file(xxhash.xxh3_128(), file).hexdigest()}
    return files


def cache_argument(forward) -> str:
    """The name under which `forward` takes a KV cache: transformers renamed past_key_values to
    cache (deprecated in 5.2x, the old name removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _gathered(param):
    """A DTensor parameter's full value as a plain tensor on this process's device (else itself)."""
    from torch.distributed.tensor import DTensor
    if not isinstance(param, DTensor):
        return param
    with torch.no_grad():
        return param.full_tensor()


def _vocab_shards(param):
    """A head parameter split by vocabulary over a tensor-parallel group, as the vocabulary-parallel
    op takes it: a DTensor sharded Shard(0) on that group's 1-D mesh. transformers' plans leave it
    so; when FSDP2 replicates the groups (runtime.tensor_parallel_config), the mesh has more
    dimensions, over which it is replicated (or split over one rank), and the same local rows are
    seen on the tensor-parallel dimension alone. None for any other parameter or layout."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(param, DTensor):
        return None
    mesh, placements = param.device_mesh, tuple(param.placements)
    split = [i for i, p in enumerate(placements) if not p.is_replicate() and mesh.size(i) > 1]
    if len(split) != 1 or placements[split[0]] != Shard(0):
        return None
    if mesh.ndim == 1:
        return param
    return DTensor.from_local(param.to_local(), mesh[mesh.mesh_dim_names[split[0]]], [Shard(0)], run_check=False,
                              shape=param.shape, stride=param.stride())


class CausalLM:
    """A Hugging Face causal LM seen as decoder + output head.

    hidden(): [B, T] ids → [B, T, d] final hidden states, continuing from `cache` if given.
    logits(): the model's own full forward (for the naive oracle).
    head: weight [V, d], bias [V] or None, softcap, temperature — the op's arguments. With
    `tensor_parallel` (runtime.load_lm under --tp), weight and bias stay the head's vocabulary
    shards as DTensors (their shapes global) and head_kwargs asks the op for vocab_parallel.
    """

    def __init__(self, model, tensor_parallel: bool = False):
        self.model = model
        self.decoder = model.base_model
        head = model.get_output_embeddings()
        if head is None or not isinstance(head, torch.nn.Linear):
            raise HeadError(f"{type(model).__name__}: no linear output head")
        # Under tensor parallelism the head's weight is a vocabulary-sharded DTensor: the head runs
        # vocabulary-parallel on it (each process its shard's logits, the log-sum-exp all-reduced:
        # ops/vocab_parallel.py) on the decoder's replicated final hidden states, so no process
        # gathers V × d (2.1 GB for Llama 3 70B in bf16). Other DTensor heads are gathered.
        shards = [_vocab_shards(p) for p in (head.weight, head.bias)] if tensor_parallel else [None, None]
        self.vocab_parallel = shards[0] is not None and (head.bias is None or shards[1] is not None)
        self.weight, self.bias = shards if self.vocab_parallel else (_gathered(p) for p in (head.weight, head.bias))
        config = model.config.get_text_config()
        self.config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        # Cohere multiplies logits by logit_scale, Granite divides them by logits_scaling.
        self.temperature = (getattr(config, "logits_scaling", None) or 1.0) / (getattr(config, "logit_scale", None) or 1.0)
        self.vocab_size, self.hidden_size = self.weight.shape  # the head's input: the final hidden states' width
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self._cache_arg = cache_argument(self.decoder.forward)
        # What the packed and kv methods need to know of the attention (see scoring.resolve_method)
        self.attn_implementation = getattr(model.config, "_attn_implementation", None)
        sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        self.layer_kinds = set(getattr(config, "layer_types", None) or
                               ["sliding_attention" if sliding else "full_attention"])
        self.sliding_window = config.sliding_window if "sliding_attention" in self.layer_kinds else None
        # ALiBi biases (Falcon with alibi, BLOOM, MPT) are built from a 2-D padding mask
        self.alibi = bool(getattr(config, "alibi", False)) or config.model_type in ("bloom", "mpt")
        # What a token costs: matmul parameters per layer (the embeddings and the head left out) and
        # the width of its attention (scoring.packed_attention_overhead)
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
        embeddings = {id(p) for m in (model.get_input_embeddings(), head) for p in m.parameters()}
        body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
        self.matmul_params_per_layer = max(1, body // layers)
        self.attention_width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.compiled = False  # compile_blocks()
        from torch.distributed.fsdp import FSDPModule
        # FSDP2 wraps the layers when tensor-parallel groups replicate across data-parallel groups
        # (runtime.tensor_parallel_config)
        self._fsdp = any(isinstance(m, FSDPModule) for m in model.modules())

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def fsdp(self) -> bool:
        """The model is wrapped by FSDP2: its forward gathers parameters in step with the other processes."""
        return self._fsdp

    def no_autograd(self):
        """The context scoring runs in: inference_mode, or no_grad for a model FSDP2 wraps (its
        unsharding tracks version counters, which inference tensors lack)."""
        return torch.no_grad() if self._fsdp else torch.inference_mode()

    @property
    def head_kwargs(self) -> dict:
        """The head's arguments to ops.logprobs_from_hidden, beside hidden, weight and targets."""
        return dict(bias=self.bias, softcap=self.softcap, temperature=self.temperature,
                    vocab_parallel=self.vocab_parallel)

    def new_cache(self, layers=None):
        """A DynamicCache, empty or holding the given per-layer (keys, values)."""
        from transformers import DynamicCache
        return DynamicCache(ddp_cache_data=layers, config=self.config)

    def hidden(self, input_ids, attention_mask, position_ids, cache=None) -> torch.Tensor:
        kwargs = {self._cache_arg: cache, "use_cache": cache is not None}
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.last_hidden_state

    def logits(self, input_ids, attention_mask, with_hidden: bool = False):
        """The model's own logits [B, T, V]; `with_hidden`: (logits, the final hidden states that
        feed the head [B, T, d]) from the same forward."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         output_hidden_states=with_hidden)
        return (out.logits, out.hidden_states[-1]) if with_hidden else out.logits

    def compile_blocks(self, enabled: bool = True) -> "CausalLM":
        """torch.compile each repeated block of the decoder (its transformer layers), with dynamic
        shapes; `enabled=False` restores the eager blocks. Compiling the block rather than the whole
        model compiles one graph that all layers share (seconds instead of minutes) and survives the
        batch and length changing from call to call; it fuses what eager runs as separate
        memory-bound kernels (norms, rotary embeddings, activations, residual adds). Matmuls and
        attention stay the same kernels. The kv method cannot use it (unsupported() says why)."""
        lists = [m for m in self.decoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
                 and len({type(b) for b in m}) == 1]
        if not lists:
            raise InputError(f"{type(self.model).__name__}: no repeated blocks found to compile")
        for block in max(lists, key=len):
            if enabled:
                block.forward = torch.compile(block.forward, dynamic=True)
            else:
                vars(block).pop("forward", None)
        self.compiled = enabled
        return self

    def check_head(self, length: int = 8):
        """Refuse architectures whose logits are not the head this adapter knows (HeadError): the
        model's own log-softmax against the head applied to the hidden states, on a short input,
        like with like: dropout off, and both in the precision the caller runs (the model's dtype,
        and its autocast if one is active: a trainer's mixed precision), compared to what that
        precision's rounding of the logits allows."""
        from prefrank.ops.torch_backend import head_logits
        from prefrank.ops.vocab_parallel import shard, shard_log_softmax
        ids = torch.arange(length, device=self.device)[None] % self.vocab_size
        mask = torch.ones_like(ids)
        training = self.model.training
        self.model.eval()  # dropout would make the two forwards differ
        try:
            with self.no_autograd():
                logits = self.logits(ids, mask)[0].float()
                hidden = self.hidden(ids, mask, torch.arange(length, device=self.device)[None])[0]
                model, cols = torch.log_softmax(logits, -1), slice(None)
                if self.vocab_parallel:  # this process's columns of the vocabulary: its shard of the head
                    weight, first, group = shard("weight", self.weight)
                    head = shard_log_softmax(head_logits(hidden, weight, None if self.bias is None else
                                                         self.bias.to_local(), self.softcap, self.temperature), group)
                    cols = slice(first, first + weight.shape[0])
                else:
                    head = torch.log_softmax(head_logits(hidden, self.weight, self.bias, self.softcap,
                                                         self.temperature), -1)
        finally:
            self.model.train(training)
        # [the largest log-prob difference, whether the head's log-probs are finite], the same on every process
        diff = (head - model[:, cols]).abs()
        err = torch.stack([diff.max() if diff.numel() else diff.new_zeros(()), head.isfinite().all().float()])
        if self.vocab_parallel:
            err[1] = -err[1]  # MAX: the largest difference, and whether any process's shard is not finite
            torch.distributed.all_reduce(err, torch.distributed.ReduceOp.MAX, group=self.weight.device_mesh.get_group())
            err[1] = -err[1]
        err, finite = err.tolist()
        if not (logits.isfinite().all() and finite):  # an overflow says nothing of the head
            raise InputError(f"{type(self.model).__name__}: its log-probs are not finite in "
                             f"{str(self.weight.dtype).removeprefix('torch.')} on a short probe input (it overflows "
                             f"in this dtype): use <dtype> bfloat16 or float32")
        dtype, tol = self._head_tolerance(logits)
        if not err <= tol:
            raise HeadError(f"{type(self.model).__name__}: its logits are not (hidden @ lm_head) as prefrank reads "
                            f"them (max log-prob difference {err:.3g}, more than {dtype}'s rounding allows: {tol:.3g})")

    def _head_tolerance(self, logits) -> tuple[str, float]:
        """(the logits' compute dtype, the largest log-prob difference its rounding explains). Each
        logit rounded once in that dtype moves by up to eps/2 · |z|, a log-prob by up to twice that
        (its logit and the log-sum-exp): eps · max |z|. Not below 1e-3, which covers a float32 head
        summing over d in another order."""
        device = self.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        return str(dtype).removeprefix("torch."), max(1e-3, torch.finfo(dtype).eps * logits.abs().max().item())
