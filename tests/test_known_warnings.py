"""Known harmless warnings of dependencies are filtered by message and module, nothing more."""
import warnings

import pytest

from mamba.known_warnings import KNOWN, quiet_known_warnings

SAMPLES = {  # a real message each filter is for (as torch / Composer word it), and the module it comes from
    "FSDP2": ("FSDP2 Config/APIs are experimental and subject to heavy changes", "composer.utils.parallelism"),
    "TypedStorage": ("TypedStorage is deprecated. It will be removed in the future", "torch.distributed.checkpoint.filesystem"),
    "no_dist": ("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
                "in a single process.", "torch.distributed.checkpoint.state_dict_loader"),
}


def shown(message: str, module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn_explicit(message, UserWarning, filename=module.replace(".", "/") + ".py", lineno=1, module=module)
    return bool(caught)


def test_every_filter_has_a_sample():
    assert len(SAMPLES) == len(KNOWN)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_known_warning_from_its_module_is_filtered(name):
    assert not shown(*SAMPLES[name])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_same_text_from_elsewhere_and_other_text_from_that_module_still_show(name):
    message, module = SAMPLES[name]
    assert shown(message, "mamba.training.trainer")
    assert shown("something else went wrong", module)
