from __future__ import annotations

from serve_app.moderation import PatternModerator, moderation_blocked


def test_shipped_list_blocks_and_levels():
    m = PatternModerator.from_file("configs/moderation.yaml")
    assert m.check("a cute baby sea otter", "auto") is None
    assert m.check("a gory battlefield", "auto") == "violence/graphic"
    assert m.check("a gory battlefield", "low") is None  # not severe
    assert m.check("CSAM", "low") == "sexual/minors"  # severe: blocked at every level


def test_blocked_error_shape():
    err = moderation_blocked("violence/graphic")
    body = err.body()["error"]
    assert err.status == 400 and body["type"] == "image_generation_user_error" and body["code"] == "moderation_blocked"
