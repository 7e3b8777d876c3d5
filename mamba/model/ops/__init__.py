"""Pure-PyTorch kernels of the Mamba-1, Mamba-2 and Mamba-3 layers, each beside the plain reference
the tests check it against; `kernels` dispatches to mamba-ssm's CUDA kernels where they can run."""
from mamba.model.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref
from mamba.model.ops.mamba3_scan import mamba3_scan_chunked, mamba3_scan_ref, mamba3_step_update
from mamba.model.ops.rms_norm import RMSNorm, RMSNormGated
from mamba.model.ops.selective_scan import selective_scan, selective_scan_ref
from mamba.model.ops.ssd import ssd_chunked, ssd_ref

__all__ = ["RMSNorm", "RMSNormGated", "causal_conv1d", "causal_conv1d_ref", "mamba3_scan_chunked",
           "mamba3_scan_ref", "mamba3_step_update", "selective_scan", "selective_scan_ref", "ssd_chunked",
           "ssd_ref"]
