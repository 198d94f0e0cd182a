import pytest

from cmoe_carve.errors import SpecError
from cmoe_carve.spec import check_spec_fits, parse_spec


def test_parse_valid_specs():
    spec = parse_spec("S2A2E16")
    assert (spec.num_shared, spec.top_k, spec.num_experts) == (2, 2, 16)
    assert spec.num_routed == 14
    assert spec.active_fraction == 0.25
    assert str(parse_spec("s3a3e8")) == "S3A3E8"
    assert parse_spec("S0A1E2").num_shared == 0


def test_expert_size_pads_up():
    assert parse_spec("S2A2E16").expert_size(1536) == 96  # 1536 / 16
    assert parse_spec("S1A1E7").expert_size(100) == 15  # 7 * 15 = 105: five zero neurons


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("S2A2", "expected S<shared>A<active>E<total>"),  # missing E
        ("2-2-16", "expected"),  # wrong syntax
        ("S16A1E16", "leave no routed expert"),  # all shared
        ("S2A15E16", "exceed the 14 routed"),  # more active than routed
        ("S1A0E8", "at least 1"),  # nothing routed per token
        ("S0A1E1", "at least 2"),  # a single expert is not a mixture
    ],
)
def test_invalid_specs_name_the_problem(text, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_spec(text)


def test_spec_larger_than_ffn():
    with pytest.raises(SpecError, match="only 8 neurons"):
        check_spec_fits(parse_spec("S1A1E16"), 8)


def test_package_entry_points_resolve():
    import cmoe_carve
    from cmoe_carve.pipeline import carve

    assert callable(carve)
    assert cmoe_carve.load_carved.__name__ == "load_carved"
    assert cmoe_carve.CarveConfig().spec == "S2A2E16"
