"""SSM kernels: selective scan, its one-step update and causal depthwise conv, each with a
reference twin.

``selective_scan``, ``selective_state_update`` (one decoding step) and ``causal_conv1d`` choose
their implementation at call time; the ``*_ref`` functions are the test oracles.
``selective_scan_numba`` is the fused CPU kernel (optional numba dependency, imported on first
use); ``default_impl`` forces one scan path in a block.
"""
from .causal_conv1d import causal_conv1d, causal_conv1d_fast, causal_conv1d_ref
from .selective_scan import (default_impl, numba_available, selective_scan, selective_scan_fast,
                             selective_scan_numba, selective_scan_ref)
from .state_update import selective_state_update, selective_state_update_ref

__all__ = ["causal_conv1d", "causal_conv1d_fast", "causal_conv1d_ref", "default_impl",
           "numba_available", "selective_scan", "selective_scan_fast", "selective_scan_numba",
           "selective_scan_ref", "selective_state_update", "selective_state_update_ref"]
