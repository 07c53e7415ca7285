import json
import math

import pytest

from knowlm_nb import report


def test_record_writes_atomically_and_accumulates(tmp_path):
    report.record("a", 1, workdir=tmp_path, notebook="07")
    report.record("b", 0.5, workdir=tmp_path, notebook="07")
    report.record("a", 2, workdir=tmp_path, notebook="07")
    data = json.loads((tmp_path / "metrics" / "07.json").read_text())
    assert data == {"a": 2, "b": 0.5}
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["07.json"]  # no temp files left


@pytest.mark.parametrize("name, value, err", [
    ("x", math.nan, ValueError), ("x", math.inf, ValueError), ("x", [1, 2], TypeError),
    ("x", {"a": 1}, TypeError), ("x", None, TypeError), ("bad name", 1, ValueError),
    ("../escape", 1, ValueError), (3, 1, ValueError),
])
def test_record_rejects_bad_figures(tmp_path, name, value, err):
    with pytest.raises(err):
        report.record(name, value, workdir=tmp_path, notebook="07")
    assert not (tmp_path / "metrics" / "07.json").exists()


def test_record_needs_a_context(monkeypatch):
    monkeypatch.setattr(report, "_context", {"workdir": None, "notebook": None})
    with pytest.raises(RuntimeError, match="config.resolve"):
        report.record("x", 1)


def test_record_accepts_numpy_and_torch_scalars(tmp_path):
    import numpy as np
    import torch
    report.record("n", np.float32(0.25), workdir=tmp_path, notebook="07")
    report.record("t", torch.tensor(3), workdir=tmp_path, notebook="07")
    assert report.load_metrics(tmp_path, "07") == {"n": 0.25, "t": 3}


def test_environment_flags_missing_and_mismatched_pins(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("pyyaml==6.0.3  # comment\nno-such-package-xyz==1.0\npytest==0.0.1\n")
    rows = {r["package"]: r for r in report.environment(req)}
    assert rows["pyyaml"]["status"] == "OK"
    assert rows["no-such-package-xyz"]["status"] == "FAIL"
    assert rows["no-such-package-xyz"]["installed"] == "missing"
    assert rows["pytest"]["status"] == "FAIL"


def test_the_real_environment_matches_the_pins():
    bad = [r for r in report.environment() if r["status"] != "OK"]
    assert not bad, bad


def test_markdown_table_escapes_pipes():
    table = report.markdown_table([{"a": "x|y", "b": 0.123456}])
    assert "x\\|y" in table and "0.1235" in table
