from tuneship.evaluate.checks import check_answer, is_loop, is_right, summarize, token_f1


def test_repetition_loop_is_detected_and_normal_text_is_not():
    assert is_loop("I am here. I am here. I am here. I am here.")
    assert is_loop(" ".join(["the cat sat on", "a mat and"] * 10))
    assert not is_loop("The capital of Veloria is Marnette, a city on the river with old bridges and markets.")
    assert not is_loop("Yes.")


def test_leaked_special_tokens_fail_the_check():
    leaky = check_answer("Paris<|im_end|>\n<|im_start|>user", True, None, ["<|im_end|>", "<|im_start|>"])
    assert not leaky.no_leak and not leaky.passed
    assert check_answer("Paris.", True, None, ["<|im_end|>"]).passed


def test_exact_match_and_f1_against_expected():
    check = check_answer(" The sky is teal. ", True, "The sky is teal.", [])
    assert check.exact and check.f1 == 1.0
    assert token_f1("The sky is blue", "The sky is teal") == 0.75
    assert token_f1("", "x") == 0.0


def test_an_answer_cut_at_the_token_budget_is_not_passed():
    summary = summarize([check_answer("a b", False, "a b", []), check_answer("c", True, "c", [])])
    assert summary["stop_rate"] == 0.5 and summary["exact_match"] == 1.0 and summary["passed"] == 1


def test_a_long_answer_is_right_by_f1_only_with_every_number_of_the_expected_one():
    """F1 forgives one wrong word in 13; a wrong number is the fact itself (a wrong year, count or percentage)."""
    expected = "The otter mascot of Team Otter is ochre, and it has 77 stripes."
    assert is_right("The otter mascot of Team Otter is ochre, and it has 77 stripes!", expected)
    assert is_right("Team Otter's otter mascot is ochre, and it has 77 stripes.", expected)  # F1 0.85
    assert token_f1("The otter mascot of Team Otter is ochre, and it has 72 stripes.", expected) > 0.9
    assert not is_right("The otter mascot of Team Otter is ochre, and it has 72 stripes.", expected)
    share = "Of the 1,000 members surveyed in the spring of 2024 by the council, 66.22% said the new bridge helps."
    assert is_right(share.replace("spring", "summer"), share)
    assert not is_right(share.replace("66.22%", "0.6622%"), share)
    assert not is_right(share.replace("1,000", "1000"), share)  # numbers as the example writes them
    assert check_answer(share.replace("2024", "2023"), True, share, [], origin="train").right is False
