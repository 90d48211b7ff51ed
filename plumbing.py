"""
The plumbing the scripts share: what must be right for a run to be safe and repeatable, but is not
what the course teaches (the model, its loss, the training step and DPO read in their own files).
  runtime and processes   device and precision, DDP, torch.compile, the machine's matmul speed
  optimization            AdamW (or Muon) and their parameter groups, the max_time budget
  checkpoints             out_dir claimed, checkpoints written atomically and loaded safely, resume
  data                    the token files checked, passages inside one document
  generation              continuations in batches, streamed output
  plots and metrics       metrics.jsonl and the curves drawn from it
"""

import atexit
import codecs
import contextlib
import copy
import datetime
import errno
import functools
import gc
import json
import math
import os
import pickle
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from model import SAMPLING, make_model, model_args_from, other_arch_keys, pack, sampling
from tokenizer import Tokenizer, lock_data_dir


# --- runtime and processes: device, precision, DDP, compile, the machine's speed ------------------
@dataclass
class Runtime:
    device: str  # "cpu", "cuda:0", "mps"
    device_type: str  # "cpu", "cuda", "mps"
    ptdtype: torch.dtype  # the autocast dtype (float32: no autocast)
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self) -> bool:
        return self.rank == 0  # only rank 0 logs and writes files

    def autocast(self, decode: bool = False):
        """Mixed precision: matmuls in bf16/fp16, reductions and the loss in fp32. decode=True: for
        generation, which on a CPU stays in float32: a decode step reads every weight for one token
        per row, and autocast would also cast every weight to bf16 at every step (bench.py: float32
        decodes faster on CPUs with bf16 units too)."""
        if self.ptdtype == torch.float32 or (decode and self.device_type == "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.ptdtype)

    def decoder(self, model: torch.nn.Module, compile: bool) -> torch.nn.Module:
        """The model that generates. A compiled decode step on a CPU with bf16 units (dtype bf16) reads
        a bf16 copy of the weights: each token reads every weight, and the step's fused reductions read
        bf16 at memory speed, half the bytes (bench.py: 1.17x float32 at batch 1 and 32). Eager, oneDNN
        multiplies one row by bf16 weights no faster than by float32; without bf16 units it emulates the
        bf16 products of the prefill and of batches: the model itself, in float32, there."""
        if compile and self.device_type == "cpu" and self.ptdtype == torch.bfloat16:
            return copy.deepcopy(model).to(torch.bfloat16)
        return model


def check_device(device: str, dtype: str) -> tuple[str, str]:
    """The device and dtype, resolved from auto, or a one-line error where they are not there."""
    device = resolve_device(device)
    device_type = device.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: --device={device} is not one of auto, cpu, cuda, cuda:N, mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={device} but torch sees no CUDA GPU: use --device=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device=mps but this torch has no MPS backend: use --device=cpu")
    dtype = resolve_dtype(dtype, device)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"error: --dtype={dtype} is not one of auto, float32, bfloat16, float16")
    return device, dtype


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def keep_freed_memory() -> bool:
    """On Linux (glibc), memory freed by the process stays with it, for the next allocation, instead
    of going back to the system. glibc serves allocations of over 32 MB (a training step's logits:
    16 x 256 x 8,192 float32 numbers are 134 MB) with fresh pages from the kernel, and returns them
    when freed, so every step faulted in and zeroed hundreds of MB again: a quarter of the CPU step
    of the default run. mallopt(M_MMAP_MAX, 0) serves them from the heap, and a trim threshold of
    1 GiB keeps the heap's free memory. For steps that allocate the same few sizes every time
    (train.py, dpo.py's training loop): where sizes vary from batch to batch the heap fragments,
    and a DPO run of 3,000 pairs, with it from the start, peaked at 9.8 GB against 3.0 GB. Returns
    whether it applied (not on macOS, Windows, or a libc without mallopt)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 2**30))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def setup_runtime(device: str = "auto", dtype: str = "auto", seed: int = 1337, backend: str = "",
                  ddp_timeout: float = 300.0) -> Runtime:
    """Checks the device and dtype, starts DDP when launched by torchrun, seeds torch."""
    device, dtype = check_device(device, dtype)
    device_type = device.split(":")[0]

    rank, local_rank, world_size = 0, 0, 1
    ddp = "RANK" in os.environ  # set by torchrun
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device_type == "cuda":
            device = f"cuda:{local_rank}"  # one GPU per process
            torch.cuda.set_device(device)
        # the timeout: when a process dies, the others stop with an error instead of waiting forever
        torch.distributed.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"),
                                             timeout=datetime.timedelta(seconds=ddp_timeout))
    torch.manual_seed(seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls: ~8x faster than fp32 on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, device_type, getattr(torch, dtype), ddp, rank, local_rank, world_size)


def resolve_dtype(dtype: str, device: str) -> str:
    """dtype="auto": bf16 where the device computes it fast (fast_bf16), fp16 (loss-scaled) on older
    GPUs, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    if fast_bf16(device):
        return "bfloat16"
    return "float16" if device.startswith("cuda") else "float32"


