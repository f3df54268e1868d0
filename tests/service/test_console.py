"""The web console in-process (Flask's test client) against real Redis: signing in and out,
sessions, CSRF, the security headers, escaping, what each client may see, and what a page costs
in store reads. The browser tests are tests/e2e/test_console.py."""

from __future__ import annotations

import json
import re
import contextlib
import threading
import time
from dataclasses import replace
from html.parser import HTMLParser

import pytest
import redis

from clients import TOKENS, bearer
from helpers import GOOD
from service.app import create_app
from service.auth import hash_token
from service.config import Console
from service.console.numbers import first_id_since
from service.jobstore import new_job_id

NONCE = re.compile(r'name="csrf_token" value="([^"]+)"')


def sign_in(web, name: str | None, *, headers: dict | None = None):
    """Sign ``web`` (a test client) in as ``name`` through the form; the response to the POST."""
    page = web.get("/ui/sign-in")
    nonce = NONCE.search(page.get_data(as_text=True)).group(1)
    return web.post("/ui/sign-in", data={"token": TOKENS[name] if name else "", "csrf_token": nonce, "next": "/ui/jobs"},
                    headers=headers or {})


def csrf_of(web) -> str:
    return NONCE.search(web.get("/ui/jobs").get_data(as_text=True)).group(1)


@pytest.fixture
def web(app):
    return app.test_client()


@pytest.fixture
def signed_in(app):
    """``signed_in("ci")``: a test client with a console session of that client."""
    def make(name: str):
        web = app.test_client()
        assert sign_in(web, name).status_code == 303
        return web
    return make


def submit(app, name: str, body: dict | None = None) -> dict:
    resp = app.test_client().post("/v1/publish", json=body or GOOD, headers=bearer(name))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    return resp.get_json()


def cookie_header(resp, name: str) -> str:
    return next(h for h in resp.headers.getlist("Set-Cookie") if h.startswith(name + "="))


# --- signing in -------------------------------------------------------------------------------


def test_sign_in_gives_an_httponly_strict_session_and_keeps_no_token(web, redis_client):
    resp = sign_in(web, "ci")
    assert resp.status_code == 303 and resp.headers["Location"] == "/ui/jobs"
    cookie = cookie_header(resp, "imagepub_console")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path"} <= attributes and "secure" not in attributes, cookie
    assert "SameSite=Strict" in cookie and "Path=/ui" in cookie
    session_id = cookie.split(";")[0].split("=", 1)[1]
    assert TOKENS["ci"] not in session_id
    # Redis holds neither the token nor the session id in clear
    for key in redis_client.scan_iter("*"):
        value = redis_client.dump(key) or b""
        assert TOKENS["ci"].encode() not in value and session_id.encode() not in value and session_id not in key, key
    page = web.get("/ui/jobs")
    assert page.status_code == 200 and 'id="signed-in-as">ci<' in page.get_data(as_text=True)


@pytest.mark.parametrize("token", ["", "imp_wrong", TOKENS["ci"] + "x", f"Bearer {TOKENS['ci']}"])
def test_a_wrong_token_signs_nobody_in(web, token):
    page = web.get("/ui/sign-in")
    nonce = NONCE.search(page.get_data(as_text=True)).group(1)
    resp = web.post("/ui/sign-in", data={"token": token, "csrf_token": nonce})
    assert resp.status_code == 401 and "That API token is not valid." in resp.get_data(as_text=True)
    assert not any(h.startswith("imagepub_console=") for h in resp.headers.getlist("Set-Cookie"))
    assert web.get("/ui/jobs").status_code == 303


@pytest.mark.parametrize("forge", ["no nonce", "another nonce", "cross-site", "other origin", "null origin"])
def test_sign_in_from_another_site_is_refused(web, forge):
    """Login CSRF: another site must not sign a browser in (as the attacker's client)."""
    page = web.get("/ui/sign-in")
    nonce = NONCE.search(page.get_data(as_text=True)).group(1)
    data, headers = {"token": TOKENS["ci"], "csrf_token": nonce}, {}
    if forge == "no nonce":
        del data["csrf_token"]
    elif forge == "another nonce":
        data["csrf_token"] = "x" * 43
    elif forge == "cross-site":
        headers["Sec-Fetch-Site"] = "cross-site"
    elif forge == "other origin":
        headers["Origin"] = "https://evil.example"
    else:
        headers["Origin"] = "null"
    resp = web.post("/ui/sign-in", data=data, headers=headers)
    assert resp.status_code == 403 and 'id="error-code">csrf_failed<' in resp.get_data(as_text=True)
    assert web.get("/ui/jobs").status_code == 303


