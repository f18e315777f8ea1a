"""The region spec grammar (pure Python)."""

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vr_plugin import select_layers
from vr_plugin.spec import ACCEPTED_FORMS, region_size

DEPTHS = st.integers(min_value=1, max_value=96)


def test_paper_default_on_32_layers():
    assert select_layers("uniform_0.25", 32) == [1, 5, 9, 13, 19, 23, 27, 31]
    assert select_layers("uniform_8", 32) == [1, 5, 9, 13, 19, 23, 27, 31]
    assert select_layers("uniform_25%", 32) == [1, 5, 9, 13, 19, 23, 27, 31]


@pytest.mark.parametrize(
    "depth, expected",
    [
        (24, [1, 5, 9, 15, 19, 23]),
        (28, [1, 5, 9, 14, 19, 23, 27]),
        (36, [1, 5, 9, 13, 18, 23, 27, 31, 35]),
        (40, [1, 5, 9, 13, 17, 23, 27, 31, 35, 39]),
        (48, [1, 5, 9, 13, 17, 21, 27, 31, 35, 39, 43, 47]),
    ],
)
def test_uniform_quarter_other_depths(depth, expected):
    assert select_layers("uniform_0.25", depth) == expected


def test_uniform_80_layers_shape():
    got = select_layers("uniform_0.25", 80)
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert len(got) == 20 and got[0] == 1 and got[-1] == 79
    assert sorted(set(gaps)) == [4, 6] and gaps.count(6) == 1


def test_uniform_edge_counts():
    assert select_layers("uniform_1", 32) == [16]
    assert select_layers("uniform_1.0", 32) == list(range(32))
    assert select_layers("uniform_32", 32) == list(range(32))
    assert select_layers("uniform_31", 32) == list(range(1, 32))
    assert select_layers("uniform_9", 40) == [1, 5, 10, 15, 20, 25, 30, 35, 39]
    assert select_layers("uniform_1", 1) == [0]


def test_rounding_is_half_up():
    assert region_size("0.25", 30) == 8  # 7.5 -> 8
    assert region_size("0.25", 26) == 7  # 6.5 -> 7
    assert region_size("0.1", 4) == 1  # 0.4 -> at least one layer
    assert region_size("0.12", 4) == 1  # 0.48 -> 0 -> clamped to 1


def test_blocks_and_keywords():
    assert select_layers("first_0.25", 32) == list(range(8))
    assert select_layers("last_8", 32) == list(range(24, 32))
    assert select_layers("middle_0.25", 32) == list(range(12, 20))
    assert select_layers("middle_3", 8) == [2, 3, 4]
    assert select_layers("all", 4) == [0, 1, 2, 3]
    assert select_layers(" ALL ", 4) == [0, 1, 2, 3]
    assert select_layers("none", 4) == []


def test_random_is_deterministic_and_seeded():
    a = select_layers("random_0.25", 32)
    assert a == select_layers("random_0.25_seed0", 32)
    assert len(a) == 8 and a == sorted(set(a))
    assert select_layers("random_8_seed7", 32) == select_layers("random_8_seed7", 32)
    assert select_layers("random_8_seed7", 32) != select_layers("random_8_seed8", 32)


