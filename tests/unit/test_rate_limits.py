"""Per-key rate limits: the sliding window, and the ingress's 429."""

from __future__ import annotations

import pytest

from serve_app.rate_limits import SlidingWindowLimiter
from tests.conftest import TEST_API_KEY


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_slide_with_the_window():
    clock = Clock()
    limiter = SlidingWindowLimiter(requests_per_minute=2, images_per_minute=None, clock=clock)
    assert limiter.acquire("k", 1).allowed
    clock.now += 10
    second = limiter.acquire("k", 1)
    assert second.allowed and second.remaining_requests == 0
    clock.now += 5
    refused = limiter.acquire("k", 1)
    # The first request leaves the window 60 s after it came: 45 s from now.
    assert not refused.allowed and refused.retry_after_s == 45
    clock.now += 45
    assert limiter.acquire("k", 1).allowed


def test_images_count_n_and_a_refusal_consumes_nothing():
    clock = Clock()
    limiter = SlidingWindowLimiter(requests_per_minute=None, images_per_minute=5, clock=clock)
    assert limiter.acquire("k", 3).allowed
    clock.now += 1
    refused = limiter.acquire("k", 3)  # 6 > 5
    assert not refused.allowed and refused.retry_after_s == 59 and refused.remaining_images == 2
    # The refusal took nothing: two more images still fit.
    fits = limiter.acquire("k", 2)
    assert fits.allowed and fits.remaining_images == 0


def test_keys_do_not_share_a_window():
    limiter = SlidingWindowLimiter(requests_per_minute=1, images_per_minute=None, clock=Clock())
    assert limiter.acquire("a", 1).allowed
    assert not limiter.acquire("a", 1).allowed
    assert limiter.acquire("b", 1).allowed


def test_idle_windows_are_forgotten():
    clock = Clock()
    limiter = SlidingWindowLimiter(requests_per_minute=1, images_per_minute=None, clock=clock)
    limiter.acquire("a", 1)
    clock.now += 61
    limiter.forget_idle()
    assert limiter._windows == {}


@pytest.fixture()
def limited_client(ingress_client, monkeypatch):
    """The in-process ingress with a RateLimiter of 2 requests and 4 images a minute, and two API keys."""
    from serve_app.config import RateLimits
    from serve_app.deployments.rate_limiter import RateLimiter
    from serve_app.security import ApiKeys
    from tests.conftest import LocalHandle

    limits = RateLimits(requests_per_minute=2, images_per_minute=4)
    instance = ingress_client.instance
    monkeypatch.setattr(instance.config, "rate_limits", limits)
    monkeypatch.setattr(instance, "rate_limiter", LocalHandle(RateLimiter(limits)))
    keys = ApiKeys([TEST_API_KEY, "sk-second-key"])
    monkeypatch.setattr(instance.api_keys, "_digests", keys._digests)
    return ingress_client


GEN = "/v1/images/generations"
SMALL = {"model": "dall-e-2", "prompt": "otter", "size": "256x256"}


def test_past_the_key_limit_is_429_rate_limit_exceeded_with_retry_after(limited_client):
    first = limited_client.post(GEN, json=SMALL)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert limited_client.post(GEN, json=SMALL).status_code == 200
    refused = limited_client.post(GEN, json=SMALL)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("rate_limit_exceeded", "rate_limit_exceeded", None)
    assert "Retry after" in error["message"]
    assert 50 <= int(refused.headers["retry-after"]) <= 60
    # Another key has its own minute.
    other = limited_client.post(GEN, json=SMALL, headers={"Authorization": "Bearer sk-second-key"})
    assert other.status_code == 200


def test_images_per_minute_counts_n(limited_client):
    assert limited_client.post(GEN, json={**SMALL, "n": 3}).status_code == 200
    refused = limited_client.post(GEN, json={**SMALL, "n": 2})
    assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-images"] == "1"
    assert limited_client.post(GEN, json={**SMALL, "n": 1}).status_code == 200


def test_n_above_the_per_minute_limit_can_never_pass_and_is_400(limited_client):
    resp = limited_client.post(GEN, json={**SMALL, "n": 5})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"


def test_a_stuck_limiter_admits_the_request_unlimited(limited_client, monkeypatch):
    import asyncio

    import serve_app.deployments.ingress as ingress_module

    class Stuck:
        class acquire:
            @staticmethod
            async def remote(*args):
                await asyncio.sleep(30)

    monkeypatch.setattr(ingress_module, "RATE_LIMITER_WAIT_S", 0.2)
    monkeypatch.setattr(limited_client.instance, "rate_limiter", Stuck())
    resp = limited_client.post(GEN, json=SMALL)
    assert resp.status_code == 200 and "x-ratelimit-limit-requests" not in resp.headers


def test_more_images_than_the_limit_never_fit_even_in_an_empty_window():
    limiter = SlidingWindowLimiter(requests_per_minute=None, images_per_minute=4, clock=Clock())
    refused = limiter.acquire("k", 5)
    assert not refused.allowed and refused.retry_after_s == 60
    assert limiter.acquire("k", 4).allowed  # the refusal took nothing
