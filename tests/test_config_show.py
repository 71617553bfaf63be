"""Discoverable settings: every key with its value, default, type and description."""

from __future__ import annotations

import dataclasses

from fasttrain.config import Config, describe_config, field_docs, load_config


def test_every_setting_is_described_with_its_value_and_default():
    cfg = load_config(None, ["optim.lr=0.5", "data.image_size=64"])
    rows = {f.key: f for f in describe_config(cfg)}
    n_fields = 1 + sum(len(dataclasses.fields(f.type if isinstance(f.type, type) else getattr(Config(), f.name)))
                       for f in dataclasses.fields(Config) if f.name != "name")
    assert len(rows) == n_fields
    assert rows["optim.lr"].value == 0.5 and rows["optim.lr"].default == 0.1 and rows["optim.lr"].type == "float"
    assert "pixels" in rows["data.image_size"].description  # the unit travels with the description
    assert [k for k, f in rows.items() if not f.description] == []  # a new field without a docstring fails here


def test_field_docs_reads_the_string_under_each_field():
    @dataclasses.dataclass
    class Section:
        a: int = 1
        """First, in
        two lines."""
        b: str = "x"
        c: float = 0.0
        """Third."""

    assert field_docs(Section) == {"a": "First, in two lines.", "c": "Third."}
