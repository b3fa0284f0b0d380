"""Text hygiene before tokenization: invalid UTF-8 and control characters, handled and counted, never silent.

Crawled corpora (WMT's Common Crawl part above all) hold a few records with broken encodings, NULs, form
feeds and C1 controls. ``clean_text`` decodes and normalises one field and says what it had to fix; the
length pass counts those fixes per run (``PipelineStats``'s neighbour in the data report).
"""

import re

# What a field can need fixing, in report order.
TEXT_ISSUES = ("invalid_utf8", "control_characters")
INVALID_UTF8_POLICIES = ("replace", "error")
# Unicode category Cc: C0 (tab and newline included: a sentence pair is one line), DEL and C1.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


class DataError(ValueError):
    """A data set is missing or holds a record that cannot be used; the message names the file or record."""


def clean_text(value: str | bytes, *, invalid_utf8: str = "replace") -> tuple[str, tuple[str, ...]]:
    """Decodes ``value`` and replaces each run of control characters with one space.

    Args:
      value: the raw field (``bytes`` are read as UTF-8, as TFDS returns them).
      invalid_utf8: ``"replace"`` (undecodable bytes become U+FFFD) or ``"error"`` (raise ``DataError``).

    Returns:
      ``(text, issues)``: the cleaned text and which of ``TEXT_ISSUES`` it had.

    Example:
      >>> clean_text(b"caf\\xc3\\xa9\\x00 ok\\xff")
      ('café  ok�', ('invalid_utf8', 'control_characters'))
    """
    issues = []
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            if invalid_utf8 == "error":
                context = value[max(error.start - 12, 0) : error.end + 12]
                raise DataError(f"invalid UTF-8 at byte {error.start} ({context!r})") from None
            value = value.decode("utf-8", errors="replace")
            issues.append("invalid_utf8")
    text, replaced = _CONTROL.subn(" ", value)
    if replaced:
        issues.append("control_characters")
    return text, tuple(issues)
