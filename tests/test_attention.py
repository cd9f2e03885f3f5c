"""The registered varlen attention: boundaries once per forward, padded batches exact, forced backends."""

from __future__ import annotations

import pytest
import torch

from unsloth_patch.errors import UnslothPatchError
from unsloth_patch.settings import Settings
from unsloth_patch.tiny import build_model, build_tokenizer
from unsloth_patch.versions import at_least

from .helpers import sft_config, sft_trainer, text_dataset

pytestmark = pytest.mark.skipif(not at_least("transformers", "4.51"), reason="AttentionInterface needs >= 4.51")


def _varlen_model(num_layers=3, **overrides):
    import unsloth_patch  # noqa: F401  (registers the attention)
    from unsloth_patch.attention.dispatch import NAME

    model = build_model("llama", vocab_size=300, num_layers=num_layers, seed=1, **overrides).eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        model.config._attn_implementation = NAME
    return model


def test_boundaries_derived_once_per_forward_not_per_layer(monkeypatch):
    from unsloth_patch.attention import dispatch

    calls = []
    original = dispatch.lengths_from_position_ids
    monkeypatch.setattr(dispatch, "lengths_from_position_ids", lambda p: calls.append(1) or original(p))
    model = _varlen_model(num_layers=3)
    ids = torch.randint(3, 300, (1, 23))
    positions = torch.cat([torch.arange(n) for n in (9, 1, 13)]).unsqueeze(0)
    with torch.no_grad():
        flat = model(input_ids=ids, position_ids=positions).logits[0]
        assert len(calls) == 1  # three layers, one derivation
        parts = [model(input_ids=ids[:, a:b]).logits[0] for a, b in ((0, 9), (9, 10), (10, 23))]
    assert (flat - torch.cat(parts)).abs().max().item() <= 1e-5


def test_collator_boundaries_are_used_without_any_derivation(monkeypatch):
    from unsloth_patch.attention import dispatch
    from unsloth_patch.collate import boundaries_from_lengths

    monkeypatch.setattr(dispatch, "lengths_from_position_ids", lambda p: pytest.fail("derived per forward"))
    model = _varlen_model()
    lengths = (5, 11, 2)
    ids = torch.randint(3, 300, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions, **boundaries_from_lengths(lengths))


def test_padded_batch_with_mask_gives_sdpa_results():
    model = _varlen_model()
    reference = build_model("llama", vocab_size=300, num_layers=3, seed=1, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 300, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("forced", ["triton", "torch"])
def test_forced_backend_that_cannot_run_is_a_clear_error_at_trainer_start(forced, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the forced backends can run")
    from unsloth_patch import settings as settings_module

    tokenizer = build_tokenizer()
    monkeypatch.setattr(settings_module, "_current", Settings(attention=forced))
    with pytest.raises(UnslothPatchError, match=f"UNSLOTH_PATCH_ATTENTION={forced}.*accepted|UNSLOTH_PATCH_ATTENTION={forced}"):
        sft_trainer(build_model("llama", vocab_size=len(tokenizer)), tokenizer, text_dataset(tokenizer, 8),
                    sft_config(tmp_path, max_length=32))


def test_boundaries_are_recomputed_for_new_positions_at_a_reused_address():
    """The next step's position_ids may land where the last step's were freed: same address, shape and
    version counter. Its boundaries must be its own, never the cached ones of the earlier tensor."""
    from unsloth_patch.attention import dispatch

    first = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    first.add_(0)  # version 1, as set_() below leaves the second tensor
    cu, longest = dispatch.boundaries(1, 8, first, first.device)
    assert cu.tolist() == [0, 3, 8] and longest == 5
    first.untyped_storage().copy_(torch.tensor([0, 1, 0, 1, 2, 3, 0, 1]).untyped_storage())  # no version bump
    second = torch.empty(0, dtype=first.dtype).set_(first.untyped_storage(), 0, (1, 8))
    assert second.data_ptr() == first.data_ptr() and second._version == first._version
    cu, longest = dispatch.boundaries(1, 8, second, second.device)
    assert cu.tolist() == [0, 2, 6, 8] and longest == 4