def check_config(c: dict, given=()) -> None:
    """Impossible values of a training config are one-line errors, raised before any data is read.
    Checks the keys that c has, so that every training script can use it. given: the keys a config
    file or a flag set (configurator.resolve), where a setting of the other architecture is an error."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SystemExit(f"error: {msg}")

    for k, v in c.items():
        if isinstance(v, float):
            need(math.isfinite(v), f"{k} must be a finite number, got {v}")
    for k in ("batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval", "save_every",
              "gradient_accumulation_steps", "ddp_timeout", "prompt_tokens", "completion_tokens"):
        if k in c:
            need(c[k] > 0, f"{k} must be positive, got {c[k]}")
    for k in ("warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip", "max_time",
              "make_pairs", "num_samples", "max_new_tokens", "embedding_lr"):
        if k in c:
            need(c[k] >= 0, f"{k} must be zero or positive, got {c[k]}")
    if "seed" in c:  # torch's generators take 64 bits; the scripts add a process's rank, or 1, to it
        need(0 <= c["seed"] < 2**63 - 1024, f"seed must be zero or positive and below 2**63 - 1024, got {c['seed']}")
    if all(k in c for k in SAMPLING):  # the sampling settings: model.SamplingConfig checks them
        try:
            sampling(c)
        except ValueError as e:
            need(False, str(e))
    if "arch" in c:  # the model's settings: its config dataclass checks them (model.py)
        try:
            model_args_from(c)
        except ValueError as e:
            need(False, str(e))
        other = other_arch_keys(c["arch"], given)
        need(not other, f"{', '.join(other)} set for arch={c['arch']}, which has no such setting (the other "
                        "architecture's): drop it, or start from that architecture's config (config/gpt.py for "
                        "the GPT, config/gutenberg.py for the Llama)")
    if "learning_rate" in c:
        need(c["learning_rate"] > 0, f"learning_rate must be positive, got {c['learning_rate']}")
    for k in ("beta1", "beta2"):
        if k in c:
            need(0 <= c[k] < 1, f"{k} must be in [0, 1), got {c[k]}")


# Ctrl-C and torch.compile. Before each call of a compiled function, torch checks that its inputs
# still fit the compiled graph (its "guards"). An exception raised while one of those checks runs
# Python code counts as a failed check and is dropped: a Ctrl-C noticed there is lost, and the
# script goes on (2 presses in 3, in a loop of small compiled calls), after a recompile for the failed
# check. So the scripts' handlers record the presses (on_ctrl_c), and every loop that calls compiled
# code asks check_ctrl_c() once a round.
CTRL_C: list[int] = []  # the Ctrl-C presses seen; empty: none yet


def on_ctrl_c(stop=signal.default_int_handler) -> None:
    """Ctrl-C calls stop(signum, frame), which ends the script (it raises: KeyboardInterrupt by
    default); the press is recorded first. A script started in the background by a shell script
    (cmd &) inherits Ctrl-C ignored: it stays so, Ctrl-C is for the foreground."""
    def handler(signum, frame):
        CTRL_C.append(signum)
        stop(signum, frame)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, handler)


def check_ctrl_c() -> None:
    """Raises again a Ctrl-C that a compiled call dropped, through the script's handler."""
    handler = signal.getsignal(signal.SIGINT)
    if CTRL_C and callable(handler):
        handler(signal.SIGINT, None)


@contextlib.contextmanager
def ctrl_c_ends_quietly():
    """Ctrl-C ends the script with one line and exit status 130 (128 + SIGINT, what a shell reports
    for it) instead of a traceback. The newline first ends a sample cut mid-line."""
    on_ctrl_c()
    try:
        yield
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None


@contextlib.contextmanager
def ddp_guard(rt: Runtime):
    """Under DDP, a process that died shows up in the survivors as an error of the next collective
    operation (or, if that never completes, after ddp_timeout): turn it into one line and stop."""
    try:
        yield
    except (torch.distributed.DistError, RuntimeError) as e:
        text = str(e)
        if not rt.ddp or not (isinstance(e, torch.distributed.DistError) or "gloo" in text or "NCCL" in text):
            raise
        raise SystemExit(f"error: rank {rt.rank} lost contact with the other processes, one of them probably "
                         f"died (see its log): {text.splitlines()[0][:200]}") from None


def share_batch(batch_size: int, gradient_accumulation_steps: int, world_size: int, log=None,
                unit: str = "sequences") -> tuple[int, int]:
    """How world_size processes share an iteration's global batch of gradient_accumulation_steps x
    batch_size sequences (unit: dpo.py's are pairs): (micro-steps per process, sequences per
    micro-step), the fewest micro-steps of at most batch_size sequences that split it evenly. The
    global batch stays the same, and so the run: 8 processes take 4 x 16 as 1 micro-step of 8
    sequences each. log: where to say so when the micro-steps are smaller than batch_size."""
    total = gradient_accumulation_steps * batch_size
    if total % world_size:
        step = world_size // math.gcd(gradient_accumulation_steps, world_size)  # batch_size's step
        raise SystemExit(f"error: the global batch of {total} {unit} (gradient_accumulation_steps="
                         f"{gradient_accumulation_steps} x batch_size={batch_size}) cannot be split evenly "
                         f"among {world_size} processes: make it a multiple of {world_size}, e.g. "
                         f"--batch_size={max(step, batch_size // step * step)}")
    steps = math.ceil(gradient_accumulation_steps / world_size)  # so that no micro-step exceeds batch_size
    while total % (world_size * steps):
        steps += 1  # ends at the latest at total / world_size micro-steps of 1 sequence
    micro_batch = total // (world_size * steps)
    if log is not None and micro_batch != batch_size:
        log(f"note: {world_size} processes share the global batch of {gradient_accumulation_steps} x {batch_size} "
            f"{unit} as {steps} micro-step(s) each of {micro_batch} {unit} (batch_size lowered to {micro_batch})")
    return steps, micro_batch


def draw_share(high: int, micro_steps: int, micro_batch: int, gen: torch.Generator, rt: Runtime) -> torch.Tensor:
    """This process's share of an iteration's global batch of random indices below high, (micro_steps,
    micro_batch): every process draws the whole batch from the same generator and keeps its own row,
    so the batch, and the run, are the same with 1 process or 8."""
    ix = torch.randint(high, (rt.world_size * micro_steps, micro_batch), generator=gen)
    return ix.view(rt.world_size, micro_steps, micro_batch)[rt.rank]


def end_ddp(rt: Runtime) -> None:
    """Under DDP, leave the process group together, once rank 0 has saved: a process that tore gloo
    down while the other was still saving aborted ("terminate called without an active exception"),
    in 2 of 12 two-process runs on a busy 2-core machine, and in none of 32 with this barrier.
    The caller first drops its DDP wrapper (`del model`): the wrapper holds the group in reference
    cycles, which only the garbage collector frees; collected here, the group's threads stop now,
    not while the interpreter shuts down, where gloo can still abort the same way."""
    if rt.ddp:
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def rank0_clock(t_start: float, rt: Runtime) -> float:
    """Seconds since t_start by rank 0's clock: under DDP every process then agrees on the
    learning rate and on when to stop (with its own clock, one could stop while another waits)."""
    clock = torch.tensor(time.time() - t_start, dtype=torch.float64)
    if rt.ddp:
        clock = clock.to(rt.device)
        torch.distributed.broadcast(clock, src=0)
    return clock.item()


