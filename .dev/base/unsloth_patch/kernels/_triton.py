"""Triton, imported once for every kernel module; its absence is reported when a kernel is called."""

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = exc
