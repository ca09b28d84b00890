"""Playground, Review, Loop and Versions in a real headless Chromium against `tuneship serve`'s app (real store,
real llama.cpp on the tiny run's GGUF): ask, thumbs down, correct; review and approve; the waiting count rises;
the running cycle's stage shows live; promote and roll back with a confirmation."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.loop_fixtures import served
from tests.web.conftest import screenshot, serving, wait_for

API_KEY = "web-test-key"
LOOP_SETTINGS = [
    "loop.review=required",
    "loop.min_examples=5",
    "loop.fast_path=false",  # no few-shot candidate starts by itself while the pages are driven
    "serve.trigger_every=0.3",
    "serve.max_tokens=16",
    f"serve.api_key={API_KEY}",
]


def copy_run(source, runs_dir, name):
    target = runs_dir / name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["run"].update(dir=str(runs_dir), name=name)
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    for gguf in (target / "gguf").glob(f"{source.name}-*.gguf"):
        gguf.rename(gguf.with_name(gguf.name.replace(source.name, name, 1)))
    return target


def register_gated_candidate(loop, run_dir):
    """v2: a copy of the base run, measured against the champion by the loop's own gate on the golden set, and
    registered the way a cycle registers its challenger (metrics, "gated" event)."""
    from tuneship.config import load_config
    from tuneship.loop.registry import version_gguf
    from tuneship.loop.examples import prompts_from
    from tuneship.loop.gate import run_gate

    champion = loop.store.champion()
    cfg = load_config(run_dir / "config.yaml")
    candidate = loop.store.add_version(
        id=2,
        name=run_dir.name,
        parent_id=champion.id,
        run_dir=str(run_dir),
        gguf=str(version_gguf(cfg, run_dir)),
        status="candidate",
        example_ids=[],
        metrics={},
    )
    sets = {"golden": prompts_from(loop.store.examples(split="golden"))}
    decision = run_gate(champion, candidate, sets, loop.cfg)
    loop.store.update_version(2, metrics={"gate": decision.metrics})
    loop.store.add_event(
        "gated", "test", "; ".join(decision.reasons), {"promoted": decision.is_promoted, **decision.metrics}, 2
    )
    return decision


@pytest.fixture(scope="module")
def loop_site(exported_run, tmp_path_factory):
    from tuneship.loop.registry import open_loop
    from tuneship.serve.app import create_app

    _, run_dir = exported_run
    runs = tmp_path_factory.mktemp("web-loop") / "runs"
    base = copy_run(run_dir, runs, "tiny")
    loop = open_loop(base, LOOP_SETTINGS)
    decision = register_gated_candidate(loop, copy_run(run_dir, runs, "tiny-v2"))
    with serving(create_app(loop, trigger=True)) as url:
        yield url, loop, decision
    loop.store.close()


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def sign_in(driver, url: str, page: str, key: str = API_KEY) -> None:
    """Open `page`; where it sends to the sign-in form, sign in with `key` and come back to it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url + page)
    if "/signin" in driver.current_url and page != "/signin":
        driver.find_element(By.ID, "admin-key").send_keys(key + Keys.ENTER)
        wait_for(driver, lambda d: d.current_url == url + page, f"signing in did not lead back to {page}")


def session_cookie(driver) -> dict:
    [cookie] = [c for c in driver.get_cookies() if c["name"].startswith("tuneship_session_")]
    return cookie