def resolve_compile(compile: bool | None, device_type: str, log=print) -> bool:
    """Whether to torch.compile the model: as asked, or with compile=None on CUDA, and on CPU where
    Inductor can build C++ kernels. That takes a compiler (g++, clang++) and the Python headers: a
    one-line function compiled and run tells in a few seconds, most of them Inductor's imports,
    which the model's compile needs anyway. Otherwise eager, and one line says why."""
    if compile is not None:
        return compile
    if device_type != "cpu":
        return device_type == "cuda"
    t0 = time.time()
    # a Ctrl-C during the check goes to the script's handler, even where Inductor turns it into an error
    interrupted = []
    ctrl_c = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    guard = callable(ctrl_c)  # Python's (KeyboardInterrupt) or the script's own; signals reach the main thread only

    def on_ctrl_c(signum, frame):
        interrupted.append(signum)
        ctrl_c(signum, frame)

    if guard:
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        works = torch.compile(lambda x: x * 2 + 1)(torch.ones(4)).tolist() == [3.0] * 4
        why = "wrong result"
    except Exception as e:  # Inductor raises when it finds no working compiler or cannot build
        works, why = False, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    finally:
        if guard:
            signal.signal(signal.SIGINT, ctrl_c)
    if interrupted:  # the check caught what the handler raised: raise it again
        ctrl_c(signal.SIGINT, None)
    if works:
        log(f"compile: on (Inductor builds C++ kernels on this CPU, checked in {time.time() - t0:.1f} s); "
            "the model compiles during its first iterations, counted in max_time; --compile=False trains "
            "eagerly")
    else:
        log(f"compile: off, Inductor cannot build C++ kernels here ({why}): install a C++ compiler (g++ or "
            "clang++) and the Python headers (python3-dev) to train faster, or pass --compile=False to skip "
            "this check")
    return works


DECODE_COMPILE_STEPS = 5000  # a decode-step compile (5-40 s) is repaid at about 2 ms a step (bench.py)
GENERATE_BATCH = 32  # continue_prompts' rows generated together


def decode_steps(rows: int, batch_size: int, new_tokens: int) -> int:
    """The decode steps run one after another to continue rows prompts, batch_size at a time."""
    return -(-rows // batch_size) * new_tokens


def decode_compile(compile: bool | None, device_type: str, steps: int, log=print) -> bool:
    """Whether generate compiles its decode step (model.compiled_decode_step): as asked, or with
    compile=None when the run decodes at least DECODE_COMPILE_STEPS steps one after another (batches
    x new tokens) and Inductor works here (resolve_compile). Fewer steps never repay the compile."""
    if compile is not None or steps < DECODE_COMPILE_STEPS:
        return bool(compile)
    works = resolve_compile(None, device_type, log=lambda line: None)
    log(f"decode: {steps:,} steps one after another, " + ("so the decode step compiles first (5-40 s; "
        "--compile=False decodes eagerly)" if works else "but Inductor cannot build C++ kernels here: eager"))
    return works


def wrap_model(model: torch.nn.Module, rt: Runtime, compile: bool) -> torch.nn.Module:
    """The model as the training loop calls it: compiled (fused kernels), then under DDP (which
    averages the gradients across processes during backward). unwrap() gives the plain model back."""
    if compile:
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP and torch.compile wrappers: its state_dict has no
    'module.' or '_orig_mod.' prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def peak_matmul_size(device: str, dtype: torch.dtype) -> int:
    """The side of the square matrices measure_peak_flops multiplies: 4096 on CUDA; on a CPU 2048 in
    bf16 where it has bf16 units (AMX reaches its speed on products of 1536 and up: at 1024 it measured
    half of it, 1,677 against 3,210 GFLOP/s), else 1024 (float32 is as fast at 1024 as at 2048, and an
    emulated bf16 product of 2048 would take seconds)."""
    if device.startswith("cuda"):
        return 4096
    return 2048 if dtype == torch.bfloat16 and fast_bf16(device) else 1024


def measure_peak_flops(device: str, dtype: torch.dtype, seconds: float = 0.3, n: int = 0) -> float:
    """The machine's matmul throughput (FLOP/s) on square matrices of n (peak_matmul_size): the ceiling
    MFU is relative to."""
    n = n or peak_matmul_size(device, dtype)
    a = torch.ones(n, n, device=device, dtype=dtype)  # the values do not matter to the speed
    b, c = torch.ones_like(a), torch.empty_like(a)  # c: the product, written in place (no allocation timed)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):  # warm-up: kernel choice
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync()
        if time.perf_counter() - t0 > seconds:  # a dtype this slow (emulated): one product measures it
            return 2 * n**3 / (time.perf_counter() - t0)
    # the best of short windows of 4 products: on a shared machine the mean over the whole time moved by
    # 10 % from one run to the next (other work takes the cores at times), and the MFU with it
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b, out=c)
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


