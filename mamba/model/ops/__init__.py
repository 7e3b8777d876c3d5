"""Pure-PyTorch kernels of the Mamba-1 layer, each beside the plain reference the tests check it against."""
from mamba.model.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref
from mamba.model.ops.rms_norm import RMSNorm
from mamba.model.ops.selective_scan import selective_scan, selective_scan_ref

__all__ = ["RMSNorm", "causal_conv1d", "causal_conv1d_ref", "selective_scan", "selective_scan_ref"]
