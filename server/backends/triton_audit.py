"""Compile-only audit of the Triton kernels for a GPU this machine does not have.

The interpreter (how CI runs the kernels) checks what they compute, never how they compile:
whether Hopper's pipeline survives, whether a tile configuration spills registers or needs more
shared memory than a block may have, how many distinct compilations serving would trigger. This
module answers those questions on any machine, from the *real* launches:

- `recording()` captures the launches that `triton_ops`' host functions make (nothing runs);
- `specialisation_key(launch)` is what Triton's launcher would key its compile cache on for that
  launch (argument types, 16-byte alignment and divisibility of pointers and integers, the
  constexprs) plus the autotuner's key: two launches with the same key never compile twice;
- `compile_launch(launch, config)` compiles one launch for `sm_<arch>` with the launch's real
  specialisation, one autotune config, and returns the IR and resource use (`Compiled`).

The kernels must have been defined compiled-mode (`TRITON_INTERPRET=0`, which `triton_ops` does
only where a GPU is present): the tests run the compile checks in a subprocess. The launch
binding uses Triton's own specialisation code (`triton.runtime.jit`, internal), checked against
Triton 3.6-3.9.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

from server.backends import triton_ops as ops


@dataclass
class Launch:
    """One recorded kernel launch: the kernel object (autotuner or jit function) and its arguments."""

    kernel: Any
    args: tuple
    meta: dict

    @property
    def jit_function(self) -> Any:
        """The jit function (compiled mode) or interpreted function behind the kernel object."""
        kernel = self.kernel
        return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel

    @property
    def name(self) -> str:
        fn = self.jit_function
        return getattr(fn, "__name__", None) or fn.fn.__name__

    @property
    def configs(self) -> list[triton.Config]:
        """The autotune configs this launch would try (after the kernel's pruning); one fixed one otherwise."""
        kernel = self.kernel
        if not isinstance(kernel, triton.runtime.Autotuner):
            return [triton.Config({}, num_warps=4, num_stages=3)]
        prune = getattr(kernel, "early_config_prune", None)
        configs = list(kernel.configs)
        if prune:
            configs = prune(configs, self.named_args(), **self.meta)
        return configs

    def named_args(self) -> dict[str, Any]:
        names = self.jit_function.arg_names
        return {**dict(zip(names, self.args, strict=False)), **self.meta}

    @property
    def autotune_key(self) -> tuple:
        kernel = self.kernel
        if not isinstance(kernel, triton.runtime.Autotuner):
            return ()
        named = self.named_args()
        return tuple(named[k] for k in kernel.keys)


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, `triton_ops.launch` records instead of running (outputs stay unwritten)."""
    launches: list[Launch] = []
    original = ops.launch

    def record(kernel, grid, *args, **meta) -> None:
        launches.append(Launch(kernel, args, meta))

    ops.launch = record
    try:
        yield launches
    finally:
        ops.launch = original


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _bind(launch: Launch, config: triton.Config | None, arch: int) -> tuple:
    """Triton's own binding of the launch: (bound args, specialisation, options) as its launcher computes them."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = launch.jit_function
    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn if hasattr(fn, "fn") else fn)
    backend = make_backend(_target(arch))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    meta = dict(launch.meta)
    if config is not None:
        meta.update(config.all_kwargs())
    bound_args, specialisation, options = binder(*launch.args, **meta)
    return jit, backend, meta, bound_args, specialisation, options


def specialisation_key(launch: Launch, arch: int = 90) -> tuple:
    """What decides whether this launch compiles anew: Triton's specialisation (types, alignments,
    constexprs) and the autotuner's key (a new key means benchmarking every config)."""
    # The tiles the autotuner picks are a function of its key: bind with its first candidate.
    config = launch.configs[0] if isinstance(launch.kernel, triton.runtime.Autotuner) else None
    _, _, _, _, specialisation, _ = _bind(launch, config, arch)
    return (launch.name, tuple(map(str, specialisation)), launch.autotune_key)


@dataclass
class Compiled:
    """One compiled launch: IR and what it costs the multiprocessor."""

    name: str
    config: str
    ttgir: str
    shared_bytes: int
    registers: int
    spill_bytes: int  # local memory per thread (register spills); 0 is what every config must give
    notes: list[str] = field(default_factory=list)

    def k_loops(self) -> list[str]:
        """The bodies of the TTGIR loops over K that run a dot (the GEMM's main loops; the epilogue's
        loops over rank chunks and sparse entries are not K loops)."""
        return [body for header, body in _loop_bodies(self.ttgir) if " to %K " in header and "dot" in body]