@pytest.mark.parametrize("next_page", ["//evil.example/ui/jobs", "https://evil.example/ui/", "/\\evil.example", "/v1/jobs",
                                       "javascript:alert(1)", "http:/ui/jobs"])
def test_sign_in_never_sends_the_browser_elsewhere(web, next_page):
    page = web.get("/ui/sign-in")
    nonce = NONCE.search(page.get_data(as_text=True)).group(1)
    resp = web.post("/ui/sign-in", data={"token": TOKENS["ci"], "csrf_token": nonce, "next": next_page})
    assert resp.status_code == 303 and resp.headers["Location"] == "/ui/jobs"


def test_pages_need_a_session(web):
    resp = web.get("/ui/jobs?state=failed")
    assert resp.status_code == 303 and resp.headers["Location"] == "/ui/sign-in?next=/ui/jobs?state%3Dfailed"
    for path in ("/ui/fleet", "/ui/registries", f"/ui/jobs/{new_job_id()}"):
        assert web.get(path).status_code == 303
    for path in ("/ui/jobs/rows", f"/ui/jobs/{new_job_id()}/state", f"/ui/jobs/{new_job_id()}/events"):
        resp = web.get(path)
        assert resp.status_code == 401 and resp.mimetype == "application/problem+json" and resp.get_json()["code"] == "unauthorized"
    resp = web.post(f"/ui/jobs/{new_job_id()}/cancel")
    assert resp.status_code == 401 and 'id="error-code">unauthorized<' in resp.get_data(as_text=True)
    # a bearer token is no console session
    assert web.get("/ui/jobs", headers=bearer("admin")).status_code == 303
    assert web.get("/ui").status_code == 303


def test_a_link_from_another_site_looks_again_with_the_cookie(signed_in):
    """SameSite=Strict keeps the cookie home on a cross-site navigation: the console answers with
    a page that navigates again, from itself, instead of asking a signed-in person to sign in."""
    web = signed_in("ci")
    anonymous = web.application.test_client()  # the same person's link, without the cookie
    resp = anonymous.get("/ui/jobs?state=failed", headers={"Sec-Fetch-Site": "cross-site"})
    body = resp.get_data(as_text=True)
    assert resp.status_code == 200 and 'http-equiv="refresh" content="0;url=/ui/jobs?state=failed"' in body


def test_sign_out_ends_the_session(signed_in, redis_client):
    web = signed_in("ci")
    token = csrf_of(web)
    assert web.post("/ui/sign-out", data={}).status_code == 403  # no CSRF token: not signed out
    assert web.get("/ui/jobs").status_code == 200
    resp = web.post("/ui/sign-out", data={"csrf_token": token})
    assert resp.status_code == 303 and resp.headers["Location"] == "/ui/sign-in"
    assert "imagepub_console=;" in cookie_header(resp, "imagepub_console")
    assert list(redis_client.scan_iter("imagepub:console:session:*")) == []
    assert web.get("/ui/jobs").status_code == 303


def test_a_session_lives_idle_hours_and_never_past_its_lifetime(app, settings, redis_client):
    web = app.test_client()
    sign_in(web, "ci")
    key = next(redis_client.scan_iter("imagepub:console:session:*"))
    assert 8 * 3600 - 5 <= redis_client.ttl(key) <= 8 * 3600
    record = json.loads(redis_client.get(key))
    record["expires_at"] = 1.0  # past its lifetime, however recently used
    redis_client.set(key, json.dumps(record), ex=60)
    assert web.get("/ui/jobs").status_code == 303 and not redis_client.exists(key)
    short = create_app(replace(settings, console=Console(session_idle_seconds=120)))
    web = short.test_client()
    sign_in(web, "ci")
    assert 0 < redis_client.ttl(next(redis_client.scan_iter("imagepub:console:session:*"))) <= 120


