"""The typed profile (sftjobs.spec) covers the schema exactly and reads what the values say."""

from __future__ import annotations

import dataclasses

import pytest

from sftjobs import spec
from sftjobs.profile import SCHEMA, load_profile


def test_every_schema_key_has_its_typed_field_and_no_field_is_extra():
    fields = {name for name in (f.name for f in dataclasses.fields(spec.ProfileSpec)) if name not in spec.SECTIONS}
    for section, cls in spec.SECTIONS.items():
        fields |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    schema = set(SCHEMA) - {"extends"}  # extends is resolved while loading, never part of the values
    assert fields == schema


@pytest.mark.parametrize("name", ["demo", "toy", "prod", "fast"])
def test_typed_view_matches_the_values(name):
    profile = load_profile(name)
    typed = profile.spec
    v = profile.values
    assert typed.resources.gpus_per_node == v["resources"]["gpus_per_node"]
    assert typed.resources.world_size == v["resources"]["nodes"] * max(v["resources"]["gpus_per_node"], 1)
    assert typed.model.source == v["model"]["source"] and typed.data.dataset == v["data"]["dataset"]
    assert typed.launcher.setup == tuple(v["launcher"]["setup"])
    assert typed.speed.pack_rank_samples == v["speed"]["pack_rank_samples"]
    assert typed.train == v["train"] and typed.deepspeed == v["deepspeed"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.resources.nodes = 3  # a view: changing the profile means --set, not mutating objects


def test_overrides_reach_the_typed_view():
    profile = load_profile("toy", ["resources.gpus_per_node=4", "resources.nodes=2"])
    assert profile.spec.resources.world_size == 8
