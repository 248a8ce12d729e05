"""NeMo 2.7.3's real Megatron path on a machine without CUDA: the adaptations, and only those.

NeMo 2.7.3 and megatron-core 0.15 assume CUDA (and Transformer Engine) in a few dozen places
that a tiny model on CPU reaches: `torch.cuda.synchronize()` around checkpoint I/O, bookkeeping
tensors on `torch.cuda.current_device()`, `device='cuda'` literals in the optimizer, NeMo's
TE-named Qwen2 norm mapping. Each `Adaptation` below gets past exactly one upstream function:
it names the file:line, checks that function's source against the sha256 jp-peft was written
for (any other version fails loudly, naming the function), replaces exact text fragments (each
must occur exactly once) and swaps the function's code object in place. Every reference to the
function -- decorated, bound, or imported into another module -- then runs the adapted code,
and tracebacks still point at upstream's file and line numbers.

`enable()` refuses to run where CUDA is available: on a GPU nothing here changes behaviour.
Upstream is frozen (2.7.3 is the last NeMo with `nemo.collections.llm`), so this list is final
for the pinned versions; `tests/backends/megatron/test_megatron_cpu.py` checks every entry still applies.
Over 400 lines because the list of adaptations is the module: one place to read everything jp-peft
changes upstream.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from importlib import metadata

from jp_peft.pins import STACK, matches


class MegatronCpuError(RuntimeError):
    """The installed NeMo/megatron is not the code these adaptations were written for, or CUDA is present."""


@dataclass(frozen=True)
class Adaptation:
    target: str  # "package.module:Class.method" or "package.module:function"
    where: str  # upstream file:line it gets past
    why: str
    sha256: str  # first 16 hex digits of the upstream function's (dedented) source
    # (old, new) or (old, new, count): `old` must occur exactly `count` times (default once)
    edits: tuple[tuple, ...]
    # What upstream assumes and this machine lacks: "cuda" (applied where CUDA is missing), "te"
    # (where Transformer Engine is missing: NeMo then builds megatron's local layer spec, on CPU and GPU
    # alike), "fused_adam" (where megatron has neither TE's nor Apex's fused Adam and falls back to
    # torch's AdamW, which keeps a `step` per parameter)
    assumes: str = "cuda"


_PINNED_TO_CUDA = 'pin_memory=True).to("cuda", non_blocking=True)'
_SYNC = ("torch.cuda.synchronize()", "pass  # jp-peft: no CUDA stream to wait for")

ADAPTATIONS: tuple[Adaptation, ...] = (
    # --- megatron dist-checkpointing: waits on CUDA streams, bookkeeping tensors on the GPU ---
    Adaptation("megatron.core.dist_checkpointing.strategies.filesystem_async:FileSystemWriterAsync.preload_tensors",
               "megatron/core/dist_checkpointing/strategies/filesystem_async.py:230",
               "waits for device-to-host copies; CPU tensors are already in host memory",
               "f6b52a66eb64020f", (_SYNC,)),
    Adaptation("megatron.core.dist_checkpointing.strategies.async_utils:TemporalAsyncCaller.schedule_async_call",
               "megatron/core/dist_checkpointing/strategies/async_utils.py:210",
               "waits for device-to-host copies before forking the writer", "073233a96d7e5e5b", (_SYNC,)),
    Adaptation("megatron.core.dist_checkpointing.strategies.async_utils:AsyncCaller.sync_all_async_calls",
               "megatron/core/dist_checkpointing/strategies/async_utils.py:163",
               "all-reduces a flag on the current CUDA device; gloo reduces CPU tensors", "b916dc7272231320",
               (("device=torch.cuda.current_device()", "device='cpu'"),)),
    Adaptation("megatron.core.dist_checkpointing.strategies.async_utils:AsyncCallsQueue.maybe_finalize_async_calls",
               "megatron/core/dist_checkpointing/strategies/async_utils.py:582",
               "all-reduces the call index on the current CUDA device", "953f521952ba7ef8",
               (("device=torch.cuda.current_device()", "device='cpu'"),)),
    Adaptation("megatron.core.dist_checkpointing.strategies.state_dict_saver:save_state_dict_async_finalize",
               "megatron/core/dist_checkpointing/strategies/state_dict_saver.py:252",
               "all-reduces the failure flag on the current CUDA device", "e833e30e9e4f946b",
               (("device=torch.cuda.current_device()", "device='cpu'"),)),
    Adaptation("megatron.core.dist_checkpointing.strategies.fully_parallel:FullyParallelLoadStrategyWrapper.load",
               "megatron/core/dist_checkpointing/strategies/fully_parallel.py:272,281",
               "waits for CUDA work before and after the exchange of loaded shards", "15f40e814711cb3c",
               ((*_SYNC, 2),)),
    # --- megatron model forward -----------------------------------------------------------------
    Adaptation("megatron.core.models.common.embeddings.rotary_pos_embedding:RotaryEmbedding.forward",
               "megatron/core/models/common/embeddings/rotary_pos_embedding.py:164",
               "moves the RoPE frequencies to the current CUDA device on the first forward", "79a0fb4585eb411a",
               (("self.inv_freq.to(device=torch.cuda.current_device())", "self.inv_freq"),)),
    Adaptation("megatron.core.transformer.dot_product_attention:DotProductAttention.forward",
               "megatron/core/transformer/dot_product_attention.py:207",
               "forks the CUDA RNG tracker around attention dropout (even at dropout 0); NeMo seeds that "
               "tracker only when a CUDA device exists (nemo/lightning/megatron_init.py:238), so on CPU "
               "dropout draws from torch's CPU generator, which NeMo seeded", "9739595d9bf36c54",
               (("with tensor_parallel.get_cuda_rng_tracker().fork():", "if True:  # jp-peft: no CUDA RNG tracker"),)),
    Adaptation("megatron.core.transformer.utils:get_default_causal_mask", "megatron/core/transformer/utils.py:35",
               "builds the causal mask (used when a forward gets attention_mask=None) on 'cuda'", "223e90f6a3733302",
               (('device="cuda"', 'device="cpu"'),)),
    Adaptation("megatron.core.utils:GlobalMemoryBuffer.get_tensor", "megatron/core/utils.py:535",
               "allocates the shared attention-score buffer on the current CUDA device", "9b215610fda2e661",
               (("device=torch.cuda.current_device()", "device='cpu'"),)),

    # --- megatron DDP, optimizer and schedule: bookkeeping tensors created on 'cuda' -----------
    Adaptation("megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBuffer.__init__",
               "megatron/core/distributed/param_and_grad_buffer.py:702,719,725",
               "allocates the contiguous param/grad buffers on the current CUDA device", "1e920bba5241da91",
               (("device=torch.cuda.current_device()", "device='cpu'", 3),)),
    Adaptation("megatron.core.pipeline_parallel.schedules:forward_backward_no_pipelining",
               "megatron/core/pipeline_parallel/schedules.py:573",
               "counts the step's tokens in a CUDA tensor", "6915c8b33db4fcf7",
               (('device="cuda"', 'device="cpu"'),)),
    Adaptation("megatron.core.optimizer.optimizer:MixedPrecisionOptimizer.__init__",
               "megatron/core/optimizer/optimizer.py:469,477,481",
               "found-inf flag, overflow buffer and unit scale on 'cuda' (the distributed optimizer's base)", "9bde63c621a02c7c",
               (("device='cuda'", "device='cpu'", 3),)),
    Adaptation("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
               "megatron/core/optimizer/distrib_optimizer.py:578",
               "accepts parameters only by their CUDA type strings", "9065c18bc9116278",
               (("'torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor'", "'torch.HalfTensor', 'torch.BFloat16Tensor'"),)),
    Adaptation("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups",
               "megatron/core/optimizer/distrib_optimizer.py:357,416",
               "sorts parameters into fp16/fp32 groups by their CUDA type strings (raises for CPU tensors)", "2d18fa9c2819f73b",
               (("'torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor'", "'torch.HalfTensor', 'torch.BFloat16Tensor'"),
                ("model_param.type() == 'torch.cuda.FloatTensor'", "model_param.type() == 'torch.FloatTensor'"))),
    Adaptation("megatron.core.optimizer.clip_grads:get_grad_norm_fp32", "megatron/core/optimizer/clip_grads.py:90,103,115",
               "reduces the gradient norm in CUDA tensors", "7fa2ba2493d43f1d",
               (("device='cuda'", "device='cpu'", 3),)),
    Adaptation("megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
               "megatron/core/optimizer/clip_grads.py:167,174",
               "asserts CUDA gradients and keeps the overflow flag on 'cuda'", "8edb9da5365045a5",
               (("param.grad.type() == 'torch.cuda.FloatTensor'", "param.grad.type() == 'torch.FloatTensor'"),
                ("device='cuda'", "device='cpu'"))),
    Adaptation("megatron.core.optimizer.clip_grads:count_zeros_fp32", "megatron/core/optimizer/clip_grads.py:206",
               "counts zero gradients in a CUDA tensor", "4ae440249a9c4f5d", (("device='cuda'", "device='cpu'"),)),
    Adaptation("megatron.core.utils:local_multi_tensor_l2_norm", "megatron/core/utils.py:1029",
               "the no-Apex/no-TE l2-norm fallback returns its result on 'cuda'", "01526c55444a73bd",
               (('device="cuda"', 'device="cpu"'),)),
    Adaptation("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
               "megatron/core/optimizer/distrib_optimizer.py:787",
               "builds the optimizer-state placeholders of a resumed run on the current CUDA device", "8df52519d4c8e965",
               (("device=torch.cuda.current_device()", "device='cpu'"),)),
    Adaptation("megatron.core.timers:Timer.start", "megatron/core/timers.py:149",
               "waits for CUDA work before reading the clock", "04cfc4198b398eb4", (_SYNC,)),
    Adaptation("megatron.core.timers:Timer.stop", "megatron/core/timers.py:162",
               "waits for CUDA work before reading the clock", "a77b81ecb3d39b28", (_SYNC,)),
    Adaptation("megatron.core.timers:Timers._get_elapsed_time_all_ranks", "megatron/core/timers.py:286",
               "gathers every rank's timings into a CUDA tensor (NeMo's progress printer reads them)", "44a8c528951430d9",
               (("device=torch.cuda.current_device()", "device='cpu'"),)),

    # --- tensor parallelism: the gathered and scattered activations are allocated on the CUDA device ---
    Adaptation("megatron.core.tensor_parallel.mappings:_gather_along_last_dim",
               "megatron/core/tensor_parallel/mappings.py:91",
               "allocates the gathered activations (the output layer's logits at TP>1) on CUDA", "78507d5543935a72",
               (("device=torch.cuda.current_device()", "device='cpu'"),)),
    Adaptation("megatron.core.tensor_parallel.mappings:_gather_along_first_dim",
               "megatron/core/tensor_parallel/mappings.py:141,148",
               "allocates the gathered activations on CUDA", "44633fe36d60a51f",
               (("device=torch.cuda.current_device()", "device='cpu'", 2),)),
    Adaptation("megatron.core.tensor_parallel.mappings:_reduce_scatter_along_first_dim",
               "megatron/core/tensor_parallel/mappings.py:181",
               "allocates the reduce-scattered activations on CUDA", "7322068fab71d319",
               (("device=torch.cuda.current_device()", "device='cpu'"),)),

    Adaptation("nemo.collections.llm.gpt.data.utils:_get_samples_mapping", "nemo/collections/llm/gpt/data/utils.py:777",
               "counts the ranks that built the SFT sample mapping in a torch.cuda.LongTensor", "574dc027574a3ca5",
               (("torch.cuda.LongTensor([1])", "torch.LongTensor([1])"),)),

    Adaptation("nemo.lightning.pytorch.callbacks.preemption:PreemptionCallback.interrupted",
               "nemo/lightning/pytorch/callbacks/preemption.py:113",
               "broadcasts rank 0's 'signal received' flag in a CUDA tensor after every step", "6a9ef68e1e2a3362",
               (("device=torch.cuda.current_device()", "device='cpu'"),)),

    Adaptation("nemo.lightning.pytorch.callbacks.progress_printer:ProgressPrinter.on_train_batch_end",
               "nemo/lightning/pytorch/callbacks/progress_printer.py:153-155",
               "gathers Megatron's timers from every rank (an all_gather), but only rank 0 gets there: the "
               "printer is disabled on the others. NCCL skips a gather of no timers; gloo counts it, so rank 0's "
               "collectives run one ahead and two ranks hang in their next broadcast (seen: both in "
               "PreemptionCallback.interrupted after the first progress line). One process keeps the timer lines",
               "727379e04f138b5b",
               (('if getattr(trainer.strategy, "timers", None):',
                 'if getattr(trainer.strategy, "timers", None) and trainer.world_size == 1:'),)),

    # --- NeMo's checkpoint I/O and its Megatron wrapper ---------------------------------------
    Adaptation("nemo.lightning.io.pl:_fix_tensors_device", "nemo/lightning/io/pl.py:495",
               "asserts CUDA after every checkpoint load, to move CUDA tensors to this rank's GPU; "
               "a CPU load has none to move", "561d518d996ec125",
               (("    assert torch.cuda.is_initialized(), (torch.cuda.is_available(), torch.cuda.is_initialized())",
                 "    return ckpt  # jp-peft: nothing is on a CUDA device"),)),
    Adaptation("nemo.lightning.megatron_parallel:MegatronParallel.init_model_parallel",
               "nemo/lightning/megatron_parallel.py:617",
               "initialises DDP on a side CUDA stream (for full-iteration CUDA graphs)", "ca5564875ad21463",
               (("with torch.cuda.stream(torch.cuda.Stream()):", "if True:  # jp-peft: no CUDA stream"),)),
    Adaptation("nemo.collections.llm.gpt.model.base:gpt_data_step", "nemo/collections/llm/gpt/model/base.py:103",
               "moves the batch with .cuda(); on CPU it stays where the loader put it", "83b0381f64fa98b4",
               (("val.cuda(non_blocking=True)", "val"),)),
    Adaptation("nemo.lightning.pytorch.plugins.data_sampler:MegatronDataSampler.on_megatron_step_end",
               "nemo/lightning/pytorch/plugins/data_sampler.py:192,212",
               "logs consumed samples and batch size as pinned tensors copied to CUDA", "b8dfc8e84eba5f7f",
               ((_PINNED_TO_CUDA, ")", 2),)),
    Adaptation("nemo.lightning.pytorch.strategies.megatron_strategy:MegatronStrategy.training_step",
               "nemo/lightning/pytorch/strategies/megatron_strategy.py:801-850",
               "logs the step and the loss as pinned tensors copied to CUDA", "2775a14baeb3ebec",
               ((_PINNED_TO_CUDA, ")", 4),)),
    Adaptation("nemo.lightning.pytorch.strategies.megatron_strategy:MegatronStrategy.optimizer_step",
               "nemo/lightning/pytorch/strategies/megatron_strategy.py:881,888",
               "logs the gradient norm and zero count as pinned tensors copied to CUDA", "7294ef2a41eeb1bc",
               ((_PINNED_TO_CUDA, ")", 2),)),

    # --- TE/Apex fused Adam assumed: megatron's torch AdamW fallback cannot resume exactly ------
    Adaptation("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.state_dict",
               "megatron/core/optimizer/distrib_optimizer.py:637-639",
               "asserts that every parameter's AdamW `step` is one value; before the first step (a resume "
               "builds the optimizer's sharded state dict to load into) there is no state and no step", "cc2fc62014a96b4e",
               (("        assert len(steps) == 1\n        step = steps[0]",
                 "        assert len(steps) <= 1\n        step = steps[0] if steps else 0"),),
               assumes="fused_adam"),
    Adaptation("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
               "megatron/core/optimizer/distrib_optimizer.py:821",
               "gives every parameter the same `step` tensor; AdamW increments it in place once per parameter, "
               "so after a resume the bias correction runs ahead (seen: step 67 after 2 steps, 32 params)", "8df52519d4c8e965",
               (('            s["step"] = step\n', '            s["step"] = step.clone()\n'),),
               assumes="fused_adam"),
    Adaptation("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states",
               "megatron/core/optimizer/distrib_optimizer.py:927-928",
               "copies every optimizer state key from the fully-reshardable checkpoint, which stores no `step` "
               "(KeyError); load_state_dict restores `step` from the param groups", "0f5b599c6cb16c50",
               (("        for key in dst_tensors:\n            dst_tensors[key].copy_(tensors[key])",
                 "        for key in dst_tensors:\n            if key == 'step' and key not in tensors:\n"
                 "                continue\n            dst_tensors[key].copy_(tensors[key])"),),
               assumes="fused_adam"),

    # --- Transformer Engine assumed: wrong on any machine without TE -------------------------
    Adaptation("nemo.collections.llm.gpt.model.qwen2:HFQwen2Importer.convert_state",
               "nemo/collections/llm/gpt/model/qwen2.py:247-248",
               "maps HF norms onto TE's fused layer_norm_weight names; without TE the local spec has "
               "input_layernorm/pre_mlp_layernorm, and apply_transforms only warns 'No matches found', "
               "leaving every norm at 1.0 (a silently wrong import)", "1b4d6c875e6499bb",
               (('"decoder.layers.*.self_attention.linear_qkv.layer_norm_weight"', '"decoder.layers.*.input_layernorm.weight"'),
                ('"decoder.layers.*.mlp.linear_fc1.layer_norm_weight"', '"decoder.layers.*.pre_mlp_layernorm.weight"')),
               assumes="te"),
    Adaptation("nemo.collections.llm.gpt.model.qwen2:HFQwen2Exporter.convert_state",
               "nemo/collections/llm/gpt/model/qwen2.py:362-363",
               "the same norm names, exported back to Hugging Face", "226743ed37c6ebd8",
               (('"decoder.layers.*.self_attention.linear_qkv.layer_norm_weight"', '"decoder.layers.*.input_layernorm.weight"'),
                ('"decoder.layers.*.mlp.linear_fc1.layer_norm_weight"', '"decoder.layers.*.pre_mlp_layernorm.weight"')),
               assumes="te"),
    Adaptation("nemo.collections.llm.peft.lora:LoRA.transform",
               "nemo/collections/llm/peft/lora.py:703",
               "compares with te.Linear, an attribute of NeMo's placeholder for the missing TE module (raises)", "a7c7c69939a3f79c",
               (("isinstance(m, nn.Linear) or m.__class__ == te.Linear", "isinstance(m, nn.Linear)"),),
               assumes="te"),
)


# --- the mechanism ---------------------------------------------------------------------------

_ORIGINAL_CODE: dict[str, object] = {}  # target -> the function's upstream code object, while enabled
_ADAPTED_SOURCE: dict[str, str] = {}  # target -> its source with the edits applied so far (two adaptations may share one)
_APPLIED: set[int] = set()  # ids of the Adaptation entries applied
_ORIGINAL_VALUES: dict[str, object] = {}


def _resolve(target: str):
    """The plain function object behind `target` (through staticmethod/classmethod and decorators)."""
    module_name, _, qualname = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if isinstance(raw, (staticmethod, classmethod)):
        raw = raw.__func__
    elif isinstance(raw, property):
        raw = raw.fget
    func = inspect.unwrap(raw)
    if not inspect.isfunction(func):
        raise MegatronCpuError(f"{target}: not a Python function ({type(func).__name__})")
    return func


def upstream_source(target: str) -> str:
    func = _resolve(target)
    code = _ORIGINAL_CODE.get(target, func.__code__)
    lines, _ = inspect.findsource(code)
    return textwrap.dedent("".join(inspect.getblock(lines[code.co_firstlineno - 1:])))


def source_sha256(target: str) -> str:
    return hashlib.sha256(upstream_source(target).encode()).hexdigest()[:16]


def _adapted_code(func, source: str):
    """Compile `source` (the edited function) into a code object that can replace func.__code__."""
    tree = ast.parse(source)
    (fdef,) = tree.body
    fdef.decorator_list = []  # the decorators already wrap the function object whose code we swap
    body = [fdef]
    freevars = func.__code__.co_freevars  # e.g. __class__ for zero-argument super()
    if freevars:
        factory = ast.parse(f"def _jp_peft_closure({', '.join(freevars)}):\n    pass").body[0]
        factory.body = [fdef]
        body = [factory]
    module = ast.Module(body=body, type_ignores=[])
    ast.increment_lineno(module, func.__code__.co_firstlineno - 1)
    ast.fix_missing_locations(module)
    code = compile(module, func.__code__.co_filename, "exec", dont_inherit=True)
    if freevars:
        code = next(c for c in code.co_consts if inspect.iscode(c))
    new = next(c for c in code.co_consts if inspect.iscode(c) and c.co_name == fdef.name)
    if new.co_freevars != func.__code__.co_freevars:
        raise MegatronCpuError(f"{func.__qualname__}: closure {new.co_freevars} != {func.__code__.co_freevars}")
    return new


def _apply(adaptation: Adaptation) -> None:
    func = _resolve(adaptation.target)
    source = upstream_source(adaptation.target)
    found = hashlib.sha256(source.encode()).hexdigest()[:16]
    if found != adaptation.sha256:
        raise MegatronCpuError(
            f"{adaptation.target} ({adaptation.where}) is not the code jp-peft adapts (sha256 {found}, expected "
            f"{adaptation.sha256}): the CPU tier supports exactly {_pins()}")
    if any(part.startswith("__") and not part.endswith("__") for part in _identifiers(source)):
        raise MegatronCpuError(f"{adaptation.target}: uses a name-mangled attribute; cannot be recompiled outside its class")
    source = _ADAPTED_SOURCE.get(adaptation.target, source)
    for old, new, *count in adaptation.edits:
        expected = count[0] if count else 1
        if source.count(old) != expected:
            raise MegatronCpuError(f"{adaptation.target} ({adaptation.where}): expected {old!r} {expected} time(s), "
                                   f"found {source.count(old)}")
        source = source.replace(old, new)
    code = _adapted_code(func, source)
    _ORIGINAL_CODE.setdefault(adaptation.target, func.__code__)
    _ADAPTED_SOURCE[adaptation.target] = source
    func.__code__ = code
    _APPLIED.add(id(adaptation))


def _identifiers(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.Name):
            yield node.id


def _pins() -> str:
    return ", ".join(f"{name} {version.replace('*', 'x')}" for name, version in STACK.items())


def check_versions() -> None:
    for name, wanted in STACK.items():
        installed = metadata.version(name)
        if not matches(installed, wanted):
            raise MegatronCpuError(f"{name} {installed} is installed; the CPU tier supports exactly {_pins()}")


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def have_fused_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return distrib_optimizer.HAVE_APEX_OR_TE


def missing_on_gpu() -> set[str]:
    """What a CUDA machine can still lack: Transformer Engine, a fused Adam."""
    return ({"te"} if not have_transformer_engine() else set()) | ({"fused_adam"} if not have_fused_adam() else set())


def enable() -> list[str]:
    """Apply every adaptation (idempotent) in a process without CUDA. Returns the targets applied."""
    import torch

    if torch.cuda.is_available():
        raise MegatronCpuError("CUDA is available: the CPU adaptations must not be applied on a GPU machine")
    return _enable({"cuda"} | missing_on_gpu())


def enable_for_gpu() -> list[str]:
    """On a CUDA machine, only the adaptations for what it lacks (TE, fused Adam); none on NVIDIA's container."""
    return _enable(missing_on_gpu()) if missing_on_gpu() else []