@pytest.mark.parametrize("change", ["rotated", "removed"])
def test_a_revoked_token_ends_its_sessions(app, settings, change):
    web = app.test_client()
    sign_in(web, "ci")
    if change == "rotated":  # the same client name, another token
        clients = tuple(replace(c, token_sha256=hash_token("imp_new-ci-token")) if c.name == "ci" else c for c in settings.clients)
    else:
        clients = tuple(c for c in settings.clients if c.name != "ci")
    later = create_app(replace(settings, clients=clients))
    later_web = later.test_client()
    later_web._cookies = web._cookies  # the same browser, after the configuration changed
    assert later_web.get("/ui/jobs").status_code == 303
    assert web.get("/ui/jobs").status_code == 303  # and the session is gone for good


@pytest.mark.parametrize("trusted, forwarded, secure", [
    (0, None, False),
    (0, "https", False),            # nobody said there is a proxy: a client's header is ignored
    (1, "https", True),
    (1, "http", False),
    (1, "https, http", False),      # the client wrote https, the proxy appended what it saw
    (2, "https, http", True),       # two proxies: the outer one saw TLS
    (2, "https", False),            # fewer values than proxies: not believed
])
def test_cookies_are_secure_only_behind_the_proxies_the_deployment_names(settings, redis_client, trusted, forwarded, secure):
    app = create_app(replace(settings, console=Console(trusted_proxies=trusted)))
    web = app.test_client()
    headers = {"X-Forwarded-Proto": forwarded} if forwarded else {}
    page = web.get("/ui/sign-in", headers=headers)
    nonce = NONCE.search(page.get_data(as_text=True)).group(1)
    name = "__Host-imagepub_console" if secure else "imagepub_console"
    assert cookie_header(page, name + "_sign_in")
    resp = web.post("/ui/sign-in", data={"token": TOKENS["ci"], "csrf_token": nonce}, headers=headers)
    assert resp.status_code == 303
    cookie = cookie_header(resp, name)
    assert ("; Secure" in cookie) == secure and ("Path=/;" in cookie or cookie.endswith("Path=/")) == secure


# --- the pages themselves -----------------------------------------------------------------------


