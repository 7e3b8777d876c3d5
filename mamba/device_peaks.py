"""What a device can do: peak FLOP/s for MFU (the denominator).

MFU = achieved model FLOP/s per device (the model's flops_per_batch, forward + backward, summed
over ranks by Composer's SpeedMonitor) / the device's peak dense FLOP/s at the run's precision.
One table for training (logging), the config planner (create_mamba_config.py's wall-time
estimate) and benchmarks/model_gpu.py; importing it needs neither Composer nor torch.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

log = logging.getLogger(__name__)

# Peak dense (no 2:4 sparsity) matrix FLOP/s per GPU, as (bf16, tf32). NVIDIA data sheets print
# the sparse figure with a footnote; the dense one is half of it:
#   H100 SXM / NVL / PCIe ("NVIDIA H100 Tensor Core GPU"): BF16 1,979 / 1,671 / 1,513 TFLOPS sparse;
#     TF32 989 / 835 / 756 sparse.  H200 SXM / NVL ("NVIDIA H200 Tensor Core GPU"): as H100 SXM / NVL.
#   B200 ("NVIDIA DGX B200", per GPU): BF16 4.5 PFLOPS sparse, TF32 2.2 PFLOPS sparse.
#   A100 SXM and PCIe ("NVIDIA A100 Tensor Core GPU"): BF16 312 dense, TF32 156 dense.
#   L40S: BF16 362.05 dense, TF32 183 dense.  L4: BF16 121 dense, TF32 60 dense.  A10: BF16 125
#     dense, TF32 62.5 dense.
#   AMD Instinct MI300X: BF16 1,307.4, TF32 653.7 dense; MI250X: BF16 383, no TF32 (FP32 matrix 95.7).
# Order matters: the first entry whose every word occurs in the name wins, so the specific variants
# (NVL, PCIe) come before the plain name (the SXM part), and L40S before L4.
GPU_PEAK_FLOPS: list[tuple[tuple[str, ...], float, float]] = [
    (("H100", "NVL"), 835.5e12, 417.5e12),
    (("H100", "PCIe"), 756.5e12, 378e12),
    (("H100",), 989.5e12, 494.5e12),
    (("H200", "NVL"), 835.5e12, 417.5e12),
    (("H200",), 989.5e12, 494.5e12),
    (("B200",), 2250e12, 1100e12),
    (("A100",), 312e12, 156e12),
    (("L40S",), 362.05e12, 183e12),
    (("L4",), 121e12, 60e12),
    (("A10",), 125e12, 62.5e12),
    (("MI300X",), 1307.4e12, 653.7e12),
    (("MI250X",), 383e12, 95.7e12),
]


def gpu_peak_flops(device_name: str, precision: str) -> Optional[float]:
    """Peak dense FLOP/s of a GPU named like torch.cuda.get_device_name() ("NVIDIA H100 80GB
    HBM3") or like create_mamba_config.py's --gpu ("H100-80GB"); None if not in the table.

    precision "amp_bf16" uses the bf16 column; "fp32" the TF32 one (torch uses TF32 matmuls when
    allowed, and MFU against the fp32 CUDA-core peak would flatter the run).
    """
    words = device_name.replace("-", " ").split()
    for keys, bf16, tf32 in GPU_PEAK_FLOPS:
        if all(k in words for k in keys):
            return bf16 if precision == "amp_bf16" else tf32
    return None


def measure_cpu_matmul_flops(n: int = 512, seconds: float = 0.5) -> float:
    """FLOP/s of float32 (n, n) @ (n, n) matmuls on this process's torch threads.

    A measured ceiling, not a datasheet figure: on CPU there is no table to trust (core counts,
    AVX-512 and clocks vary), so MFU is reported against what this rank's threads can reach.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up the BLAS thread pool
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)  # one multiply-add = 2 FLOPs


def peak_flops_per_device(configured: Optional[float], device: str, precision: str) -> Optional[float]:
    """The MFU denominator: the configured value, else the GPU table, else a CPU measurement."""
    if configured is not None:
        return float(configured)
    if device == "gpu":
        import torch

        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops(name, precision)
        if peak is None:
            log.warning("no peak FLOP/s known for GPU %r: MFU is not logged; set "
                        "logging.peak_flops_per_device to the datasheet's dense figure", name)
        return peak
    peak = measure_cpu_matmul_flops()
    log.info("MFU on CPU is relative to a measured float32 matmul peak of %.3g FLOP/s per rank "
             "(set logging.peak_flops_per_device to override)", peak)
    return peak
