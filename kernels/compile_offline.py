"""Compile the sparse decode kernels for NVIDIA GPUs on a machine that has none (Triton's offline compiler).

    python -m kernels.compile_offline                    # sm_80 (A100) and sm_90 (H100/H200), every dtype
    python -m kernels.compile_offline --arch 90 --dtypes float16

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python on the CPU and checks what they compute; it
does not compile them, so a construct that the interpreter runs and the GPU compiler refuses passes every
interpreter test. This compiles both kernels through the GPU compiler (`triton.compile` to a cubin, with the
launcher's own compile-time arguments: `split_constants`, `merge_constants`; a launch would also specialise
the variant on its pointers' alignment and strides divisible by 16, which this leaves out), for the LLaVA-7B
head dim
(128, and 64 as a smaller model's), a group of 1 (multi-head attention) and of 4 (grouped-query), and
prints what each became: the cubin's size, whether its products run on tensor cores (`mma` or `wgmma`
instructions in the PTX) and whether an fp32 product was lowered to TF32 (it must not be: the kernel asks
for "ieee"). Nothing runs: it checks that the kernels compile, not what they compute or how fast.
"""
import inspect
import re

# tinyavl first, before torch: in a command, a Ctrl-C while torch imports is one line (tinyavl/startup.py).
from tinyavl.cli import ArgumentParser, check_stdout_open, first_paragraph, run_main
from tinyavl.errors import UserError

import torch

from kernels.sparse_attention import (COMPILE_OPTIONS, INTERPRETED, TRITON_AVAILABLE, _merge_splits_kernel,
                                      _split_attention_kernel, merge_constants, split_constants)

ARCHS = (80, 90)                    # compute capabilities: A100, H100 / H200
HEAD_DIMS = (128, 64)
GROUPS = (1, 4)
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}    # torch's names -> Triton's


def compile_kernel(kernel, arch: int, types: dict, constants: dict):
    """The kernel compiled for compute capability `arch`: its runtime arguments typed as `types` says ("*fp16":
    a pointer to fp16, "fp32": a float), every other one an int32 (the launcher's lengths, strides and
    counts); `constants` its constexprs."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in names}
    constexprs = {(names.index(name),): value for name, value in constants.items()}
    return triton_compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                          options=COMPILE_OPTIONS)


def split_types(dtype: str) -> dict:
    """The types of `_split_attention_kernel`'s runtime arguments that are not int32, for q, K and V in `dtype`."""
    triton_dtype = DTYPES[dtype]
    return {"q_ptr": f"*{triton_dtype}", "k_ptr": f"*{triton_dtype}", "v_ptr": f"*{triton_dtype}", "index_ptr": "*i64",
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32"}


# A tensor-core product in PTX: mma.sync (sm_80) or wgmma (sm_90), as an instruction at the start of a line (the
# PTX also holds the source file's path, which could hold "mma" anywhere); TF32 if its operands are .tf32.
TENSOR_CORE_PRODUCT = re.compile(r"^\s*(wg)?mma\.(\S*)", re.MULTILINE)


def compile_both(arch: int, dtype: str, head_dim: int, group: int) -> dict:
    """Both kernels compiled for one model shape: {"split": ..., "merge": ...}, each the facts `main` prints."""
    triton_dtype, torch_dtype = DTYPES[dtype], getattr(torch, dtype)
    split = compile_kernel(_split_attention_kernel, arch, split_types(dtype),
                           split_constants(group, head_dim, torch_dtype))
    merge = compile_kernel(_merge_splits_kernel, arch,
                           {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{triton_dtype}",
                            "lse_ptr": "*fp32"},
                           merge_constants(head_dim))
    return {name: products(kernel) | {"cubin_bytes": len(kernel.asm["cubin"])}
            for name, kernel in (("split", split), ("merge", merge))}


def products(kernel) -> dict:
    """{"tensor_cores": whether a compiled kernel's PTX has a tensor-core product, "tf32": one on TF32 operands}."""
    found = [match.group(2) for match in TENSOR_CORE_PRODUCT.finditer(kernel.asm["ptx"])]
    return {"tensor_cores": bool(found), "tf32": any(".tf32" in kind for kind in found)}


def main(argv=None) -> None:
    parser = ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(ARCHS),
                        help="compute capabilities to compile for (80: A100, 90: H100 and H200)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="the dtypes of q, K and V to compile for")
    args = parser.parse_args(argv)
    check_stdout_open("results")
    if not TRITON_AVAILABLE:
        raise UserError("compiling the kernels needs Triton: pip install triton")
    if INTERPRETED:
        raise UserError("TRITON_INTERPRET=1 is set: the kernels are the interpreter's then; unset it to compile them")
    print("| arch | dtype | head dim | group | split cubin | merge cubin | tensor cores | TF32 |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.arch:
        for dtype in args.dtypes:
            for head_dim in HEAD_DIMS:
                for group in GROUPS:
                    built = compile_both(arch, dtype, head_dim, group)
                    split, merge = built["split"], built["merge"]
                    print(f"| sm_{arch} | {dtype} | {head_dim} | {group} | {split['cubin_bytes']} B | "
                          f"{merge['cubin_bytes']} B | {'yes' if split['tensor_cores'] else 'no'} | "
                          f"{'yes' if split['tf32'] else 'no'} |", flush=True)


if __name__ == "__main__":
    run_main(main)
