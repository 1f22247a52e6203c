from __future__ import annotations

import numpy as np
import pytest

from mmea_calc import AdaptedModel, MMEAConfig
from mmea_calc.errors import AdapterNotFoundError, ConfigError, NoCandidateAdapterError
from mmea_calc.selection import (
    AdapterSelector,
    describe_environment,
    descriptor_distance,
    invariant_descriptors,
)
from mmea_calc.testing import build_tiny_mace, random_cluster


@pytest.fixture
def model():
    model = AdaptedModel(build_tiny_mace())
    for name in ("a", "b"):
        model.add_adapter(name, MMEAConfig(rank=2), set_active=False)
    return model


def test_callable_is_asked_once_per_composition(model):
    calls = []

    def pick(atoms):
        calls.append(len(atoms))
        return "a" if len(atoms) > 5 else "b"

    selector = AdapterSelector(model, select=pick)
    six, moved_six, four = random_cluster(6, seed=1), random_cluster(6, seed=1), random_cluster(4)
    moved_six.positions += 0.3  # same composition, new positions: the answer is remembered
    assert selector.choose(six).name == "a" and selector.choose(moved_six).name == "a"
    assert selector.choose(four).name == "b"
    assert calls == [6, 4]
    selector.reselect()
    selector.choose(six)
    assert calls == [6, 4, 6]
    assert selector.choose(six).reason == "callable"


def test_tag_wins_and_names_are_checked(model):
    selector = AdapterSelector(model, select="a")
    atoms = random_cluster(5)
    assert selector.choose(atoms).name == "a"
    atoms.info["mmea_adapter"] = "b"
    assert selector.choose(atoms).name == "b"
    atoms.info["mmea_adapter"] = "base"
    assert selector.choose(atoms).name is None
    atoms.info["mmea_adapter"] = "nope"
    with pytest.raises(AdapterNotFoundError, match=r"\['a', 'b'\]"):
        selector.choose(atoms)
    del atoms.info["mmea_adapter"]
    model.delete_adapter("a")  # an explicit choice of a deleted adapter is an error, not stale
    with pytest.raises(AdapterNotFoundError, match="'a'"):
        selector.choose(atoms)


def test_bad_rules_are_config_errors(model):
    with pytest.raises(ConfigError, match="select=42"):
        AdapterSelector(model, select=42)
    with pytest.raises(ConfigError, match="on_unknown='never'"):
        AdapterSelector(model, on_unknown="never")
    with pytest.raises(AdapterNotFoundError):
        AdapterSelector(model, select="water")


def test_revision_counts_rule_changes(model):
    selector = AdapterSelector(model)
    seen = selector.revision
    selector.select = "a"
    selector.on_unknown = "base"
    selector.reselect()
    assert selector.revision == seen + 3


def test_auto_choices_are_forgotten_when_the_adapters_change(model):
    hc = [random_cluster(8, ("H", "C"), seed=s) for s in range(3)]
    model.adapter_metadata("a")["environment"] = describe_environment(model, hc)
    selector = AdapterSelector(model)
    atoms = random_cluster(8, ("H", "C"), seed=9)
    assert selector.choose(atoms).name == "a"
    model.delete_adapter("a")
    with pytest.raises(NoCandidateAdapterError, match="'b': 'unknown"):
        selector.choose(atoms)
    model.add_adapter(
        "c", MMEAConfig(rank=2), metadata={"environment": describe_environment(model, hc)}
    )
    assert selector.choose(atoms).name == "c"


def test_descriptor_distance_is_small_inside_and_large_outside(model):
    train = [random_cluster(8, ("H", "C"), seed=s) for s in range(6)]
    env = describe_environment(model, train)
    assert env["elements"] == ["H", "C"] and env["n_structures"] == 6
    inside = random_cluster(8, ("H", "C"), seed=40)
    squeezed = inside.copy()
    squeezed.positions *= 0.6  # compressed: far outside what the environment saw
    d_in, d_out = (
        descriptor_distance(invariant_descriptors(model, [a])[0], a.numbers, env)
        for a in (inside, squeezed)
    )
    assert d_in < 3.0 < d_out
    assert np.isfinite([d_in, d_out]).all()
