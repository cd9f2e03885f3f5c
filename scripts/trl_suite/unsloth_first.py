"""pytest plugin loaded first (-p unsloth_first): imports unsloth_patch before trl/transformers are imported."""
import sys
assert "trl" not in sys.modules, "trl already imported before unsloth_patch"
import unsloth_patch  # noqa: F401