class _Inline(HTMLParser):
    """Everything CSP would need 'unsafe-inline' for: inline scripts, style attributes and
    elements, event handler attributes, javascript: URLs."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag, attrs):
        names = dict(attrs)
        if tag == "script":
            self.scripts.append(names.get("src") or "")
            if not names.get("src"):
                self.found.append("inline <script>")
        if tag == "style":
            self.found.append("<style>")
        for name, value in attrs:
            if name == "style" or name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                self.found.append(f"{tag} {name}={value}")


def test_every_page_carries_a_strict_policy_and_needs_nothing_inline(app, signed_in):
    job = submit(app, "admin")
    web = signed_in("admin")
    pages = ["/ui/sign-in", "/ui/jobs", f"/ui/jobs/{job['id']}", "/ui/fleet", "/ui/registries", "/ui/registries/local",
             f"/ui/jobs/{new_job_id()}", "/ui/jobs?state=nope"]
    for path in pages:
        resp = web.get(path)
        assert resp.mimetype == "text/html", path
        csp = dict(part.strip().split(" ", 1) for part in resp.headers["Content-Security-Policy"].split(";"))
        assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
        assert csp["frame-ancestors"] == "'none'" and csp["form-action"] == "'self'" and csp["base-uri"] == "'none'"
        assert "unsafe" not in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-store"
        parser = _Inline()
        parser.feed(resp.get_data(as_text=True))
        assert parser.found == [], (path, parser.found)
        if path != "/ui/sign-in":
            assert parser.scripts == ["/ui/static/console.js"], path
    for name, mimetype in (("console.js", "text/javascript"), ("console.css", "text/css")):
        resp = web.get(f"/ui/static/{name}")
        assert resp.status_code == 200 and resp.mimetype == mimetype and resp.headers["X-Content-Type-Options"] == "nosniff"
    # the scripts write job data as text, never as markup
    script = web.get("/ui/static/console.js").get_data(as_text=True)
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script


def test_every_value_a_job_carries_is_escaped(app, signed_in, redis_client):
    """The API's grammar keeps markup out of names and tags, but messages (a registry's, a build
    step's) and build logs are anyone's words: stored here as a worker would store them."""
    job = submit(app, "ci")
    store = app.extensions["imagepub"]["store"]
    record = store.get(job["id"])
    html = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    record["targets"][0]["layers"] = [{"id": "sha256:" + "a" * 64 + html, "status": "pushing" + html, "current": 1, "total": 2}]
    record["targets"][0]["references"] = ["localhost:5000/team/app:latest" + html]
    record.update(state="failed", error={"code": "push_failed" + html, "message": "the registry said: " + html})
    assert store.save(record, event="state")
    web = signed_in("ci")
    for path in (f"/ui/jobs/{job['id']}", "/ui/jobs", "/ui/jobs?state=failed"):
        body = web.get(path).get_data(as_text=True)
        assert "<script>alert" not in body and "<img src=x" not in body, path
    body = web.get(f"/ui/jobs/{job['id']}").get_data(as_text=True)
    assert "the registry said: &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in body
    rows = web.get("/ui/jobs/rows").get_json()["rows"]
    assert rows[0]["error_code"] == "push_failed" + html  # JSON for the script, which writes it as text


def test_a_client_sees_only_its_own_jobs(app, signed_in, redis_client):
    own, other = submit(app, "ci"), submit(app, "team-b", {**GOOD, "source": "team-b/app:1",
                                                              "targets": [{"registry": "local", "repository": "team-b/app", "tags": ["1"]}]})
    web = signed_in("ci")
    assert web.get(f"/ui/jobs/{own['id']}").status_code == 200
    for path in (f"/ui/jobs/{other['id']}", "/ui/jobs/not-a-job-id"):
        resp = web.get(path)
        assert resp.status_code == 404 and 'id="error-code">job_not_found<' in resp.get_data(as_text=True)
        assert other["client"] not in resp.get_data(as_text=True)
    for path in (f"/ui/jobs/{other['id']}/state", f"/ui/jobs/{other['id']}/events"):
        resp = web.get(path)
        assert resp.status_code == 404 and resp.get_json()["code"] == "job_not_found"
    resp = web.post(f"/ui/jobs/{other['id']}/cancel", data={"csrf_token": csrf_of(web)})
    assert resp.status_code == 404
    assert app.extensions["imagepub"]["store"].get(other["id"])["state"] == "queued"
    # the list: own jobs only, whatever the client filter says (that filter is an admin's)
    for query in ("", "?client=team-b", "?state=queued"):
        ids = [row["id"] for row in web.get("/ui/jobs/rows" + query).get_json()["rows"]]
        assert ids == [own["id"]], query
        assert other["id"] not in web.get("/ui/jobs" + query).get_data(as_text=True)
    admin = signed_in("admin")
    assert [r["id"] for r in admin.get("/ui/jobs/rows?client=team-b").get_json()["rows"]] == [other["id"]]
    assert {r["id"] for r in admin.get("/ui/jobs/rows").get_json()["rows"]} == {own["id"], other["id"]}
    assert admin.get(f"/ui/jobs/{other['id']}").status_code == 200


def test_cancel_needs_the_sessions_csrf_token(app, signed_in):
    job = submit(app, "ci")
    web = signed_in("ci")
    token = csrf_of(web)
    store = app.extensions["imagepub"]["store"]
    attempts = [({}, {}), ({"csrf_token": "forged"}, {}), ({"csrf_token": csrf_of(signed_in("ci"))}, {}),  # another session's
                ({"csrf_token": token}, {"Origin": "https://evil.example"}), ({"csrf_token": token}, {"Sec-Fetch-Site": "same-site"})]
    for data, headers in attempts:
        resp = web.post(f"/ui/jobs/{job['id']}/cancel", data=data, headers=headers)
        assert resp.status_code == 403 and 'id="error-code">csrf_failed<' in resp.get_data(as_text=True), (data, headers)
        assert store.get(job["id"])["state"] == "queued"
    resp = web.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf_token": token},
                    headers={"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"})
    assert resp.status_code == 303 and resp.headers["Location"] == f"/ui/jobs/{job['id']}"
    assert store.get(job["id"])["state"] == "cancelled"
    again = web.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf_token": token})
    assert again.status_code == 409 and 'id="error-code">job_finished<' in again.get_data(as_text=True)
    page = web.get(f"/ui/jobs/{job['id']}").get_data(as_text=True)
    assert 'id="cancel"' not in page and "cancelled before it ran" in page


def test_filters(app, signed_in):
    a = submit(app, "ci")
    b = submit(app, "ci", {**GOOD, "targets": [{"registry": "hub", "repository": "team/other", "tags": ["2"]}]})
    app.extensions["imagepub"]["store"].cancel(b["id"])
    web = signed_in("ci")

    def ids(query):
        resp = web.get("/ui/jobs/rows" + query)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return [row["id"] for row in resp.get_json()["rows"]]

    assert ids("") == [b["id"], a["id"]]
    assert ids("?state=cancelled") == [b["id"]] and ids("?state=queued&kind=publish") == [a["id"]] and ids("?kind=pull") == []
    assert ids("?registry=hub") == [b["id"]] and ids("?repository=team/app") == [a["id"]] and ids("?repository=team/*") == [b["id"], a["id"]]
    assert ids("?registry=local&repository=team/other") == []
    assert ids("?state=&kind=&registry=&repository=") == [b["id"], a["id"]]  # the form's "any"
    first = web.get("/ui/jobs/rows?limit=1").get_json()
    assert [r["id"] for r in first["rows"]] == [b["id"]]
    assert ids(f"?limit=1&cursor={first['next_cursor']}") == [a["id"]]
    for query, field in (("?state=nope", "state"), ("?limit=0", "limit"), ("?cursor=x", "cursor"), ("?colour=red", "colour")):
        resp = web.get("/ui/jobs" + query)
        assert resp.status_code == 422 and f"<code>{field}</code>" in resp.get_data(as_text=True), query
        assert web.get("/ui/jobs/rows" + query).get_json()["errors"][0]["field"] == field


class _Monitor:
    """The commands sent to this test's Redis database while it runs (Redis' MONITOR, filtered
    by database: other processes of the test session share the server, not the database)."""

    def __init__(self, redis_client):
        self.db = redis_client.connection_pool.connection_kwargs.get("db", 0)
        self.client = redis.Redis(connection_pool=redis.ConnectionPool(**{**redis_client.connection_pool.connection_kwargs, "decode_responses": True}))
        self.seen: list[str] = []
        self._monitor = self.client.monitor().__enter__()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            for command in self._monitor.listen():
                if command.get("db") == self.db:
                    self.seen.append(command.get("command", ""))
        except Exception:
            pass

    def count(self, action) -> int:
        marker = f"PING marker-{len(self.seen)}-{time.monotonic()}"
        before = self._wait_for(marker)
        action()
        after = self._wait_for(marker + "-end")
        return after - before - 1  # the end marker itself

    def _wait_for(self, marker: str) -> int:
        self.client.execute_command(*marker.split(" "))
        deadline = time.monotonic() + 5
        while not any(marker.split(" ", 1)[1] in c for c in self.seen):
            assert time.monotonic() < deadline, "MONITOR lost a command"
            time.sleep(0.01)
        return next(i for i, c in enumerate(self.seen) if marker.split(" ", 1)[1] in c)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._monitor.__exit__(None, None, None)


@pytest.mark.parametrize("path", ["/ui/jobs", "/ui/jobs/rows", "/ui/jobs?repository=team/*", "/ui/fleet"])
def test_a_page_costs_the_same_store_reads_for_few_jobs_and_many(app, signed_in, redis_client, path):
    """No page reads the store once per job: the list is one index read and one MGET (like
    GET /v1/jobs), and the fleet's numbers are counted in the indexes."""
    web = signed_in("admin")
    web.get(path)  # warm: scripts loaded, the fleet's workers read

    monitor = _Monitor(redis_client)

    def cost() -> int:
        time.sleep(0.15)  # past the store's 0.1 s cache of the queue depth: every call reads it
        return monitor.count(lambda: web.get(path).status_code == 200 or pytest.fail(path))

    try:
        for _ in range(3):
            submit(app, "ci")
        few = cost()
        assert few > 0, "no command seen: the count would prove nothing"
        for _ in range(20):
            submit(app, "ci")
        assert cost() == few, path
    finally:
        monitor.close()


