"""The web console in a real browser (headless Chromium, tests/browser.py) against the whole
service: gunicorn serving /ui beside the API, a worker pushing to the stack's registry.

Two deployments with the same clients: ``console`` has a worker (a real push of ~100 MiB whose
progress bars the page draws live; a build whose error message holds markup), ``idle`` has
none, so its jobs stay queued for as long as a test needs (the list updating in place, a
cancel from the job's page)."""

from __future__ import annotations

import io
import json
import tarfile
import time
import uuid

import pytest
import redis
import requests
from selenium.common.exceptions import (NoAlertPresentException, NoSuchElementException, StaleElementReferenceException,
                                        WebDriverException)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from browser import PHONE, chromium, csp_violations
from service.auth import hash_token
from service_process import Api, Service, base_config

MiB = 1024 * 1024
TOKENS = {name: f"imp_console-{name}-{uuid.uuid4().hex}" for name in ("team-a", "team-b", "ops")}
CLIENTS = {
    "team-a": {"scopes": ["publish", "pull", "build", "read"], "repositories": ["team-a/*"]},
    "team-b": {"scopes": ["publish", "read"], "repositories": ["team-b/*"]},
    "ops": {"scopes": ["admin"]},
}


def _config(stack) -> dict:
    config = base_config(stack)
    del config["auth"]
    config["clients"] = [{"name": name, "token_sha256": hash_token(TOKENS[name]), **rules} for name, rules in CLIENTS.items()]
    return config


def _as(api: Api, name: str) -> Api:
    client = Api(api.base_url)
    client.http.headers["Authorization"] = f"Bearer {TOKENS[name]}"
    return client


@pytest.fixture(scope="module")
def console(stack):
    svc = Service(stack, _config(stack), "console", redis_db=8)
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    svc.start_worker()
    yield svc
    svc.stop_worker()


@pytest.fixture(scope="module")
def idle(stack):
    """The same clients, no worker: jobs stay queued."""
    svc = Service(stack, _config(stack), "console-idle", redis_db=4)
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    return svc


@pytest.fixture
def browser():
    with chromium() as driver:
        yield driver
        assert csp_violations(driver) == []  # nothing the pages do needs more than the policy allows


@pytest.fixture
def u() -> str:
    return uuid.uuid4().hex[:8]


def publish(svc: Service, name: str, repository: str, source: str | None = None, tag: str = "1") -> dict:
    return _as(svc.api, name).submit("/v1/publish", {
        "source": source or f"{repository}:{tag}", "targets": [{"registry": "local", "repository": repository, "tags": [tag]}]})


def sign_in(driver, svc: Service, name: str, path: str = "/ui/jobs") -> None:
    """Open ``path``, get sent to the sign-in form, and sign in with the keyboard alone."""
    driver.get(svc.api.base_url + path)
    WebDriverWait(driver, 10).until(EC.url_contains("/ui/sign-in"))
    token = driver.switch_to.active_element  # the token field has the focus
    assert token.get_attribute("id") == "token"
    token.send_keys(TOKENS[name], Keys.ENTER)
    WebDriverWait(driver, 10).until(lambda d: "/ui/sign-in" not in d.current_url)
    assert driver.find_element(By.ID, "signed-in-as").text == name


