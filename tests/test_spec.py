"""The spec grammar: parsing, typing, canonical round trips and error messages."""

from __future__ import annotations

import math
from typing import Literal

import pytest

from normzoo.errors import SpecError
from normzoo.registries import Registry
from normzoo.spec import split_spec


class ToyNorm:
    def __init__(self, num_features: int, *, p: float = 2.0, centered: bool = False, groups: int = 4,
                 mode: Literal["a", "b"] = "a", eps: float = 1e-5, device=None, dtype=None) -> None:
        self.kwargs = dict(p=p, centered=centered, groups=groups, mode=mode, eps=eps)


@pytest.fixture
def reg() -> Registry:
    registry = Registry("norms")
    registry.add("test", "toy", ToyNorm, summary="toy", positional="p")
    registry.add("test", "plain", ToyNorm, summary="no positional")
    return registry


@pytest.mark.parametrize("text", ["toy", "toy:inf", "toy:1,centered=true", "toy:3.5,groups=2,mode=b",
                                  "toy,p=1", "plain,eps=0.001", " toy : 2 , centered = yes "])
def test_canonical_round_trip(reg, text):
    spec = reg.parse(text)
    assert reg.parse(spec.canonical()) == spec
    assert reg.parse(spec) == spec


def test_values_are_typed_and_defaults_filled(reg):
    spec = reg.parse("toy:inf,centered=true")
    assert spec.kwargs == {"p": math.inf, "centered": True, "groups": 4, "mode": "a", "eps": 1e-5}
    assert spec.canonical() == "toy:inf,centered=true,groups=4,mode=a,eps=1e-05"
    assert spec.short() == "toy:inf"
    assert reg.parse("toy:2").canonical().startswith("toy:2,")


def test_build_passes_core_and_spec_arguments(reg):
    built = reg.build("toy:1,groups=8", 16, device="cpu")
    assert built.kwargs["p"] == 1.0 and built.kwargs["groups"] == 8


@pytest.mark.parametrize("text, words", [
    ("tyo", ["unknown norm 'tyo'", "did you mean 'toy'", "valid: plain, toy"]),
    ("toy:abc", ["'p' must be a number"]),
    ("toy,centred=true", ["no parameter 'centred'", "did you mean 'centered'", "valid:"]),
    ("toy,groups=2.5", ["'groups' must be an integer"]),
    ("toy,centered=maybe", ["true or false"]),
    ("toy,mode=c", ["one of a, b"]),
    ("toy,p=nan", ["must not be nan"]),
    ("plain:2", ["takes no positional value"]),
    ("toy:1,2", ["not key=value"]),
    ("toy,p=1,p=2", ["given twice"]),
    ("", ["empty spec"]),
    ("toy,", ["empty item"]),
])
def test_bad_specs_name_the_problem(reg, text, words):
    with pytest.raises(SpecError) as info:
        reg.parse(text)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_split_accepts_key_value_after_colon():
    assert split_spec("noisy-bn:mu=0.5,sigma=1.25") == ("noisy-bn", None, [("mu", "0.5"), ("sigma", "1.25")])
    assert split_spec("timm:resnet18.a1_in1k") == ("timm", "resnet18.a1_in1k", [])