def compile_launch(launch: Launch, config: triton.Config | None = None, arch: int = 90) -> Compiled:
    """Compile the launch for `sm_<arch>` with its real specialisation and `config`'s tiles."""
    from triton.compiler import ASTSource

    if ops.INTERPRET:
        raise RuntimeError("kernels were defined for the interpreter; import with TRITON_INTERPRET=0")
    jit, backend, meta, bound_args, specialisation, options = _bind(launch, config, arch)
    options, signature, constexprs, attrs = jit._pack_args(backend, meta, bound_args, specialisation, options)
    compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=_target(arch),
                              options=options.__dict__)
    registers, spills = cubin_resources(compiled.asm["cubin"])
    described = "" if config is None else f"{config.kwargs} w{config.num_warps} s{config.num_stages}"
    return Compiled(launch.name, described, compiled.asm["ttgir"], compiled.metadata.shared, registers, spills)


def cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill bytes per thread) from `cuobjdump -res-usage`, which ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    registers, stack, local = (int(g) for g in found.groups())
    return registers, stack + local


def _loop_bodies(ir: str) -> list[tuple[str, str]]:
    """(header, body) of every `scf.for` region (innermost included), by brace matching."""
    bodies = []
    for match in re.finditer(r"scf\.for\b[^\n]*\{\n", ir):
        depth, index = 1, match.end()
        while depth and index < len(ir):
            depth += {"{": 1, "}": -1}.get(ir[index], 0)
            index += 1
        bodies.append((match.group(0), ir[match.end():index]))
    return bodies


def pipelining_problems(compiled: Compiled) -> list[str]:
    """Why the K loop(s) would not overlap loads and wgmma on Hopper; empty when they do.

    Software-pipelined means, in the TTGIR of each loop that runs a dot: the dot is an async
    wgmma that is left in flight (its wait keeps ≥ 1 pending), tiles arrive by async copies into
    shared memory, and every other tensor load of the loop (the mask bytes) is a prefetch: its
    value is carried to the next iteration, never consumed in the iteration that loads it.
    """
    problems = []
    loops = compiled.k_loops()
    if not loops:
        return ["no K loop with a dot in the TTGIR"]
    for number, body in enumerate(loops):
        where = f"K loop {number}"
        if "warp_group_dot " not in body and "warp_group_dot\t" not in body:
            problems.append(f"{where}: no wgmma")
            continue
        if "isAsync = true" not in body:
            problems.append(f"{where}: wgmma is synchronous")
        waits = [int(n) for n in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", body)]
        if not waits or min(waits) == 0:
            problems.append(f"{where}: every wgmma is waited on in its own iteration (pendings {waits})")
        if "async_copy_global_to_local" not in body:
            problems.append(f"{where}: no async copies (tiles loaded synchronously)")
        # A register load is fine when its value is only carried to the next iteration (a prefetch:
        # the load is in flight while this iteration's wgmma runs); one consumed in its own iteration stalls.
        yielded = set(re.findall(r"%[\w.]+", "".join(re.findall(r"scf\.yield[^\n]*", body))))
        stalls = [line.strip()[:120] for line in re.findall(r"[^\n]*= tt\.load [^\n]*tensor<[^\n]*", body)
                  if line.split("=")[0].strip() not in yielded]
        if stalls:
            problems.append(f"{where}: {len(stalls)} tensor load(s) consumed in the same iteration: {stalls[0]}")
    return problems


def compile_for_gpu(arch: int = 90, dtype: torch.dtype = torch.float16) -> list[str]:
    """Compile one launch of every kernel (the whole epilogue included) for `sm_<arch>`, without a GPU.

    The interpreter runs the kernels' Python, not Triton's compiler: type or layout errors that only
    the compiled path meets (loop-carried types, `tl.dot` shapes, the bit fan-out's reshape) would
    first show on a GPU. Returns one line per kernel compiled.
    """
    n, k, rows = 256, 128, 32
    x, w, b = (torch.zeros(*shape, dtype=dtype) for shape in ((rows, k), (n, k), (n,)))
    y = torch.zeros(rows, n, dtype=dtype)
    plan = ops.SegmentPlan.build([0, 10], [10, rows], "cpu", block_m=16)
    pointers, counts = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32)
    with recording() as launches:
        t = ops.lora_shrink(x, plan, pointers, counts, 8)
        lora, sparse = ops.LoraExpandArgs(t, pointers, counts), ops.SparseArgs(pointers, pointers, counts)
        ops.masked_linear(x, w, b, plan, pointers, lora=lora, sparse=sparse)
        ops.lora_expand(t, plan, pointers, counts, y)
    done = []
    for launch in launches:
        compiled = compile_launch(launch, launch.configs[0], arch)
        done.append(f"{launch.name} sm_{arch} {dtype}: {compiled.shared_bytes} B shared memory, "
                    f"{compiled.registers} registers, {compiled.spill_bytes} B spilled")
    return done
