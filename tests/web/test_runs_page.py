"""The Runs page in a real headless Chromium: stages, audit, loss plot, eval table with one column per artifact."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.web.conftest import screenshot, serving
from tuneship.serve.web.runs import run_path

STAGES = ["data", "train", "eval", "export", "template", "deploy"]


def runs_app(runs_dir):
    from fastapi import FastAPI

    from tuneship.serve.web.pages import mount_web

    app = FastAPI()
    mount_web(app, runs_dir)
    return app


@pytest.fixture(scope="module")
def runs_site(exported_run):
    _, run_dir = exported_run
    with serving(runs_app(run_dir.parent)) as url:
        yield url, run_dir


def column_texts(driver, table_id: str, column: int) -> list[str]:
    from selenium.webdriver.common.by import By

    return [c.text for c in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr > :nth-child({column})")]


def test_runs_page_shows_the_runs_stages_audit_loss_plot_and_eval_table(browser, runs_site, tmp_path):
    from selenium.webdriver.common.by import By

    url, run_dir = runs_site
    browser.get(url + "/")
    assert browser.find_element(By.ID, "run-heading").text.startswith("tiny")
    assert column_texts(browser, "stages", 1) == STAGES
    assert column_texts(browser, "stages", 2) == ["done"] * 5 + ["not reachable"]
    seconds = column_texts(browser, "stages", 3)
    assert all(float(s) >= 0 for s in seconds)
    audit = json.loads((run_dir / "data" / "audit.json").read_text())
    totals = browser.find_element(By.ID, "audit-totals").text
    assert f"Read {audit['totals']['records_read']} records" in totals and "dropped 2" in totals
    assert column_texts(browser, "audit-counts", 1) == ["duplicate", "empty-response"]
    assert column_texts(browser, "audit-counts", 2) == ["1", "1"]
    browser.find_element(By.CSS_SELECTOR, "#audit-details summary").click()
    where = column_texts(browser, "audit-findings", 1)
    assert where[0].endswith("facts.jsonl:13") and where[1].endswith("facts.jsonl:14 [messages[1]]"), where
    loss_width = browser.execute_script("return document.getElementById('loss-plot').naturalWidth")
    assert loss_width > 100  # the PNG was served and decoded
    headers = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#eval thead th")]
    assert headers == ["metric", "base", "adapter", "merged", "gguf-f16", "gguf-Q8_0"]
    report = json.loads((run_dir / "reports" / "eval.json").read_text())
    stop_row = browser.find_element(By.CSS_SELECTOR, "#eval tr[data-metric='stop_rate']")
    expected = [f"{report['models'][m]['summary']['stop_rate']:.0%}" for m in headers[1:]]
    assert [c.text for c in stop_row.find_elements(By.TAG_NAME, "td")] == expected
    rows = browser.find_elements(By.CSS_SELECTOR, "#answers tbody tr")
    assert len(rows) == len(report["prompts"])
    first_q8 = report["models"]["gguf-Q8_0"]["answers"][0]["answer"].strip()
    assert first_q8 in rows[0].find_elements(By.TAG_NAME, "td")[-1].text
    screenshot(browser, tmp_path, "runs")


def test_runs_page_controls_have_accessible_names_and_keyboard_focus(browser, runs_site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _ = runs_site
    browser.get(url + "/")
    assert not browser.find_elements(By.ID, "signout")  # no key set: nothing to sign in to
    assert browser.find_element(By.ID, "loss-plot").accessible_name.startswith("Training loss")
    assert browser.find_element(By.CSS_SELECTOR, "nav").aria_role == "navigation"
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.text == "Skip to content"
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.text == "Runs"


def test_kl_columns_from_the_quant_check_appear_when_present(browser, exported_run, tmp_path):
    from selenium.webdriver.common.by import By

    _, run_dir = exported_run
    copy = tmp_path / "runs" / "tiny"
    shutil.copytree(run_dir / "reports", copy / "reports")
    shutil.copy(run_dir / "manifest.json", copy / "manifest.json")
    report = json.loads((copy / "reports" / "eval.json").read_text())
    # the keys the export's quant faithfulness check writes, and one no page knows yet
    report["models"]["gguf-Q8_0"]["summary"].update(kl_vs_f16=0.0123, top1_agreement=0.97, new_kl_metric=0.5)
    (copy / "reports" / "eval.json").write_text(json.dumps(report))
    with serving(runs_app(tmp_path / "runs")) as url:
        browser.get(url + "/runs/tiny")
        kl = browser.find_element(By.CSS_SELECTOR, "#eval tr[data-metric='kl_vs_f16']")
        assert kl.find_element(By.TAG_NAME, "th").text == "KL vs f16"
        assert [c.text for c in kl.find_elements(By.TAG_NAME, "td")][-2:] == ["–", "0.0123"]
        top1 = browser.find_element(By.CSS_SELECTOR, "#eval tr[data-metric='top1_agreement']")
        assert top1.find_element(By.TAG_NAME, "th").text == "top-1 agreement with f16"
        assert [c.text for c in top1.find_elements(By.TAG_NAME, "td")] == ["–", "–", "–", "–", "97%"]
        assert browser.find_element(By.CSS_SELECTOR, "#eval tr[data-metric='new_kl_metric'] th").text == "new KL metric"


def test_a_broken_manifest_is_a_problem_line_an_unknown_run_a_404_and_store_pages_need_a_loop(browser, tmp_path):
    from selenium.webdriver.common.by import By

    (tmp_path / "runs" / "broken").mkdir(parents=True)
    (tmp_path / "runs" / "broken" / "manifest.json").write_text("{not json")
    with serving(runs_app(tmp_path / "runs")) as url:
        browser.get(url + "/")
        problem = browser.find_element(By.CSS_SELECTOR, ".problem").text
        assert "manifest.json could not be read" in problem
        assert browser.find_element(By.ID, "stages-heading").is_displayed()
        browser.get(url + "/runs/nothing")
        assert "no run called 'nothing'" in browser.page_source
        for page in ("playground", "review", "versions", "loop"):  # a bare app has no store: the page says so
            browser.get(f"{url}/{page}")
            assert "tuneship serve RUN" in browser.find_element(By.ID, "no-loop").text


def test_run_names_cannot_climb_out_of_the_runs_folder(tmp_path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "config.yaml").write_text("run: {name: a}\n")
    (tmp_path / "config.yaml").write_text("outside\n")
    assert run_path(tmp_path / "runs", "a") == tmp_path / "runs" / "a"
    assert run_path(tmp_path / "runs", "..") is None
    assert run_path(tmp_path / "runs", "../runs/a") is None


def test_stage_details_read_as_words_without_a_path_of_this_machine(exported_run):
    from tuneship.serve.web.runs import eval_table, read_run

    _, run_dir = exported_run
    view = read_run(run_dir)
    details = {stage.name: stage.detail for stage in view.stages}
    assert not any(str(run_dir.parent) in d or "None" in d for d in details.values()), details
    assert details["train"].startswith("adapter; steps: ") and "final loss: " in details["train"]
    assert "ggufs: gguf/tiny-f16.gguf, gguf/tiny-Q8_0.gguf" in details["export"]
    assert view.shown_path == f"{run_dir.parent.name}/tiny"
    report = json.loads((run_dir / "reports" / "eval.json").read_text())
    labels = [row.label for row in eval_table(report).metrics]
    assert len(labels) == len(set(labels)) and not {"loop rate", "leak rate"} & set(labels)