def wait_for(driver, condition, timeout: float = 20):
    """``condition()`` true within ``timeout``; pages that reload meanwhile (a cancel's redirect,
    a finished job's page) only make it look again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(
        lambda d: _across_a_reload(condition))


def _across_a_reload(condition):
    """An element found in the page that is just being replaced is stale. Chromedriver says so
    with StaleElementReferenceException, or, when the new document wins the race between the
    find and the read, with an "unknown error" from the inspector: that one is stale too."""
    try:
        return condition()
    except WebDriverException as error:
        if "does not belong to the document" in (error.msg or ""):
            raise StaleElementReferenceException(error.msg) from error
        raise


# --- signing in, seeing a job, signing out ----------------------------------------------------


def test_sign_in_see_a_submitted_job_and_sign_out(idle, browser, u):
    job = publish(idle, "team-a", f"team-a/app-{u}")
    sign_in(browser, idle, "team-a", f"/ui/jobs/{job['id']}")  # back where the link pointed
    assert browser.current_url.endswith(f"/ui/jobs/{job['id']}")
    assert job["id"] in browser.find_element(By.TAG_NAME, "h1").text
    assert browser.find_element(By.CSS_SELECTOR, "#job-state [data-state]").text == "queued"
    assert f"team-a/app-{u}:1 → local/team-a/app-{u}:1" in browser.find_element(By.CSS_SELECTOR, ".lead .what").text
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: no script reads the session

    browser.find_element(By.LINK_TEXT, "Jobs").click()
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{job["id"]}"]')
    assert "queued" in row.text and "team-a" in row.text

    browser.find_element(By.CSS_SELECTOR, ".sign-out button").click()
    WebDriverWait(browser, 10).until(EC.url_contains("/ui/sign-in"))
    browser.get(idle.api.base_url + f"/ui/jobs/{job['id']}")
    assert "/ui/sign-in" in browser.current_url  # the session is over, not just the cookie
    assert job["id"] not in browser.page_source.split("next")[0]


def test_another_clients_job_is_not_found(idle, browser, u):
    theirs = publish(idle, "team-b", f"team-b/app-{u}")
    sign_in(browser, idle, "team-a")
    browser.get(idle.api.base_url + f"/ui/jobs/{theirs['id']}")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Not found"
    assert browser.find_element(By.ID, "error-code").text == "job_not_found"
    assert f"team-b/app-{u}" not in browser.page_source and "team-b" not in browser.find_element(By.TAG_NAME, "main").text
    browser.get(idle.api.base_url + "/ui/jobs?client=team-b")
    assert theirs["id"] not in browser.page_source
    # an admin sees it
    with chromium() as admin:
        sign_in(admin, idle, "ops", f"/ui/jobs/{theirs['id']}")
        assert admin.find_element(By.CSS_SELECTOR, "#job-state [data-state]").text == "queued"


def test_the_jobs_list_updates_in_place(idle, browser, u):
    first = publish(idle, "team-a", f"team-a/list-{u}")
    sign_in(browser, idle, "team-a")
    browser.execute_script("window.notReloaded = true")
    second = publish(idle, "team-a", f"team-a/list-{u}", tag="2")
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, f'tr[data-id="{second["id"]}"]'), timeout=15)
    ids = [tr.get_attribute("data-id") for tr in browser.find_elements(By.CSS_SELECTOR, "#job-rows tr[data-id]")]
    assert ids.index(second["id"]) < ids.index(first["id"])  # newest first
    _as(idle.api, "team-a").post(f"/v1/jobs/{first['id']}/cancel")
    state = f'tr[data-id="{first["id"]}"] [data-state]'
    wait_for(browser, lambda: browser.find_element(By.CSS_SELECTOR, state).text == "cancelled", timeout=15)
    assert browser.execute_script("return window.notReloaded") is True
    assert "changed" in browser.find_element(By.ID, "list-status").text  # said to a screen reader, politely


def test_cancel_a_queued_job_from_its_page(idle, browser, u):
    job = publish(idle, "team-a", f"team-a/cancel-{u}")
    sign_in(browser, idle, "team-a", f"/ui/jobs/{job['id']}")
    cancel = browser.find_element(By.ID, "cancel")
    cancel.send_keys(Keys.ENTER)  # the keyboard is enough
    wait_for(browser, lambda: browser.find_element(By.CSS_SELECTOR, "#job-state [data-state]").text == "cancelled")
    assert browser.find_elements(By.ID, "cancel") == []
    assert browser.find_element(By.ID, "job-error-code").text == "cancelled"
    assert _as(idle.api, "team-a").get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"


# --- a real push, followed live -----------------------------------------------------------------


def _bars(driver) -> list[tuple[str, float | None, float]]:
    """Every layer's progress bar now: (layer, value or None when indeterminate, max)."""
    return [tuple(b) for b in driver.execute_script(
        "return Array.from(document.querySelectorAll('tr[data-layer]')).map(function (tr) {"
        "  var bar = tr.querySelector('progress');"
        "  return [tr.getAttribute('data-layer'), bar.hasAttribute('value') ? bar.value : null, bar.max]; })")]


