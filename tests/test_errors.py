"""`errors.capped` and `errors.did_you_mean`: the readable lists and hints of every error message."""
from dnn_cool_catalyst.errors import InputError, capped, did_you_mean


def test_capped_lists_the_first_items_then_counts_the_rest():
    assert capped(["a", 1, "b"]) == "'a', 1, 'b'"
    assert capped(range(250), shown=3) == "0, 1, 2 and 247 more"
    assert capped(["row 3 (2.0)", "row 4 (1.0)"], shown=1, quote=False) == "row 3 (2.0) and 1 more"
    assert capped([]) == ""


def test_did_you_mean_offers_close_names_then_the_known_ones():
    known = ["door_open", "door_locked", "person_flow.body.shirt_type"]
    text = did_you_mean("door_opn", known)
    assert text.startswith("; did you mean 'door_open'")
    assert text.endswith("(known: door_locked, door_open, person_flow.body.shirt_type)")
    # no close full name: the names whose last dotted part is close
    assert "'person_flow.body.shirt_type'" in did_you_mean("shirt_typ", known, listed=0)
    assert did_you_mean("zzz", known, listed=0) == ""
    assert did_you_mean("zzz", [], listed=5) == " (known: none)"
    assert did_you_mean("a0", [f"a{i}" for i in range(40)], listed=2).endswith("(known: a0, a1 and 38 more)")


def test_input_error_shows_its_message_plainly():
    assert str(InputError("batch has no 'x'")) == "batch has no 'x'"  # KeyError would quote it
