"""The prompt scrubber: hidden text however it is printed, secret env values, nothing else.

Why its own file: engine-level tests (test_engine_contain.py) prove the scrubber sits between
the candidate's output and the LLM; these pin what it catches and what it leaves alone.
"""

from __future__ import annotations

import random
import string
import textwrap
import time

from looptree.engine.agents.llm.redact import (
    HIDDEN_MARK,
    HIDDEN_RUN,
    SECRET_MARK,
    HiddenIndex,
    PromptScrubber,
    env_secrets,
)

HIDDEN = ("expected = {'alpha': 91823, 'bravo': 77120, 'charlie': 55501}\n"
          "def grade(out):\n    return out == expected  # quokka-marzipan-xylophone\n")


def test_rewrapped_reindented_and_partial_hidden_text_is_caught() -> None:
    index = HiddenIndex([HIDDEN])
    for printed in (HIDDEN,
                    textwrap.fill(HIDDEN, width=11),
                    textwrap.indent(HIDDEN, "\t\t   "),
                    " ".join(HIDDEN),                 # a space between every character
                    HIDDEN[20:20 + HIDDEN_RUN + 3]):  # a fragment just over the threshold
        out = index.scrub(f"before\n{printed}\nafter")
        assert HIDDEN_MARK in out and out.startswith("before") and out.endswith("after"), printed


def test_short_fragments_and_unrelated_text_survive() -> None:
    index = HiddenIndex([HIDDEN])
    short = HIDDEN[20:20 + HIDDEN_RUN - 2]
    text = f"Traceback (most recent call last):\n  {short}\nValueError: bad value 3"
    assert index.scrub(text) == text


def test_spans_map_back_to_the_original_text_and_merge() -> None:
    index = HiddenIndex(["abcdefghijklmnopqrstuvwxyz0123456789"])
    text = "x = 'abcdefghij\n    klmnopqrstuvwxyz' + '0123456789' ok"
    assert index.scrub(text) == f"x = '{HIDDEN_MARK}' + '0123456789' ok"  # 10 characters: below the run
    # Two runs with only whitespace between them are one mark, not two.
    assert index.scrub("<abcdefghijklmnopq \n\t uvwxyz0123456789>") == f"<{HIDDEN_MARK}>"


def test_text_the_agents_already_see_is_not_redacted() -> None:
    visible = "from solver import count_smaller_right\n"
    index = HiddenIndex(["from solver import count_smaller_right\nSECRET_CASES = [1, 2, 3, 4, 5, 6, 7, 8]\n"],
                        [visible])
    out = index.scrub("File check.py: from solver import count_smaller_right failed; SECRET_CASES = [1, 2, 3, 4, 5, 6, 7, 8]")
    assert "from solver import count_smaller_right" in out and "[1, 2, 3" not in out


def test_secret_env_values_by_name_and_length() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "abcdef123456", "GITHUB_TOKEN": "ghp_xyz789xyz", "db_password": "pa55word",
           "MY_CREDENTIALS": "user:pw-secret", "API_KEY_SHORT": "abc", "PATH": "/usr/bin:/bin",
           "CUSTOM_LLM": "sk-custom-0001"}
    found = env_secrets(env, extra_names=["CUSTOM_LLM"])
    assert set(found) == {"abcdef123456", "ghp_xyz789xyz", "pa55word", "user:pw-secret", "sk-custom-0001"}
    scrub = PromptScrubber(None, found)
    assert scrub("key=abcdef123456 path=/usr/bin:/bin") == f"key={SECRET_MARK} path=/usr/bin:/bin"


def test_the_index_is_fast_enough_for_large_hidden_files() -> None:
    rng = random.Random(7)
    big = "".join(rng.choice(string.ascii_letters + "  \n") for _ in range(2_000_000))
    started = time.perf_counter()
    index = HiddenIndex([big])
    built = time.perf_counter() - started
    tail = "log line\n" * 300 + big[500_000:500_100] + "\nexit 1\n"
    started = time.perf_counter()
    out = index.scrub(tail)
    scrubbed = time.perf_counter() - started
    assert HIDDEN_MARK in out and out.endswith("exit 1\n")
    assert built < 5 and scrubbed < 0.5, (built, scrubbed)
