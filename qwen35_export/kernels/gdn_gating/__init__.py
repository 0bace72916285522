"""GDN gating (g, beta from A_log, a, dt_bias, b) and the gated RMSNorm: references, kernels, torch ops."""

from .gating import gated_rms_norm_fwd, gdn_gating_fwd
from .op import gated_rms_norm, gdn_gating
from .reference import naive_gated_rms_norm, naive_gdn_gating

__all__ = ["gated_rms_norm", "gated_rms_norm_fwd", "gdn_gating", "gdn_gating_fwd", "naive_gated_rms_norm",
           "naive_gdn_gating"]
