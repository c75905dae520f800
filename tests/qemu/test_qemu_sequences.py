"""The stop sequence: which QEMU release sent it, beside the seed's."""
import pytest

from vhostlab.qemu.sequences import explain_stop, expected_stop_variant

TAIL = ["SET_VRING_ADDR", "SET_VRING_ADDR"]


def test_seed_sequence_is_only_get_vring_base():
    s = explain_stop(TAIL + ["GET_VRING_BASE", "GET_VRING_BASE"], (5, 2, 0))
    assert s.variant == "seed" and s.as_seed
    assert s.observed == s.seed == ("GET_VRING_BASE", "GET_VRING_BASE")
    assert s.expected == "seed" and "expected" not in s.text


def test_qemu_7_2_resets_before_the_rings_stop():
    reqs = TAIL + [("SET_STATUS", {"value": 0}), "GET_VRING_BASE", "GET_VRING_BASE"]
    s = explain_stop(reqs, (7, 2, 19))
    assert s.variant == s.expected == "status-first"
    assert s.observed == ("SET_STATUS 0", "GET_VRING_BASE", "GET_VRING_BASE")
    assert s.seed == ("GET_VRING_BASE", "GET_VRING_BASE")
    assert "7.2" in s.text


def test_qemu_8_1_and_later_reset_after_the_rings_stop():
    reqs = TAIL + ["GET_VRING_BASE", "GET_VRING_BASE", ("SET_STATUS", {"value": 0})]
    s = explain_stop(reqs, (10, 0, 13))
    assert s.variant == s.expected == "status-last"
    assert s.observed[-1] == "SET_STATUS 0" and "8.1" in s.text


def test_a_start_status_is_not_a_reset():
    reqs = [("SET_STATUS", {"value": 15}), "GET_VRING_BASE", "GET_VRING_BASE"]
    assert explain_stop(reqs).variant == "seed"


def test_a_sequence_that_disagrees_with_the_version_says_so():
    s = explain_stop(["GET_VRING_BASE", "GET_VRING_BASE"], (10, 0, 0))
    assert s.variant == "seed" and s.expected == "status-last"
    assert "would be expected" in s.text


def test_the_last_stop_counts():
    reqs = ["GET_VRING_BASE", ("SET_STATUS", {"value": 0}), "SET_VRING_BASE",
            ("SET_STATUS", {"value": 0}), "GET_VRING_BASE", "GET_VRING_BASE"]
    assert explain_stop(reqs).observed == ("SET_STATUS 0", "GET_VRING_BASE", "GET_VRING_BASE")


def test_no_stop_is_a_named_error():
    with pytest.raises(ValueError, match="GET_VRING_BASE"):
        explain_stop(["SET_FEATURES"])


@pytest.mark.parametrize("version,variant", [((5, 2), "seed"), ((7, 1, 9), "seed"),
                                             ((7, 2, 0), "status-first"),
                                             ((8, 0, 5), "status-first"),
                                             ((8, 1, 0), "status-last"),
                                             ((10, 0, 13), "status-last")])
def test_expected_variant_by_release(version, variant):
    assert expected_stop_variant(version) == variant
    assert expected_stop_variant(version, status_negotiated=False) == "seed"
