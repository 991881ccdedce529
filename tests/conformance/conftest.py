"""Parameter lists for the conformance suite, built from the registry.

Every registered model of a kind, and every mode its config lists in ``conformance_variants``, is
tested by the files for that kind:
``test_causal_lm.py`` takes the ``causal_lm_name`` fixture; files for masked autoencoders and
sequence regressors take ``masked_ae_name`` / ``seq_regression_name``. Adding a model to the registry
adds it to every test of its kind with no change here. Models are built with ``checks.build_small``
(the model's ``small_overrides()``, seeded, plus e.g. ``vocab_size=32``).
"""

from __future__ import annotations

import pytest

import hierseq


def with_variants(names: list[str]) -> list[str]:
    """Every model, then each of its ``conformance_variants`` (config fields that switch on another
    mode of the same mixer) as a spec ``"name:field=value+field=value"``."""
    specs = []
    for name in names:
        specs.append(name)
        for variant in getattr(hierseq.get_entry(name).config_cls, "conformance_variants", ()):
            specs.append(name + ":" + "+".join(f"{k}={v}" for k, v in variant.items()))
    return specs


CAUSAL_LMS: list[str] = with_variants(hierseq.list_models(kind="causal_lm"))
MASKED_AES: list[str] = hierseq.list_models(kind="masked_ae")
SEQ_REGRESSORS: list[str] = hierseq.list_models(kind="seq_regression")


@pytest.fixture(params=CAUSAL_LMS)
def causal_lm_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=MASKED_AES)
def masked_ae_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=SEQ_REGRESSORS)
def seq_regression_name(request: pytest.FixtureRequest) -> str:
    return request.param