def test_the_fleet_page_counts_the_last_hour_and_the_pushes(app, signed_in, redis_client):
    store = app.extensions["imagepub"]["store"]
    before = time.time()
    jobs = [submit(app, "ci") for _ in range(3)]
    store.cancel(jobs[0]["id"])
    submit(app, "team-b", {**GOOD, "source": "team-b/app:1", "targets": [{"registry": "local", "repository": "team-b/app", "tags": ["1"]}]})
    store.metrics.incr("imagepub_layers", 4, registry="local", outcome="pushed")
    store.metrics.incr("imagepub_layers", 2, registry="local", outcome="exists")
    store.metrics.incr("imagepub_pushed_bytes", 3 * 1048576, registry="local")
    store.metrics.incr("imagepub_job_retries", 5, kind="publish", code="throttled")
    page = signed_in("ci").get("/ui/fleet").get_data(as_text=True)
    assert 'data-state-count="queued">2<' in page and 'data-state-count="cancelled">1<' in page  # its own jobs
    assert '<th scope="row">local</th><td>4</td><td>2</td><td>0</td><td>0</td><td>3.0 MiB</td>' in page
    assert "<td>publish</td><td><code>throttled</code></td><td>5</td>" in page
    admin = signed_in("admin").get("/ui/fleet").get_data(as_text=True)
    assert 'data-state-count="queued">3<' in admin
    # an hour ago is where the count starts: ids are UUIDv7, ordered by their time
    assert first_id_since(0) == "00000000-0000-0000-0000-000000000000"
    assert first_id_since(before - 0.01) < jobs[0]["id"] < jobs[-1]["id"] < first_id_since(time.time() + 0.01)
    assert first_id_since(time.time() - 0.01) < new_job_id()


