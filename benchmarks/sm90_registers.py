"""Registers, spills and shared memory of every kernel the attention ops launch, compiled for an
H100 (sm_90) on a machine without a GPU: the ops' own host code picks the launch configuration
(kernels/triton_common.py, ``_config``), tests/triton_harness.py's ``compiled_for_sm90`` compiles
instead of launching, and ptxas (shipped with Triton) reports. No timing: what it shows is
whether a configuration spills registers to local memory, which costs speed on the GPU.

    python benchmarks/sm90_registers.py [--out benchmarks/results/sm90_registers.md]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from triton_harness import compiled_for_sm90  # noqa: E402

from zoo.kernels import triton_na, triton_routed  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def ptxas(kernel) -> tuple:
    """(registers, spill store bytes, spill load bytes) of a compiled kernel's PTX for sm_90a."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        text = subprocess.run([str(PTXAS), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
        text = text.stdout + text.stderr
    finally:
        os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    stores, loads = (sum(int(x) for x in re.findall(rf"(\d+) bytes spill {kind}", text))
                     for kind in ("stores", "loads"))
    return regs, stores, loads


def na_case(dtype, dim):
    """NAT-style: kernel 7, bias table with its gradient, plus per-window extra tokens."""
    q, k, v = (torch.randn(2, 28, 28, 2, dim, dtype=dtype) for _ in range(3))
    rpb = torch.randn(2, 13, 13)
    ak, av = (torch.randn(2, 4, 4, 4, 2, dim, dtype=dtype) for _ in range(2))
    geo = ((7, 7), (7, 7), (1, 1), (0, 0))
    out, lse = triton_na._forward(q, k, v, rpb, ak, av, *geo, dim ** -0.5)
    triton_na._backward(torch.randn_like(out), q, k, v, out, lse, rpb, ak, av, *geo, dim ** -0.5,
                        rpb_grad=True)


def routed_case(dtype, dim):
    q, k, v = (torch.randn(2, 28, 28, 2, dim, dtype=dtype) for _ in range(3))
    index = torch.randint(0, 49, (2, 49, 4))
    out, lse = triton_routed._forward(q, k, v, index, (4, 4), dim ** -0.5)
    triton_routed._backward(torch.randn_like(out), q, k, v, out, lse, index, (4, 4), dim ** -0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/sm90_registers.md")
    parser.add_argument("--dims", default="32,64,128")
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args()
    rows = []
    for op, case in (("na2d", na_case), ("routed", routed_case)):
        for dname in args.dtypes.split(","):
            for dim in (int(d) for d in args.dims.split(",")):
                with compiled_for_sm90() as compiled:
                    case(DTYPES[dname], dim)
                for i, (name, kernel) in enumerate(compiled):
                    regs, stores, loads = ptxas(kernel)
                    md = kernel.metadata
                    mode = " (backward)" if name.endswith("query_kernel") and i == 1 else ""
                    rows.append(f"| {op} | {dname} | {dim} | {name}{mode} | {md.num_warps} | "
                                f"{regs} | {stores} / {loads} | {md.shared} |")
                    print(rows[-1], flush=True)
    header = (f"# Registers and spills on sm_90 (ptxas, no GPU)\n\n"
              f"`python benchmarks/sm90_registers.py`, triton {triton.__version__}, torch "
              f"{torch.__version__}. Launch configurations as the ops choose them on a GPU.\n\n"
              "| op | dtype | head dim | kernel | warps | registers | spill stores / loads (bytes) "
              "| shared (bytes) |\n|---|---|---|---|---|---|---|---|\n")
    Path(args.out).write_text(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