def test_ask_rate_down_correct_review_approve_and_the_waiting_count_rises(browser, loop_site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, loop, _ = loop_site
    browser.get(url + "/loop")
    browser.delete_all_cookies()
    browser.get(url + "/loop")  # a stranger gets the sign-in form and nothing of the store
    assert browser.current_url == url + "/signin?next=/loop" and not browser.find_elements(By.ID, "waiting")
    assert browser.find_element(By.ID, "admin-key").accessible_name == "Admin key"
    browser.find_element(By.ID, "admin-key").send_keys("not-the-key" + Keys.ENTER)
    wait_for(browser, lambda d: "not the admin key" in text_of(d, "signin-error"), "a wrong key was not refused")
    sign_in(browser, url, "/loop")
    cookie = session_cookie(browser)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # out of the pages' scripts' reach
    waiting_before = int(text_of(browser, "waiting"))
    assert text_of(browser, "threshold") == "5"
    screenshot(browser, tmp_path, "loop")

    browser.get(url + "/playground")
    assert browser.find_element(By.ID, "chat-input").accessible_name == "Your message"
    assert browser.find_element(By.ID, "chat-model").accessible_name == "Model"
    browser.find_element(By.ID, "chat-input").send_keys("Question number 1?")
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.text == "Ask"
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    answer = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.answer"), "no answer came")[0]
    generation_id = answer.get_attribute("data-generation")
    assert loop.store.generation(generation_id).messages[-1]["content"] == "Question number 1?"
    down = answer.find_element(By.CSS_SELECTOR, ".rate-down")
    assert down.accessible_name == "Thumbs down"
    browser.delete_cookie(cookie["name"])
    down.click()  # the session ended meanwhile: the page says so instead of failing
    wait_for(browser, lambda d: "sign-in has ended" in text_of(d, "notice"), "no word about the ended sign-in")
    assert loop.store.feedback_for(generation_id) == []

    browser.add_cookie(cookie)
    down.click()
    state = answer.find_element(By.CSS_SELECTOR, ".feedback-state")
    wait_for(browser, lambda d: state.text == "thanks: rated down", "thumbs down was not recorded")
    answer.find_element(By.CSS_SELECTOR, ".correct-open").click()
    field = browser.switch_to.active_element
    assert field.accessible_name == "Corrected answer"
    field.send_keys("The corrected answer number 1.")
    answer.find_element(By.CSS_SELECTOR, "form.correction button").click()
    wait_for(browser, lambda d: state.text == "correction sent", "the correction was not recorded")
    assert [(f.rating, f.correction) for f in loop.store.feedback_for(generation_id)] == [
        ("down", None),
        (None, "The corrected answer number 1."),
    ]
    screenshot(browser, tmp_path, "playground")

    item_selector = f'.review-item[data-generation="{generation_id}"]'

    def reviewed_item(driver):
        driver.get(url + "/review")
        return driver.find_elements(By.CSS_SELECTOR, item_selector)

    item = wait_for(browser, reviewed_item, "the feedback never reached the review queue")[0]
    assert item.find_element(By.CSS_SELECTOR, ".prompt").text == "Question number 1?"
    assert item.find_element(By.CSS_SELECTOR, ".correction").text == "The corrected answer number 1."
    assert item.find_element(By.CSS_SELECTOR, ".rating").text == "down"
    audit = item.find_element(By.CSS_SELECTOR, ".audit").text
    dropped = [e for e in loop.store.examples(status="rejected") if e.provenance.get("generation") == generation_id]
    # the tiny random model answers blank: the audit drops the KTO example of that empty answer, and says so
    assert all(f"dropped {e.kind}: {e.reason}" in audit for e in dropped)
    assert dropped or "passed the data audit" in audit
    screenshot(browser, tmp_path, "review")
    item.find_element(By.CSS_SELECTOR, '[data-action="approve"]').click()
    wait_for(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, item_selector), "the item stayed")
    assert "1 item(s) approved" in text_of(browser, "notice")
    statuses = {e.kind: e.status for e in loop.store.examples() if e.provenance.get("generation") == generation_id}
    assert statuses["sft"] == "accepted"  # the pair of a blank answer is dropped too (its rejected answer is empty)
    assert statuses["dpo"] == ("rejected" if "dpo" in {e.kind for e in dropped} else "accepted")

    browser.get(url + "/loop")
    assert int(text_of(browser, "waiting")) == waiting_before + 1


def test_review_edits_and_bulk_rejects(browser, loop_site):
    from selenium.webdriver.common.by import By

    url, loop, _ = loop_site
    from tuneship.loop.signals import harvest

    ids = []
    for question in ("Question number 2?", "Question number 3?", "Question number 4?"):
        generation = served(loop.store, f"gen-{question[-2]}", question, "wrong")
        loop.store.add_feedback(generation.id, "up", None, None)
        ids.append(generation.id)
    harvest(loop.store, loop.cfg)
    sign_in(browser, url, "/review")
    first = browser.find_element(By.CSS_SELECTOR, f'.review-item[data-generation="{ids[0]}"]')
    first.find_element(By.CSS_SELECTOR, '[data-action="edit"]').click()
    edited = browser.switch_to.active_element
    assert edited.accessible_name == "Edited answer"
    edited.clear()
    edited.send_keys("Answer number 2, edited.")
    first.find_element(By.CSS_SELECTOR, ".edit-form button").click()
    wait_for(browser, lambda d: "edited and approved" in text_of(d, "notice"), "the edit failed")
    made = [e for e in loop.store.examples() if e.provenance.get("generation") == ids[0]]
    assert {e.conversation["messages"][-1]["content"]: e.status for e in made if e.kind == "sft"} == {
        "wrong": "rejected",
        "Answer number 2, edited.": "accepted",
    }
    browser.find_element(By.ID, "review-select-all").click()
    browser.find_element(By.CSS_SELECTOR, '[data-bulk="reject"]').click()
    wait_for(browser, lambda d: "2 item(s) rejected" in text_of(d, "notice"), "the bulk reject failed")
    for generation_id in ids[1:]:
        assert {e.status for e in loop.store.examples() if e.provenance.get("generation") == generation_id} == {
            "rejected"
        }