def test_the_registries_page_shows_no_secret(signed_in):
    body = signed_in("ci").get("/ui/registries").get_data(as_text=True)
    assert "prod-ecr" in body and "localhost:5000" in body and "docker.io" in body
    assert "LOCAL_PASSWORD" not in body and "s3cret-local-password" not in body and "acme" not in body
    resp = signed_in("ci").get("/ui/registries/nope")
    assert resp.status_code == 404 and 'id="error-code">registry_not_configured<' in resp.get_data(as_text=True)
    assert "its own tools" in signed_in("ci").get("/ui/registries/local").get_data(as_text=True)


def test_the_fleet_and_registries_need_the_read_scope_as_through_the_api(signed_in):
    web = signed_in("limited")  # publish only
    for path in ("/ui/fleet", "/ui/registries"):
        resp = web.get(path)
        assert resp.status_code == 403 and 'id="error-code">forbidden<' in resp.get_data(as_text=True)


def test_an_anonymous_development_server_signs_in_without_a_token(settings, redis_client):
    app = create_app(replace(settings, clients=(), anonymous=True))
    web = app.test_client()
    assert "leave it empty" in web.get("/ui/sign-in").get_data(as_text=True)
    assert sign_in(web, None).status_code == 303
    assert 'id="signed-in-as">anonymous<' in web.get("/ui/jobs").get_data(as_text=True)


def test_a_cancel_through_the_console_is_in_the_audit_trail(app, signed_in):
    """Accepted or refused, as through the API: the client, the job, the outcome and its code."""
    job = submit(app, "ci")
    web = signed_in("ci")
    assert web.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf_token": "forged"}).status_code == 403
    assert web.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf_token": csrf_of(web)}).status_code == 303
    assert web.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf_token": csrf_of(web)}).status_code == 409
    entries = app.test_client().get(f"/v1/audit?action=cancel&job={job['id']}", headers=bearer("admin")).get_json()["entries"]
    seen = [(e["outcome"], e["code"], e["client"], e["job_id"]) for e in reversed(entries)]
    assert seen == [("refused", "csrf_failed", "ci", job["id"]), ("accepted", None, "ci", job["id"]),
                    ("refused", "job_finished", "ci", job["id"])], entries