def _enable(kinds: set[str]) -> list[str]:
    check_versions()
    _set_module_values(kinds)
    chosen = [a for a in ADAPTATIONS if a.assumes in kinds]
    for adaptation in chosen:
        if id(adaptation) not in _APPLIED:
            _apply(adaptation)
    return [a.target for a in chosen]


def _set_module_values(kinds: set[str]) -> None:
    """nemo/collections/llm/peft/utils.py:54 computes HAVE_TE=True without TE (megatron's TE extension
    module imports, with stub classes); isinstance() against those stubs at :77 then raises."""
    if "te" not in kinds:
        return
    from nemo.collections.llm.peft import utils as peft_utils

    if peft_utils.HAVE_TE not in (True, False):
        raise MegatronCpuError(f"nemo/collections/llm/peft/utils.py:54 HAVE_TE is {peft_utils.HAVE_TE!r}, expected a bool")
    _ORIGINAL_VALUES.setdefault("peft_utils.HAVE_TE", peft_utils.HAVE_TE)
    peft_utils.HAVE_TE = False


def disable() -> None:
    """Put every upstream function's own code back (tests)."""
    for target, code in list(_ORIGINAL_CODE.items()):
        _resolve(target).__code__ = code
        del _ORIGINAL_CODE[target]
    _ADAPTED_SOURCE.clear()
    _APPLIED.clear()
    if "peft_utils.HAVE_TE" in _ORIGINAL_VALUES:
        from nemo.collections.llm.peft import utils as peft_utils

        peft_utils.HAVE_TE = _ORIGINAL_VALUES.pop("peft_utils.HAVE_TE")