def test_lists_and_slices():
    assert select_layers("1,5,9", 32) == [1, 5, 9]
    assert select_layers(" 9 , 1,5 ", 32) == [1, 5, 9]
    assert select_layers("1::4", 32) == list(range(1, 32, 4))
    assert select_layers("0:16:2", 32) == list(range(0, 16, 2))
    assert select_layers("0:4,8,12", 32) == [0, 1, 2, 3, 8, 12]
    assert select_layers("-1", 32) == [31]
    assert select_layers("::-8", 32) == [7, 15, 23, 31]
    assert select_layers([3, 1], 8) == [1, 3]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1,5,5", "more than once"),
        ("0:4,2", "more than once"),
        ("32", "out of range"),
        ("-33", "out of range"),
        ("0:40", "out of range"),
        ("uniform_0", "layer count 0"),
        ("uniform_0.0", "not in (0, 1]"),
        ("uniform_1.5", "not in (0, 1]"),
        ("uniform_150%", "not in (0, 1]"),
        ("uniform_33", "outside 1..32"),
        ("uniform_-0.25", "neither a fraction"),
        ("uniform_abc", "neither a fraction"),
        ("diagonal_0.25", "unknown strategy"),
        ("uniform_0.25_seed3", "only random"),
        ("1,,2", "empty item"),
        ("1::0", "step 0"),
        ("20:10", "selects no layer"),
        ("1:2:3:4", "not a slice"),
        ("1;5", "not a layer index"),
        ("@#!", "not a layer index"),
    ],
)
def test_rejections_name_value_depth_and_forms(spec, fragment):
    with pytest.raises(ValueError) as info:
        select_layers(spec, 32)
    message = str(info.value)
    assert fragment in message
    assert repr(spec) in message and "32 decoder layers" in message and ACCEPTED_FORMS in message


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "32"])
def test_bad_num_layers(bad):
    with pytest.raises(ValueError, match="num_layers"):
        select_layers("all", bad)


def test_bad_list_types():
    with pytest.raises(ValueError, match="integers only"):
        select_layers([1, "2"], 8)
    with pytest.raises(ValueError, match="empty"):
        select_layers([], 8)


def _valid(indices, depth):
    return indices == sorted(set(indices)) and all(0 <= i < depth for i in indices)


@settings(max_examples=300, deadline=None)
@given(depth=DEPTHS, data=st.data())
def test_every_strategy_valid_at_every_depth(depth, data):
    k = data.draw(st.integers(min_value=1, max_value=depth))
    fraction = data.draw(st.floats(min_value=0.001, max_value=1.0, allow_nan=False))
    size_text = data.draw(st.sampled_from([str(k), f"{fraction:.4f}", f"{100 * fraction:.2f}%"]))
    strategy = data.draw(st.sampled_from(["uniform", "first", "last", "middle", "random"]))
    spec = f"{strategy}_{size_text}"
    if float(size_text.rstrip("%")) == 0:
        return
    expected_k = region_size(size_text, depth)
    got = select_layers(spec, depth)
    assert _valid(got, depth) and len(got) == expected_k
    if strategy in ("first", "last", "middle"):
        assert got == list(range(got[0], got[0] + expected_k))


@settings(max_examples=200, deadline=None)
@given(depth=DEPTHS, data=st.data())
def test_uniform_properties(depth, data):
    k = data.draw(st.integers(min_value=1, max_value=depth))
    got = select_layers(f"uniform_{k}", depth)
    assert _valid(got, depth) and len(got) == k
    if 1 < k < depth:
        assert got[0] == 1 and got[-1] == depth - 1
        if depth % 2 == 0 or k % 2 == 0:  # else the middle point sits on a half-integer
            assert sorted(depth - i for i in got) == got  # mirror-symmetric about L/2
        gaps = [b - a for a, b in zip(got, got[1:])]
        assert max(gaps) - min(gaps) <= 2  # evenly spread


@settings(max_examples=200, deadline=None)
@given(depth=DEPTHS, data=st.data())
def test_lists_and_slices_valid(depth, data):
    picks = data.draw(
        st.lists(
            st.integers(min_value=-depth, max_value=depth - 1),
            min_size=1,
            max_size=depth,
            unique_by=lambda i: i % depth,
        )
    )
    got = select_layers(",".join(map(str, picks)), depth)
    assert got == sorted(i % depth for i in picks)
    start = data.draw(st.integers(min_value=0, max_value=depth - 1))
    step = data.draw(st.integers(min_value=1, max_value=depth))
    assert select_layers(f"{start}::{step}", depth) == list(range(start, depth, step))


@settings(max_examples=200, deadline=None)
@given(depth=DEPTHS, junk=st.text(min_size=1, max_size=12))
def test_any_string_either_valid_or_clear_error(depth, junk):
    try:
        got = select_layers(junk, depth)
    except ValueError as error:
        assert "Accepted forms" in str(error) and f"{depth} decoder layers" in str(error)
    else:
        assert _valid(got, depth)


def test_spec_module_imports_no_torch():
    code = "import sys, vr_plugin; vr_plugin.select_layers('uniform_0.25', 32); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
