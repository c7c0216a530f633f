"""The NAME[:key=value,...] spelling shared by backbones, detectors, datasets."""

from __future__ import annotations

import pytest

from kad.errors import SpecError
from kad.utils.specs import parse_spec, split_specs


def test_values_are_read_as_literals_and_the_canonical_form_is_sorted():
    spec = parse_spec("knn:method=kth,n_neighbors=5,scale=0.5,grades=(3,4),flag=true")
    assert spec.options == {"method": "kth", "n_neighbors": 5, "scale": 0.5,
                            "grades": (3, 4), "flag": True}
    assert str(parse_spec("a:y=2,x=1")) == str(parse_spec("a:x=1,y=2")) == "a:x=1,y=2"


def test_a_list_of_specs_keeps_each_spec_whole():
    assert split_specs("iforest,knn:n_neighbors=5,method=kth,ocsvm") == [
        "iforest", "knn:n_neighbors=5,method=kth", "ocsvm"]
    assert split_specs("supervised:backbone=mobilenet_v2:alpha=0.35,epochs=3,dagmm") == [
        "supervised:backbone=mobilenet_v2:alpha=0.35,epochs=3", "dagmm"]
    assert split_specs("dr:anomaly_grades=(3,4)") == ["dr:anomaly_grades=(3,4)"]


@pytest.mark.parametrize("bad", ["", "9lives", "knn:n_neighbors", "knn:a=1,a=2", "knn:=3"])
def test_malformed_specs_are_refused_with_the_text(bad):
    with pytest.raises(SpecError) as info:
        parse_spec(bad)
    assert repr(bad) in str(info.value)
