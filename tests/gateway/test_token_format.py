"""The token string: its shape is checked apart from its checksum, and parse_token checks both."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.token_format import (
    BASE62_ALPHABET,
    ID_PATTERN,
    PREFIX_PATTERN,
    checksum_matches,
    issue_token,
    parse_token,
    split_token,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
prefixes = st.from_regex(PREFIX_PATTERN, fullmatch=True)
token_ids = st.from_regex(ID_PATTERN, fullmatch=True)


@PROPERTY
@given(prefixes, token_ids, st.data())
def test_a_changed_secret_keeps_its_shape_but_not_its_checksum(
    prefix: str, token_id: str, data: st.DataObject
) -> None:
    token = issue_token(prefix, token_id)
    text = str(token)
    position = data.draw(st.integers(min_value=len(text) - len(token.secret), max_value=len(text) - 1))
    replacement = data.draw(st.sampled_from(BASE62_ALPHABET).filter(lambda char: char != text[position]))
    changed = text[:position] + replacement + text[position + 1 :]

    split = split_token(changed, prefix)

    assert split is not None and str(split) == changed
    assert not checksum_matches(split)
    assert parse_token(changed, prefix) is None


@PROPERTY
@given(prefixes, token_ids)
def test_an_issued_token_splits_and_checks(prefix: str, token_id: str) -> None:
    token = issue_token(prefix, token_id)

    assert split_token(str(token), prefix) == token
    assert checksum_matches(token)


@PROPERTY
@given(st.text(max_size=90), prefixes)
def test_parse_token_is_split_token_with_a_checksum(text: str, prefix: str) -> None:
    split = split_token(text, prefix)

    assert parse_token(text, prefix) == (split if split is not None and checksum_matches(split) else None)
