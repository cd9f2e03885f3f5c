"""Triton kernels. Importing this package never needs Triton; calling a kernel does."""

from .varlen_attention import SUPPORTED_HEAD_DIMS, is_supported, varlen_attention

__all__ = ["varlen_attention", "is_supported", "SUPPORTED_HEAD_DIMS"]