def test_loop_page_shows_the_running_cycles_stage_live_and_refuses_a_second_cycle(browser, loop_site):
    from selenium.webdriver.common.by import By

    url, loop, _ = loop_site
    sign_in(browser, url, "/loop")
    assert text_of(browser, "cycle-stage") == "no cycle running"
    assert browser.find_element(By.ID, "cycle-progress").accessible_name == "Cycle progress"
    assert loop.store.acquire_lease("cycle", "web-test", 60, stage="train")
    try:
        wait_for(browser, lambda d: text_of(d, "cycle-stage") == "train", "the stage did not show up live")
        assert browser.find_element(By.ID, "cycle-progress").get_attribute("value") == "3"
        loop.store.renew_lease("cycle", "web-test", 60, stage="gate")
        wait_for(browser, lambda d: text_of(d, "cycle-stage") == "gate", "the next stage did not show up live")
        browser.find_element(By.ID, "start-cycle").click()  # never two cycles at once: the API's 409, in words
        wait_for(browser, lambda d: "a cycle is already running (gate)" in text_of(d, "notice"), "no 409 shown")
    finally:
        loop.store.release_lease("cycle", "web-test")
    wait_for(browser, lambda d: text_of(d, "cycle-stage") == "no cycle running", "the finished cycle stayed")


def test_versions_page_promotes_and_rolls_back_after_a_confirmation(browser, loop_site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    url, loop, decision = loop_site
    sign_in(browser, url, "/versions")

    def row_status(version_id):
        return browser.find_element(By.CSS_SELECTOR, f'#versions tr[data-version="{version_id}"] .status').text

    assert (row_status(1), row_status(2)) == ("champion", "candidate")
    v2 = browser.find_element(By.CSS_SELECTOR, '#versions tr[data-version="2"]')
    assert decision.reasons[0] in v2.text
    golden = decision.metrics["challenger"]["golden"]
    assert f"stop rate {golden['stop_rate']:.0%} / " in v2.text
    screenshot(browser, tmp_path, "versions")
    promote = v2.find_element(By.CSS_SELECTOR, "button.promote")
    assert promote.accessible_name == "Promote v2 to champion"
    promote.click()
    wait_for(browser, expected_conditions.alert_is_present(), "no confirmation").dismiss()
    assert loop.store.champion().id == 1
    promote.click()
    wait_for(browser, expected_conditions.alert_is_present(), "no confirmation").accept()
    wait_for(browser, lambda d: row_status(2) == "champion", "v2 was not promoted")
    assert loop.store.champion().id == 2 and row_status(1) == "retired"
    assert "promoted" in browser.find_element(By.ID, "events").text
    browser.find_element(By.ID, "rollback").click()
    wait_for(browser, expected_conditions.alert_is_present(), "no confirmation").accept()
    wait_for(browser, lambda d: row_status(1) == "champion", "the rollback did not restore v1")
    assert row_status(2) == "rejected" and loop.store.champion().id == 1
    assert "rolled_back" in browser.find_element(By.ID, "events").text


def test_review_api_refuses_bad_input_with_the_field_named(loop_site):
    import httpx

    url, _, _ = loop_site
    auth = {"Authorization": f"Bearer {API_KEY}"}
    refused = httpx.post(url + "/v1/review", json={"generation_ids": ["x"], "action": "approve"})
    assert refused.status_code == 401 and refused.json()["error"]["param"] == "Authorization"
    unknown = httpx.post(url + "/v1/review", json={"generation_ids": ["nope"], "action": "approve"}, headers=auth)
    assert unknown.status_code == 404 and "nothing pending review for 'nope'" in unknown.json()["error"]["message"]
    bad_action = httpx.post(url + "/v1/review", json={"generation_ids": ["x"], "action": "maybe"}, headers=auth)
    assert bad_action.status_code == 422 and bad_action.json()["error"]["param"] == "action"
    empty = httpx.post(url + "/v1/review/x/edit", json={"correction": "   "}, headers=auth)
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "correction"


def test_every_visible_control_on_every_page_has_an_accessible_name(browser, loop_site):
    from selenium.webdriver.common.by import By

    url, _, _ = loop_site
    unnamed = []
    for page in ("/", "/playground", "/review", "/versions", "/loop", "/signin"):
        sign_in(browser, url, page)
        controls = browser.find_elements(By.CSS_SELECTOR, "a, button, input, select, textarea, progress, img")
        assert len(controls) > 5, page
        unnamed += [
            f"{page}: <{c.tag_name} id={c.get_attribute('id')!r} class={c.get_attribute('class')!r}>"
            for c in controls
            if c.is_displayed() and not c.accessible_name.strip()
        ]
    assert not unnamed


def test_loop_page_lists_the_servers_on_the_store_with_what_each_serves(browser, loop_site):
    from selenium.webdriver.common.by import By

    url, loop, _ = loop_site
    loop.store.report_replica("far:7:z", "far-host", "http://10.0.0.9:8000", 1, "v3 not served: sha256 differs")
    try:
        sign_in(browser, url, "/loop")
        rows = browser.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")
        texts = [row.text for row in rows]
        assert len(rows) == 2, texts  # this server (its row written at start) and the other one
        far = next(t for t in texts if "far-host" in t)
        assert "v1" in far and "v3 not served: sha256 differs" in far
        assert browser.find_element(By.ID, "replicas").accessible_name == "Servers"
    finally:
        loop.store.forget_replica("far:7:z")
