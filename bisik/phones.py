"""Phone numbers: parse what customers type into E.164 (`+6281234567890`), and mask them for logs.

Numbers written without a country code are read in the default region (BISIK_DEFAULT_PHONE_REGION,
`ID`), so the Indonesian forms `0812-3456-7890`, `812 3456 7890`, `62812...` and `+62 812...` all
become `+6281234567890`. Parsing and validation use `phonenumbers`, the Python port of Google's
libphonenumber, so a number is valid only when its length and prefix fit its region's plan.
"""

from __future__ import annotations

from typing import Any

import phonenumbers

# Longer input is not a phone number; libphonenumber itself gives up past 250 characters.
MAX_INPUT_LENGTH = 64
PARSE_ERRORS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "invalid country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "not a number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short after the international prefix",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
    phonenumbers.NumberParseException.TOO_LONG: "too long",
}


class InvalidPhoneNumber(ValueError):
    """A value is not a valid phone number in its own country code or in the default region."""


def parse_phone(value: Any, default_region: str = "ID") -> str:
    """Return `value` as an E.164 string, or raise InvalidPhoneNumber saying why it is not one.

    The error message never repeats the number, so it may be logged and stored.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise InvalidPhoneNumber(f"a phone number must be a non-empty string, got {type(value).__name__}")
    if len(value) > MAX_INPUT_LENGTH:
        raise InvalidPhoneNumber(f"a phone number has at most {MAX_INPUT_LENGTH} characters, got {len(value)}")
    try:
        number = phonenumbers.parse(value, default_region.upper())
    except phonenumbers.NumberParseException as error:
        raise InvalidPhoneNumber(f"not a phone number: {PARSE_ERRORS.get(error.error_type, 'unreadable')}") from None
    if not phonenumbers.is_valid_number(number):
        region = phonenumbers.region_code_for_number(number) or default_region.upper()
        raise InvalidPhoneNumber(f"not a valid phone number for region {region}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_phone(value: Any, default_region: str = "ID") -> str | None:
    """Return `value` as an E.164 string, or None when it is missing or not a valid number."""
    try:
        return parse_phone(value, default_region)
    except InvalidPhoneNumber:
        return None


def mask_phone(number: str) -> str:
    """Keep the first three and the last three digits: `+6281234567890` becomes `+628*******890`."""
    digits = number.lstrip("+")
    if len(digits) <= 6:
        return "+" + "*" * len(digits)
    return "+" + digits[:3] + "*" * (len(digits) - 6) + digits[-3:]
