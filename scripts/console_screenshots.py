"""The console's screenshots (run by scripts/console-screenshots): the real service on the test
stack, a few real jobs (one succeeded, one failed, one pushing ~100 MiB while photographed,
one queued), and the pages as a laptop and a phone show them."""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import redis  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from browser import LAPTOP, PHONE, chromium  # noqa: E402
from service.auth import hash_token  # noqa: E402
from service_process import Api, Service, base_config  # noqa: E402
from stack import start_stack  # noqa: E402

OUT = ROOT / "docs" / "console"
TOKENS = {"platform-ops": "imp_screenshots-ops", "team-a": "imp_screenshots-team-a"}
MiB = 1024 * 1024


def service(stack) -> Service:
    config = base_config(stack)
    del config["auth"]
    config["clients"] = [
        {"name": "platform-ops", "token_sha256": hash_token(TOKENS["platform-ops"]), "scopes": ["admin"]},
        {"name": "team-a", "token_sha256": hash_token(TOKENS["team-a"]), "scopes": ["publish", "pull", "read"],
         "repositories": ["team-a/*"]},
    ]
    svc = Service(stack, config, "screenshots", redis_db=2)
    redis.Redis.from_url(svc.redis_url).flushdb()
    svc.start_api()
    return svc


def client(svc: Service, name: str) -> Api:
    api = Api(svc.api.base_url)
    api.http.headers["Authorization"] = f"Bearer {TOKENS[name]}"
    return api


def publish(api: Api, source: str, registry: str, repository: str, tags: list[str], **extra) -> dict:
    return api.submit("/v1/publish", {"source": source, "targets": [{"registry": registry, "repository": repository, "tags": tags}],
                                      **extra})


def sign_in(driver, svc: Service, name: str) -> None:
    driver.get(svc.api.base_url + "/ui/sign-in")
    driver.find_element(By.ID, "token").send_keys(TOKENS[name], Keys.ENTER)
    time.sleep(0.3)


def shoot(driver, svc: Service, path: str, name: str, wait=None) -> None:
    driver.get(svc.api.base_url + path)
    if wait:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not wait(driver):
            time.sleep(0.05)
    # the whole page (within reason), as Chromium lays it out at this width
    content = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": content["width"], "height": min(content["height"], 2400), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    (OUT / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
    print(f"docs/console/{name}.png")


def partway(driver) -> bool:
    return bool(driver.execute_script(
        "return Array.from(document.querySelectorAll('tr[data-layer] progress')).some("
        "function (b) { return b.hasAttribute('value') && b.value > b.max * 0.3 && b.value < b.max * 0.8; })"))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with start_stack() as stack:
        svc = service(stack)
        team_a, ops = client(svc, "team-a"), client(svc, "platform-ops")
        stack.build_image("team-a/web:1.4.2", layers=3, layer_bytes=2 * MiB)
        stack.build_image("team-a/big:2.0.0", layers=2, layer_bytes=50 * MiB)
        queued = publish(team_a, "team-a/web:1.4.2", "local", "team-a/web", ["not-wanted"])  # before any worker
        ops.post(f"/v1/jobs/{queued['id']}/cancel")
        svc.start_worker()
        done = publish(team_a, "team-a/web:1.4.2", "local", "team-a/web", ["1.4.2", "latest"])
        team_a.wait(done["id"])
        failed = publish(team_a, "team-a/web:1.4.2", "wrong-password", "team-a/web", ["1.4.2"])
        team_a.wait(failed["id"])
        team_a.wait(publish(team_a, "team-a/web:1.4.2", "ecr", "team-a/web", ["1.4.2"], create_repository=True)["id"])
        ops.post("/v1/registries/ecr/repositories", json={"name": "team-a/api"})
        with chromium(LAPTOP) as laptop:
            sign_in(laptop, svc, "platform-ops")
            shoot(laptop, svc, "/ui/jobs", "jobs")
            shoot(laptop, svc, f"/ui/jobs/{failed['id']}", "job-failed")
            shoot(laptop, svc, f"/ui/jobs/{done['id']}", "job-succeeded")
            big = publish(team_a, "team-a/big:2.0.0", "local", "team-a/big", ["2.0.0"])
            shoot(laptop, svc, f"/ui/jobs/{big['id']}", "job-pushing", wait=partway)
            team_a.wait(big["id"])
            shoot(laptop, svc, "/ui/fleet", "fleet")
            shoot(laptop, svc, "/ui/registries", "registries")
            shoot(laptop, svc, "/ui/registries/ecr", "registry-ecr")
            laptop.delete_all_cookies()
            shoot(laptop, svc, "/ui/sign-in", "sign-in")
        with chromium(PHONE) as phone:
            sign_in(phone, svc, "team-a")
            shoot(phone, svc, "/ui/jobs", "phone-jobs")
            shoot(phone, svc, f"/ui/jobs/{done['id']}", "phone-job")
        svc.stop_worker()


if __name__ == "__main__":
    main()
