"""Random ids in the alphabets providers use (msg_01..., req_011C..., Gemini's responseId...).

Ids must be unique, not secret, so one ``random.Random`` (seeded from the OS)
makes them with a single call each: the fake mints several per request.
"""

from __future__ import annotations

import random
import string

BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
BASE62 = string.digits + string.ascii_letters
URLSAFE = BASE62 + "-_"

_RANDOM = random.Random()


def random_id(length: int, alphabet: str = BASE62) -> str:
    """length characters drawn from alphabet."""
    return "".join(_RANDOM.choices(alphabet, k=length))
