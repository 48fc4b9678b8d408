"""`deltastore demo`: the whole pipeline on the tiny example, narrated and explained."""

from __future__ import annotations

import pytest

from deltastore import demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_narrates_each_commit_and_explains_the_table(example, tmp_path, monkeypatch):
    # The session's example (10 training steps) instead of building one: what is tested is the
    # pipeline and what it prints, not the training.
    monkeypatch.setattr(demo, "make_example", lambda workdir, log: example)
    lines: list[str] = []
    report = demo.run_demo(tmp_path, progress=False, echo=lines.append)
    assert report["verify_problems"] == []
    rows = report["rows"]
    assert len(rows) == len(demo.SETTINGS) * len(demo.TASKS)
    text = "\n".join(lines)
    for row in rows:  # one progress line per commit, as it happens
        assert f"  {row['task']} v{row['version']}: {row['method']}" in text
    assert "How to read the table" in text and "has_top" in demo.EXPLANATION
    # The explanation's claim holds on these finetunes: fitted lambdas lower the logit error of
    # the closed form (never raise it: the fit falls back to the closed form).
    by_setting = {(r["task"], r["method"], r["tune"]): r for r in rows}
    for task in demo.TASKS:
        assert by_setting[(task, "bitdelta", "dbms")]["logit_mse"] <= by_setting[(task, "bitdelta", "l2")]["logit_mse"]
    assert any(by_setting[(t, "bitdelta", "dbms")]["logit_mse"] < 0.5 * by_setting[(t, "bitdelta", "l2")]["logit_mse"]
               for t in demo.TASKS)