def test_a_push_of_100_mib_is_followed_to_100_percent(console, stack, browser, u):
    repository = f"team-a/big-{u}"
    stack.build_image(f"{repository}:1", layers=2, layer_bytes=50 * MiB)
    sign_in(browser, console, "team-a")
    job = publish(console, "team-a", repository)
    browser.get(console.api.base_url + f"/ui/jobs/{job['id']}")
    seen: list[tuple[str, float | None, float]] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            seen += _bars(browser)
            state = browser.find_element(By.CSS_SELECTOR, "#job-state [data-state]").text
        except Exception:  # the page reloading itself at the end
            continue
        if state in ("succeeded", "failed", "cancelled") and browser.find_elements(By.CSS_SELECTOR, "[data-target-digest]") \
                and not browser.find_elements(By.CSS_SELECTOR, "[data-events-url]"):
            break
        time.sleep(0.05)
    assert state == "succeeded", browser.find_element(By.TAG_NAME, "main").text
    moving = {layer for layer, value, maximum in seen if value is not None and 0 < value < maximum}
    assert moving, f"no bar was seen part-way: {sorted(set(seen))[:20]}"
    final = _bars(browser)
    assert len(final) == 2 and all(value == maximum for _, value, maximum in final), final  # 100 %
    assert {row.text for row in browser.find_elements(By.CSS_SELECTOR, ".layer-status")} == {"pushed"}
    assert moving <= {layer for layer, _, _ in final}
    digest = stack.registry_digest(stack.registry, repository, "1")
    assert digest and browser.find_element(By.CSS_SELECTOR, "[data-target-digest]").text == digest
    assert f"{stack.registry}/{repository}:1" in browser.find_element(By.CSS_SELECTOR, "[data-target-references]").text


# --- hostile values ------------------------------------------------------------------------------


def _context(dockerfile: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile.encode())
        tar.addfile(info, io.BytesIO(dockerfile.encode()))
    return buffer.getvalue()


MARKUP = "<img src=x onerror=alert(1)><script>alert(2)</script>"


def test_markup_in_an_error_message_shows_as_text(console, browser, u):
    api = _as(console.api, "team-a")
    # a tag cannot carry markup: the API's grammar refuses it, naming the field
    resp = api.post("/v1/publish", json={"source": f"team-a/x-{u}:1",
                                         "targets": [{"registry": "local", "repository": f"team-a/x-{u}", "tags": ["<script>alert(1)</script>"]}]})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "targets.0.tags.0"
    # a failing build step can: the daemon's message quotes it, and the job keeps it
    dockerfile = f"FROM scratch\nCOPY {json.dumps([MARKUP, '/'])}\n"
    resp = api.http.post(f"{api.base_url}/v1/build", files={
        "request": (None, json.dumps({"targets": [{"registry": "local", "repository": f"team-a/built-{u}", "tags": ["1"]}]}), "application/json"),
        "context": ("context.tar.gz", _context(dockerfile), "application/gzip")}, timeout=60)
    assert resp.status_code == 202, resp.text
    job = api.wait(resp.json()["id"], timeout=120)
    assert job["state"] == "failed" and MARKUP in job["error"]["message"], job["error"]
    sign_in(browser, console, "team-a", f"/ui/jobs/{job['id']}")
    assert MARKUP in browser.find_element(By.ID, "job-error-message").text
    assert MARKUP in browser.find_element(By.ID, "build-log").text
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    browser.get(console.api.base_url + "/ui/jobs?state=failed")  # the list too
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == []


# --- the server, the layout and the keyboard ----------------------------------------------------


def test_a_clients_forwarded_proto_does_not_make_the_cookie_secure(idle):
    """gunicorn believes X-Forwarded-Proto from loopback by default; imagepub believes it only
    behind the proxies `console.trusted_proxies` names (none here)."""
    resp = requests.get(idle.api.base_url + "/ui/sign-in", headers={"X-Forwarded-Proto": "https"}, timeout=10)
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("imagepub_console_sign_in=") and "Secure" not in cookie and "SameSite=Strict" in cookie


def test_pages_fit_a_phone_and_name_every_control(idle, stack, u):
    job = publish(idle, "team-a", f"team-a/phone-{u}-with-a-rather-long-repository-name/and-a-path")
    with chromium(PHONE) as phone:
        sign_in(phone, idle, "ops")
        for path in ("/ui/jobs", f"/ui/jobs/{job['id']}", "/ui/fleet", "/ui/registries"):
            phone.get(idle.api.base_url + path)
            width = phone.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], (path, width)  # nothing wider than the phone (tables scroll in their frame)
            unnamed = phone.execute_script("""
                return Array.from(document.querySelectorAll('input:not([type=hidden]), select, button, progress, a'))
                  .filter(function (e) {
                    var label = e.id && document.querySelector('label[for="' + e.id + '"]');
                    return !(label || e.getAttribute('aria-label') || (e.textContent || '').trim()); })
                  .map(function (e) { return e.outerHTML; });""")
            assert unnamed == [], (path, unnamed)
            assert phone.execute_script("return Array.from(document.querySelectorAll('table')).every(t => t.caption)"), path
        # the keyboard: the first Tab reaches the skip link, which moves to the content
        phone.get(idle.api.base_url + "/ui/jobs")
        phone.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        assert phone.switch_to.active_element.text == "Skip to content"
        assert csp_violations(phone) == []


# --- registries ---------------------------------------------------------------------------------


def test_ecr_repositories_their_settings_and_images(console, stack, browser, u):
    """Repositories a client may use, with their settings; a repository's images as ECR lists
    them (moto: an image put through the ECR API); another client's repositories are not shown."""
    import boto3

    mine, theirs = f"team-a/reg-{u}", f"team-b/reg-{u}"
    created = _as(console.api, "team-a").post("/v1/registries/ecr/repositories",
                                              json={"name": mine, "image_tag_mutability": "IMMUTABLE", "scan_on_push": True})
    assert created.status_code == 201, created.text
    assert _as(console.api, "team-b").post("/v1/registries/ecr/repositories", json={"name": theirs}).status_code == 201
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2,
                                      "digest": "sha256:" + "4" * 64}, "layers": []})
    ecr = boto3.client("ecr", endpoint_url=stack.moto_url, region_name=stack.ecr_region,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    put = ecr.put_image(repositoryName=mine, imageManifest=manifest, imageTag="1.0")
    sign_in(browser, console, "team-a", "/ui/registries")
    browser.find_element(By.LINK_TEXT, "Repositories of ecr").click()
    rows = {row.find_element(By.TAG_NAME, "th").text: row.text for row in browser.find_elements(By.CSS_SELECTOR, "#repositories tbody tr")}
    assert mine in rows and "immutable" in rows[mine] and "yes" in rows[mine] and theirs not in rows
    browser.find_element(By.LINK_TEXT, mine).click()
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Repository {mine}"
    images = browser.find_element(By.ID, "images").text
    assert put["image"]["imageId"]["imageDigest"] in images and "1.0" in images
    browser.get(console.api.base_url + f"/ui/registries/ecr/repositories/{theirs}")
    assert browser.find_element(By.ID, "error-code").text == "forbidden"
