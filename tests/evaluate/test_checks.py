from tuneship.evaluate.checks import check_answer, is_loop, summarize, token_f1


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