@functools.cache
def fast_bf16(device: str) -> bool:
    """Whether this device computes bf16 matmuls fast: GPUs from Ampere on, and CPUs with bf16 units
    (AVX512-BF16, AMX), measured here: bf16 at least 1.5x float32, enough to pay for autocast's casts.
    Other CPUs emulate bf16, 100x slower than float32 (under 1 GFLOP/s on an AVX2 CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    fp32, bf16 = (measure_peak_flops(device, dt, seconds=0.05, n=512)
                  for dt in (torch.float32, torch.bfloat16))
    return bf16 >= 1.5 * fp32


# --- optimization: the optimizer and its parameter groups, the max_time budget ---------------------
def resolve_optimizer(optimizer: str, device: str) -> str:
    """optimizer="auto": Muon where bf16 matmuls are fast, AdamW elsewhere. Without bf16 units, Muon's
    Newton-Schulz runs in float32 (BatchedMuon's ns_dtype): about 100 ms a step for the default model on
    2 cores, a tenth of its step, not measured to pay for itself in loss; --optimizer=muon takes it."""
    if optimizer == "auto":
        return "muon" if fast_bf16(device) else "adamw"
    return optimizer


def configure_optimizer(model: torch.nn.Module, weight_decay: float, learning_rate: float,
                        betas: tuple[float, float], device_type: str,
                        optimizer: str = "adamw", embedding_lr: float = 0.0) -> "torch.optim.Optimizer":
    """AdamW with weight decay on the weights of 2 or more dimensions only (matmuls, embeddings,
    experts' 3-D weights): decaying biases and norm gains toward zero has no regularising use. The
    fused kernel (one pass over each tensor instead of a dozen) exists on CUDA and on CPUs.

    optimizer="muon": Muon for the weight matrices of the blocks, AdamW for the rest (embeddings,
    the output layer, norm gains, experts' 3-D weights), as modded-nanogpt does. Muon
    replaces each matrix's momentum by the nearest orthogonal matrix (5 Newton-Schulz iterations),
    so that every direction of the update moves as much; made for hidden layers, not for lookups.
    adjust_lr_fn="match_rms_adamw" scales its steps to AdamW's size: one learning rate serves both.

    embedding_lr: the rate of an untied token table (tied, it is the output layer and trains as
    one), without weight decay. Each row of a lookup table gets a gradient only when its token
    occurs, so it learns from far fewer steps than a matrix every token goes through."""
    if optimizer not in ("adamw", "muon"):
        raise SystemExit(f"error: optimizer must be adamw or muon, got {optimizer!r}")
    if optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise SystemExit(f"error: optimizer=muon needs torch >= 2.9 (torch.optim.Muon), this is "
                         f"{torch.__version__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    in_blocks = [p for n, p in named if p.dim() == 2 and n.startswith("transformer.h.")]
    matrices = in_blocks if optimizer == "muon" else []
    rest = [p for n, p in named if all(p is not m for m in matrices)]
    wte = model.transformer.wte.weight
    own = embedding_lr > 0 and wte is not model.lm_head.weight
    groups = [{"params": [p for p in rest if p.dim() >= 2 and not (own and p is wte)],
               "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if own:  # lr_scale: the schedule's learning rate times this (train.py sets each group's lr)
        groups.append({"params": [wte], "weight_decay": 0.0, "lr_scale": embedding_lr / learning_rate})
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
    if not matrices:
        return adamw
    muon = BatchedMuon(matrices, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                       ns_dtype=torch.bfloat16 if fast_bf16(device_type) else torch.float32)
    return Optimizers(muon, adamw)


def newton_schulz(X: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The nearest orthogonal matrix (roughly: singular values pushed into 0.5..1.5) of each matrix of X,
    (n, rows, cols) with rows <= cols: torch.optim.Muon's quintic iteration, batched, in bf16 (torch's
    choice) or in float32 (for CPUs that emulate bf16)."""
    a, b, c = coefficients
    X = X.to(dtype)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT  # (n, rows, rows): the small side's Gram matrix
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + b A X + c A^2 X
    return X


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon's update (the same settings, state and checkpoints), with the matrices of one
    shape orthogonalised together: a transformer has a few shapes, repeated in every layer. One
    batched product per shape instead of one per matrix halves the Newton-Schulz time of the default
    model's 21 small matrices on a CPU (bench.py's optimizer row), and the update is the same.
    ns_dtype: where Newton-Schulz computes; float32 on a CPU without bf16 units, which emulates bf16
    a hundred times slower."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        if any(group["adjust_lr_fn"] != "match_rms_adamw" for group in self.param_groups):
            raise ValueError("BatchedMuon scales its steps as AdamW's (adjust_lr_fn='match_rms_adamw') only")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape: dict[tuple, list] = {}  # (rows, cols), rows <= cols: [(param, its update)]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = update.mT if p.size(0) > p.size(1) else update  # tall matrices: their transpose
                by_shape.setdefault(tuple(update.shape), []).append((p, update))
            for todo in by_shape.values():
                X = newton_schulz(torch.stack([u for _, u in todo]), group["ns_coefficients"], group["ns_steps"],
                                  group["eps"], self.ns_dtype)
                for (p, _), x in zip(todo, X, strict=True):
                    p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, as AdamW
                    # 0.2 sqrt(max side): an orthogonal update's RMS is AdamW's (adjust_lr_fn="match_rms_adamw")
                    p.add_(x.mT if p.size(0) > p.size(1) else x, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class Optimizers:
    """Several optimizers stepped as one, with what train.py asks of one: param_groups (to set the
    learning rate), step, zero_grad, state_dict, load_state_dict."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:  # read each time: load_state_dict replaces the groups
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("optimizers", ())) != len(self.optimizers):
            raise SystemExit("error: the checkpoint was trained with another optimizer: "
                             "resume with its --optimizer")
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def iters_in_budget(iter_num: int, elapsed: float, since: tuple[int, float], max_time: float,
                    eval_interval: int, eval_cost: float) -> int:
    """The iteration at which a run must stop to end within max_time seconds, at the speed measured
    since (iteration, elapsed) and counting the evaluations still to come, each worth eval_cost
    iterations (those run since then, before iterations since[0] + 1 .. iter_num, are taken out of
    the speed)."""
    evals_since = (iter_num - 1) // eval_interval - (since[0] - 1) // eval_interval
    per_iter = (elapsed - since[1]) / (max(1, iter_num - since[0]) + eval_cost * evals_since)
    eval_seconds = eval_cost * per_iter
    left = max_time - elapsed - eval_seconds  # the final evaluation
    return iter_num + max(1, int(0.98 * left / (per_iter + eval_seconds / eval_interval)))  # 2 % margin


class Budget:
    """max_time turned into iterations. How many fit is counted at iteration fit_at, from the speed
    since iteration time_from (the first iterations, which compile, run slower than the rest), then
    counted again every refit_every iterations (0: never), from the speed since fit_at: a shared
    machine's speed moves by a third within minutes, and a single count either left minutes unused or
    was cut by max_time before its schedule ended. The count is kept in .fitted, saved in the
    checkpoint. The learning-rate schedule runs by iterations, so a resumed run repeats an
    uninterrupted one exactly until the next count (two runs measure their own speeds). max_time
    itself stays a safety net, for a machine that slows down at the end. eval_cost: an evaluation's
    work in training iterations, estimated rather than timed (the first evaluation compiles the model
    for evaluation, which later ones do not repeat)."""

    def __init__(self, max_time: float, max_iters: int, eval_interval: int, eval_cost: float, time_from: int,
                 fit_at: int, refit_every: int = 0, saved: dict | None = None, log=print):
        self.max_time, self.max_iters, self.eval_interval, self.eval_cost = max_time, max_iters, eval_interval, eval_cost
        self.timed_from, self.fit_at, self.refit_every, self.log = (time_from, 0.0), fit_at, refit_every, log
        # a checkpoint's count stands for the same max_time only: {"max_time", "iters"}
        self.fitted = saved if saved and saved["max_time"] == max_time else None

    @property
    def last(self) -> int:
        """The last iteration: max_iters, or fewer where fewer fit in max_time."""
        return min(self.max_iters, self.fitted["iters"]) if self.fitted else self.max_iters

    def done(self, iter_num: int, elapsed: float, iter_start: int) -> bool:
        """Whether the run ends now: at its last iteration, or out of time (after one iteration at least)."""
        out_of_time = self.max_time > 0 and elapsed >= self.max_time and iter_num > iter_start
        if out_of_time and iter_num < self.last:
            self.log(f"max_time={self.max_time:.0f}s reached at iteration {iter_num}, before the {self.last} planned")
        return iter_num >= self.last or out_of_time

    def tick(self, iter_num: int, elapsed: float) -> None:
        """After each iteration: starts the clock at time_from, counts what fits at fit_at and every
        refit_every iterations after it (a resumed run times from its own start)."""
        if iter_num == self.timed_from[0]:
            self.timed_from = (iter_num, elapsed)
        first = self.fitted is None and iter_num == self.fit_at
        again = (self.fitted is not None and self.refit_every > 0 and iter_num > self.fit_at
                 and (iter_num - self.fit_at) % self.refit_every == 0)
        if self.max_time <= 0 or not (first or again):
            return
        n = iters_in_budget(iter_num, elapsed, self.timed_from, self.max_time, self.eval_interval, self.eval_cost)
        if first:
            if n < self.max_iters:
                self.log(f"max_time={self.max_time:.0f}s: {n} of the max_iters={self.max_iters} iterations fit; "
                         "the schedule ends there")
            self.timed_from = (iter_num, elapsed)  # the later counts time the iterations after this one
        elif min(n, self.max_iters) != self.last:
            self.log(f"max_time={self.max_time:.0f}s: counted again at iteration {iter_num}, at the speed since "
                     f"iteration {self.timed_from[0]}: {min(n, self.max_iters)} iterations fit; the schedule ends there")
        self.fitted = {"max_time": self.max_time, "iters": n}


# --- checkpoints: out_dir, atomic saves, safe loads, what a resume keeps --------------------------
def same_dir(a: str, b: str) -> bool:
    """Whether two folder names are one folder: compared by real path, so a symlink (or another
    spelling) of a folder is that folder; two that exist are compared by the file system itself."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def non_finite(state_dict: dict) -> list[str]:
    """The names of a state_dict's floating-point tensors that hold NaN or inf: the weights of a run
    that diverged, never to be saved over a good checkpoint, nor loaded."""
    return [k for k, t in state_dict.items()
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]


def claim_out_dir(out_dir: str, fresh: bool, overwrite: bool, hint: str, flag: str = "--out_dir"):
    """Checks, before any work, that out_dir can take this run: it is a folder (or can be made one)
    that we can write, a fresh run would not replace a trained model there unless overwrite is set
    (hint says how to continue it instead), and no other run is using it. Returns the open lock
    file: keep it for the whole run. The kernel releases the lock when the process ends, even by
    kill -9, so a crashed run never leaves it stuck. flag: the option that names out_dir."""
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: {flag[2:]} {out_dir} is a file, not a folder: pass another {flag}")
    if fresh and os.path.exists(ckpt) and not overwrite:
        raise SystemExit(f"error: {ckpt} already holds a model, and a fresh run would replace it: {hint}, "
                         f"pass another {flag}, or --overwrite=True to replace it")
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise SystemExit(f"error: cannot write in {out_dir} ({e.strerror}): pass another {flag}") from None
    if created:  # a run stopped before it wrote anything (a bad setting, Ctrl-C) leaves no empty folder
        atexit.register(remove_if_unused, out_dir)
    try:
        import fcntl  # POSIX; elsewhere runs go unlocked

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        lock.seek(0)
        raise SystemExit(f"error: another run (process {lock.read().strip() or '?'}) is using {out_dir}: "
                         f"wait for it to end, or pass another {flag}") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def remove_if_unused(out_dir: str) -> None:
    """Removes out_dir if it holds nothing but its lock file (at exit, for claim_out_dir)."""
    with contextlib.suppress(OSError):
        if os.listdir(out_dir) == [".lock"]:
            os.remove(os.path.join(out_dir, ".lock"))
            os.rmdir(out_dir)


def disk_full(e: BaseException) -> bool:
    """Whether a failed write means a full disk (or quota): errno ENOSPC, or torch.save's RuntimeError,
    which loses the errno when the disk takes part of a write ("unexpected pos 128192 vs 128086")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(m in str(e) for m in ("unexpected pos", "file write failed"))


def save_checkpoint(obj: dict, path: str) -> None:
    """Atomic: write a temporary file, flush it to disk, then rename over the old checkpoint. A
    crash at any moment leaves either the old checkpoint or the new one, never half of one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points to them
        os.replace(tmp, path)
    except BaseException as e:  # a full disk (OSError or RuntimeError, by where it hits), Ctrl-C: no .tmp left
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError | RuntimeError):
            raise
        kept = "the previous checkpoint is intact" if os.path.exists(path) else "no checkpoint was written"
        why = str(e).splitlines()[0][:200]
        if disk_full(e):
            raise SystemExit(f"error: the disk is full: could not write {path} ({why}): {kept}: free some "
                             "space, then resume") from None
        raise SystemExit(f"error: could not write {path} ({why}): {kept}") from None
    if hasattr(os, "O_DIRECTORY"):  # and the rename itself survives a power cut
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, so a crafted file
    cannot run code while it is unpickled. Loaded into CPU memory: load_state_dict copies the
    weights and optimizer moments to their device, and the random states must stay CPU tensors."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: no checkpoint at {path}") from None
    except pickle.UnpicklingError as e:  # weights_only refused it, or it is no pickle at all
        if named := re.search(r"GLOBAL (\S+)", str(e)):  # it asks pickle to call a function to rebuild it
            raise SystemExit(f"error: {path} is not a readable checkpoint: loading it would run "
                             f"{named.group(1)}, so it may not be safe to load; this project only loads "
                             "checkpoints it wrote (train.py, dpo.py, chat.py)") from None
        # torch's text around the reason advises weights_only=False: only the reason is kept
        why = [line for line in str(e).splitlines() if line.strip() and "weights_only" not in line
               and not line.startswith(("Check the documentation", "Please file"))]
        raise SystemExit(f"error: {path} is not a readable checkpoint (damaged, or not a checkpoint: "
                         f"{(why or ['?'])[0][:200]})") from None
    except Exception as e:
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict) for k in ("model", "model_args")):
        raise SystemExit(f"error: {path} is not a checkpoint of this project (no model or model_args)")
    if ckpt["model_args"].get("arch", "gpt") not in ("gpt", "llama"):
        raise SystemExit(f"error: {path}: unknown arch {ckpt['model_args']['arch']!r} (this project trains gpt "
                         "and llama)")
    try:  # a model field added since it was saved takes its default (the model it had), so it can be checked
        ckpt["model_args"] = model_args_from(ckpt["model_args"])
    except (TypeError, ValueError) as e:  # a size out of range, a value of the wrong type
        raise SystemExit(f"error: {path}: its model_args are not a model of this project ({e})") from None
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str, dropout: float | None = None) -> torch.nn.Module:
    """The model a checkpoint (from load_checkpoint) holds, on the CPU, each thing a file of another
    project or a damaged one could lack a one-line error naming the file: a tokenizer (nanoGPT's
    checkpoints, the nearest foreign ones, have none), model_args of a known arch, weights of the
    names and shapes those model_args give (load_checkpoint checked the arch), every one of them finite."""
    args, weights = ckpt["model_args"], ckpt["model"]
    if not isinstance(ckpt.get("tokenizer"), dict):
        raise SystemExit(f"error: {path} is not a checkpoint of this project: it holds no tokenizer "
                         "(nanoGPT's checkpoints, for one, hold none): use one that train.py, dpo.py or "
                         "chat.py wrote")
    try:
        model = make_model(args if dropout is None else {**args, "dropout": dropout})
    except (TypeError, ValueError) as e:  # a field the config does not have, a size out of range
        raise SystemExit(f"error: {path}: its model_args are not a model of this project ({e})") from None
    expected = model.state_dict()
    problems = {"missing": [k for k in expected if k not in weights],
                "unexpected": [k for k in weights if k not in expected],
                "of another shape": [f"{k} {tuple(getattr(weights[k], 'shape', ()))} (model_args: "
                                     f"{tuple(v.shape)})" for k, v in expected.items()
                                     if k in weights and getattr(weights[k], "shape", None) != v.shape]}
    if any(problems.values()):
        what = [f"{label} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                for label, names in problems.items() if names]
        raise SystemExit(f"error: {path}: its weights do not match its model_args: {'; '.join(what)}: "
                         "the file is damaged or was edited, use another checkpoint")
    # a run that diverged: every sample would fail and every score be nan
    if bad := non_finite(weights):
        raise SystemExit(f"error: {path} holds non-finite weights (NaN or inf, in {bad[0]}"
                         f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the run that wrote it "
                         "diverged; use an earlier checkpoint, or train again (with a lower --learning_rate)")
    model.load_state_dict(weights)
    return model


def load_model(out_dir: str, device: str = "cpu", flag: str = "--out_dir", dropout: float | None = None):
    """The model (in eval mode), tokenizer and checkpoint saved in out_dir/ckpt.pt. flag: the option
    that names out_dir, for the error; dropout: replaces the checkpoint's (dpo.py trains without)."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path}: train one first (python train.py "
                         f"config/gutenberg.py) or pass {flag}=DIR")
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path, dropout)
    model.to(device).eval()
    return model, Tokenizer.from_state(ckpt["tokenizer"]), ckpt


def check_tokenizer(ckpt: dict, path: str, tok: Tokenizer, data_dir: str, hint: str) -> None:
    """The tokenizer of data_dir must be the checkpoint's: with another one, the same ids mean other
    strings (prepare.py run again with another vocabulary). hint: what to do instead."""
    if ckpt["tokenizer"] != tok.state():
        was = ckpt.get("data_dir", "?")
        since = "prepare.py has run there again since" if was == data_dir else f"that of {was}"
        raise SystemExit(f"error: the tokenizer of {data_dir} differs from the one {path} was trained with "
                         f"({since}): {hint}")


def keep_resumed(config: dict, given: set[str], saved: dict, keys, what: str) -> dict:
    """A resumed run keeps these keys of its checkpoint (saved): one given (by a flag or a config
    file, configurator.resolve) with another value is an error, even the default's value; one not
    given takes the saved value (so the first run's command, or a shorter one, resumes it).
    Returns the config the run goes on with; what: what the keys decide."""
    differ = [f"{k}={config[k]!r} (checkpoint: {saved[k]!r})" for k in keys
              if k in given and config[k] != saved[k]]
    if differ:
        raise SystemExit(f"error: resuming keeps {what}, but you set {', '.join(differ)}: drop these "
                         "settings, or start anew in another --out_dir")
    return {**config, **{k: saved[k] for k in keys}}


def resumed_config(ckpt: dict, path: str, config: dict, given: set[str], model_args: dict, tok: Tokenizer,
                   data_dir: str) -> dict:
    """The config train.py resumes a checkpoint with: its tokenizer, its model (a model key given with
    another value is an error, compared resolved: d_ff=0 is 4 x n_embd; one not given takes the
    checkpoint's value; dropout may change), its optimizer and parameter groups (its state holds their
    moments). The log and the saved config then say what the run is."""
    if "rng" not in ckpt:  # written by dpo.py or chat.py: weights without a training run's state
        raise SystemExit(f"error: {path} was not written by train.py, so it has no run to resume: "
                         "fine-tune it with dpo.py, or train anew with --init_from=scratch in another out_dir")
    check_tokenizer(ckpt, path, tok, data_dir, "resume on data prepared with the same tokenizer")
    model_keys = [k for k in config if k in ckpt["model_args"] and k != "dropout"]
    asked = {**config, **{k: model_args[k] for k in model_keys if k in model_args}}
    config = keep_resumed(asked, given, ckpt["model_args"], model_keys, "the checkpoint's model")
    trained_with = ckpt["config"].get("optimizer", "adamw")
    if "optimizer" in given and config["optimizer"] not in ("auto", trained_with):
        raise SystemExit(f"error: {path} was trained with --optimizer={trained_with}: resume with it, "
                         "or train anew in another --out_dir")
    config["optimizer"] = trained_with
    # an untied token table at its own rate is a parameter group of its own
    shaping = [k for k in ("embedding_lr",) if k in ckpt["config"]]
    return keep_resumed(config, given, ckpt["config"], shaping, "the checkpoint's optimizer groups")


def rng_state(rt: Runtime) -> list[dict]:
    """The random state of every process (dropout masks differ from one to the next), by rank.
    Under DDP all processes must call it together."""
    cuda = torch.cuda.get_rng_state() if rt.device_type == "cuda" else None
    state = {"torch": torch.get_rng_state(), "cuda": cuda}
    if not rt.ddp:
        return [state]
    states: list = [None] * rt.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def restore_rng_state(states: list[dict], rt: Runtime, log) -> None:
    """Each process takes back its own random state; with another number of processes than the
    checkpoint's, rank 0's (the run goes on, but its dropout masks differ from an uninterrupted one)."""
    if len(states) != rt.world_size:
        log(f"note: the checkpoint was written by {len(states)} process(es), this run has {rt.world_size}: "
            "random dropout masks will differ from an uninterrupted run")
    state = states[rt.rank] if len(states) == rt.world_size else states[0]
    torch.set_rng_state(state["torch"].cpu())
    if rt.device_type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu())


# --- data: the token files checked, passages inside one document --------------------------------------
def hold_data(data_dir: str) -> int | None:
    """A shared lock on the data folder (tokenizer.lock_data_dir), to keep while the run reads it:
    prepare.py, which locks it exclusively to replace its files, refuses meanwhile. A `prepare.py
    --force` under a running training handed it other token ids without a word. Several readers share it."""
    try:
        return lock_data_dir(data_dir, exclusive=False)  # None without one: no such folder (load_meta says so)
    except BlockingIOError:
        raise SystemExit(f"error: prepare.py is writing {data_dir}: start again once it has ended") from None


def check_token_files(data_dir: str, meta: dict) -> None:
    """Each split's .bin holds the tokens meta.json says, all of them in the vocabulary: a missing,
    truncated or foreign file is a one-line error before training, not a crash in it."""
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path) if os.path.exists(path) else -1
        if size != 2 * meta[split]["tokens"]:
            raise SystemExit(f"error: {path} is missing or damaged ({size} bytes where meta.json says "
                             f"{meta[split]['tokens']} uint16 tokens): rerun python prepare.py --force")
        if np.memmap(path, dtype=np.uint16, mode="r").max() >= meta["vocab_size"]:
            raise SystemExit(f"error: {path} holds token ids beyond the vocabulary of {meta['vocab_size']}: "
                             "rerun python prepare.py --force")


def device_memory(device: str) -> int | None:
    """Bytes a run may fill: the GPU's free memory, or the machine's (within a container's limit,
    cgroup v2); None where the system does not say."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows), or no such name
        return None
    with contextlib.suppress(OSError, ValueError), open("/sys/fs/cgroup/memory.max") as f:
        ram = min(ram, int(f.read()))  # "max": no limit (ValueError)
    return ram


def check_micro_batch(args: dict, micro_batch: int, meta: dict, data_dir: str, rt: Runtime) -> None:
    """Before the model is built (args: its model_args): each split must hold a window of
    block_size + 1 tokens, and one micro-batch must fit in memory. Its activations are estimated from below, at 4 bytes a number,
    as what backward keeps of the largest tensors: the logits and their gradient (vocab_size each per
    token) and, per layer, 4 vectors of n_embd (the inputs of attention and MLP, normed or not).
    Flash attention keeps no block_size x block_size matrix. A real run takes more (temporaries, the
    weights and optimizer state), so a refusal is never wrong, and a run that this lets through can
    still be too big."""
    T = args["block_size"]
    for split in ("train", "val"):
        if meta[split]["tokens"] <= T:
            raise SystemExit(f"error: {data_dir}/{split}.bin holds {meta[split]['tokens']:,} tokens, too few "
                             f"for a window of block_size={T} (+1): lower --block_size or prepare more text")
    per_token = 4 * (2 * args["vocab_size"] + 4 * args["n_layer"] * args["n_embd"])
    need, have = micro_batch * T * per_token, device_memory(rt.device)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if rt.device_type == "cpu" else 1  # share the RAM
    if have is not None and processes * need > have:
        each = f" in each of {processes} processes" if processes > 1 else ""
        where = "this GPU's free memory" if rt.device_type == "cuda" else "this machine's memory"
        raise SystemExit(f"error: a micro-batch of batch_size={micro_batch} x block_size={T} tokens needs at "
                         f"least {need / 2**30:,.1f} GiB for its activations{each}, more than the "
                         f"{have / 2**30:.1f} GiB of {where}: lower --batch_size (raise "
                         "--gradient_accumulation_steps to keep the batch) or --block_size")


def draw_windows(tokens, n: int, length: int, eot_id: int, seed: int) -> list[list[int]]:
    """n random windows of length tokens, each inside one document (no <|endoftext|> in it), the
    same for the same seed. Gives up with an error after 100·n draws instead of looping forever."""
    if n > 0 and len(tokens) <= length:
        raise SystemExit(f"error: the text has {len(tokens)} tokens, too few for passages of {length}")
    gen = torch.Generator().manual_seed(seed)
    windows: list[list[int]] = []
    for _ in range(100 * n):
        if len(windows) == n:
            break
        i = torch.randint(len(tokens) - length, (1,), generator=gen).item()
        w = [int(t) for t in tokens[i : i + length]]
        if eot_id not in w:
            windows.append(w)
    if len(windows) < n:
        raise SystemExit(f"error: the text has too few passages of {length} tokens inside one document for "
                         f"{n} of them")
    return windows


# --- generation: continuations in batches, streamed output, one completion scored -------------------
@torch.no_grad()
def continue_prompts(model, prompts: list[list[int]], max_new_tokens: int, eot_id: int, rt: Runtime,
                     seed: int, batch_size: int = GENERATE_BATCH, log=None, compile: bool = False,
                     **sampling) -> list[list[int]]:
    """The model's continuation of each prompt (all of one length), batch_size prompts generated
    together, each cut at its first <|endoftext|>. sampling: SamplingConfig's settings; compile:
    generate's (decode_compile decides it)."""
    gen = torch.Generator(device=rt.device).manual_seed(seed)  # on the device where generate samples
    out: list[list[int]] = []
    decoder = rt.decoder(model, compile)
    for b in range(0, len(prompts), batch_size):
        x = torch.tensor(prompts[b : b + batch_size], device=rt.device)
        with rt.autocast(decode=True):
            steps = decoder.generate(x, max_new_tokens, **sampling, eot_id=eot_id, generator=gen, compile=compile)
            rows = torch.cat([x[:, :0], *stoppable(steps)], dim=1).tolist()
        out += [r[: r.index(eot_id)] if eot_id in r else r for r in rows]
        if log:
            log(f"{len(out)}/{len(prompts)} continuations")
    return out


def stoppable(steps):
    """model.generate's tokens as they come, each after check_ctrl_c(): a compiled decode step may
    drop a Ctrl-C."""
    for nxt in steps:
        check_ctrl_c()
        yield nxt


def stream(steps, tok) -> list[int]:
    """Prints one row of model.generate's tokens as they come; returns them, without <|endoftext|>."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    ids = []
    for nxt in stoppable(steps):
        if nxt.item() == tok.eot_id:
            break
        ids.append(nxt.item())
        print(decoder.decode(tok.decode_bytes([ids[-1]])), end="", flush=True)
    print(decoder.decode(b"", final=True), flush=True)
    return ids


def has_dialogue(text: str) -> bool:
    """A French dialogue mark (dash or guillemet) in the text: eval.py measures it, chat.py can rate by it."""
    return any(mark in text for mark in ("—", "–", "«", "»"))


def completion_logits(model: torch.nn.Module, prompt: list[int], completion: list[int]):
    """One completion: the logits (T, V) that predict each of its T tokens given the prompt and
    the tokens before it, and those tokens (T,)."""
    device = next(model.parameters()).device
    x, y = pack([prompt], [completion], unwrap(model).config.block_size, device)
    logits = model(x)
    scored = y[0] != -1
    return logits[0, scored], y[0, scored]


# --- plots and metrics: one JSON line per logged step, curves drawn from them ---------------------
def log_metrics(path: str, row: dict) -> None:
    """Appends one row to a run's metrics.jsonl at once, so that a killed run keeps its history.
    Any tool reads it back: pandas.read_json(path, lines=True). A failed write (a full disk) is a
    one-line error."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        with open(path, "ab", buffering=0) as f:  # unbuffered: a failed write raises here, not at close
            start = f.seek(0, os.SEEK_END)
            try:
                while data:
                    data = data[f.write(data) :]
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(start)  # no half row left behind
                raise
    except OSError as e:
        failed = f"could not append to {path} ({e.strerror}): its earlier rows are kept"
        if disk_full(e):
            failed = f"the disk is full: {failed}, and so is the last checkpoint: free space, then resume"
        raise SystemExit(f"error: {failed}") from None


_warned: set[str] = set()  # the files read_metrics has warned about, once each


def read_metrics(path: str) -> list[dict]:
    """The rows (JSON objects) of a metrics.jsonl, none if there is no file. A last line cut short by a
    kill is skipped; any other line that is no JSON object (edited by hand, damaged) is skipped too,
    with one warning per file, so that a plot or a resume never fails on it."""
    rows, bad = [], []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            elif line.strip() and not (i == len(lines) and not line.endswith("\n")):
                bad.append(i)
    if bad and path not in _warned:
        _warned.add(path)
        print(f"warning: {path}: skipped {len(bad)} line(s) that are not JSON objects (line "
              f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})", flush=True)
    return rows


def keep_metrics(path: str, upto: int, key: str = "iter") -> None:
    """Before a run appends: a resumed run keeps the rows up to its checkpoint's step (the steps
    after it are done again, and logged again), a fresh run none. Rewritten atomically, without the
    lines read_metrics skips."""
    rows = [r for r in read_metrics(path)  # a row whose step is no number cannot be placed: dropped
            if isinstance(r.get(key, 0), (int, float)) and r.get(key, 0) <= upto]
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    except BaseException as e:  # a full disk, Ctrl-C: the file is as it was, and no .tmp is left
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        if not isinstance(e, OSError):
            raise
        raise SystemExit(f"error: {'the disk is full: ' if disk_full(e) else ''}could not rewrite {path} "
                         f"({e.strerror}): it is as it was") from None


def curve(rows: list[dict], y: str, x: str = "iter") -> tuple[list, list]:
    """(xs, ys) of the rows where both are numbers: one line of a plot."""
    xs_ys = [(r[x], r[y]) for r in rows if all(isinstance(r.get(k), (int, float)) for k in (x, y))]
    return [a for a, _ in xs_ys], [b for _, b in xs_ys]


def plot_curves(path: str, curves: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
                title: str) -> None:
    """One PNG with a line per curve: {label: (xs, ys)}. Written atomically, like checkpoints."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (xs, ys) in curves.items():
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
