from __future__ import annotations

import hashlib

import pytest

from serve_app.security import ApiKeys, UrlSigner


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_signature_round_trip_and_tamper():
    clock = Clock(1_000_000)
    signer = UrlSigner("k", ttl_s=3600, clock=clock)
    name = "abcdefghijklmnopqrstuvwx.png"
    expires, sig = signer.sign(name)
    assert expires == 1_000_000 + 3600
    assert signer.verify(name, expires, sig) is None
    assert signer.verify(name, expires + 1, sig) == "bad_signature"  # extended expiry
    assert signer.verify("bbcdefghijklmnopqrstuvwx.png", expires, sig) == "bad_signature"  # other id
    assert signer.verify(name, expires, sig[:-1] + ("0" if sig[-1] != "0" else "1")) == "bad_signature"
    assert UrlSigner("other-key", 3600, clock).verify(name, expires, sig) == "bad_signature"


def test_signature_expires_with_the_clock():
    clock = Clock(50)
    signer = UrlSigner("k", ttl_s=60, clock=clock)
    name = "abcdefghijklmnopqrstuvwx.webp"
    expires, sig = signer.sign(name)
    clock.t = 110
    assert signer.verify(name, expires, sig) is None
    clock.t = 111
    assert signer.verify(name, expires, sig) == "expired"


def test_api_keys_from_env_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nfile-key\n\n  spaced-key  \n")
    keys = ApiKeys.from_sources("env-a, env-b", str(f))
    assert keys.enabled
    for k in ("env-a", "env-b", "file-key", "spaced-key"):
        assert keys.identify(f"Bearer {k}") == hashlib.sha256(k.encode()).hexdigest(), k
    for header in (None, "", "Bearer", "Bearer nope", "env-a", "Basic env-a", "Bearer # comment"):
        assert keys.identify(header) is None, header


def test_no_keys_means_open():
    keys = ApiKeys.from_sources(None, None)
    # The middleware asks no key of anyone when none is configured.
    assert not keys.enabled and keys.identify("Bearer anything") is None


def test_keys_are_not_kept_in_clear():
    keys = ApiKeys(["super-secret"])
    assert "super-secret" not in repr(vars(keys))
