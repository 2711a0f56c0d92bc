"""The CI helpers (tests/hosts.py, tests/skips.py): the reference hosts unpacked once per tarball, a missing
one named, and a suite's result line, where CI=true fails a suite that ran nothing or skipped a test the
allow-list does not name."""

import io
import tarfile
from pathlib import Path

import hosts  # tests/ is on the path (tests/conftest.py)
import pytest
import skips


def _tarball(path: Path, marker: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (("ComfyUI/comfy/model_patcher.py", ""), ("ComfyUI/main.py", ""),
                           ("ComfyUI/comfyui_version.py", f'__version__ = "{marker}"\n')):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_tarball_is_unpacked_once_and_again_when_it_changes(tmp_path):
    tarball = _tarball(tmp_path / "ComfyUI-9.9.9.tar.gz", "9.9.9")
    logged = []
    root = hosts.unpack(tarball, tmp_path / "hosts" / "9.9.9", logged.append)
    assert hosts.is_comfyui(root) and hosts.version(root) == "9.9.9" and len(logged) == 1
    assert hosts.unpack(tarball, tmp_path / "hosts" / "9.9.9", logged.append) == root and len(logged) == 1
    _tarball(tarball, "9.9.10")  # another tarball under the same name: its sha256 differs
    hosts.unpack(tarball, tmp_path / "hosts" / "9.9.9", logged.append)
    assert len(logged) == 2 and hosts.version(root) == "9.9.10"


def test_missing_reference_hosts_are_named(tmp_path, monkeypatch):
    for name in ("COMFYUI_PATHS", "COMFYUI_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("STREAMLINE_SHARED_HOSTS", str(tmp_path / "nothing"))
    if hosts.is_comfyui(hosts.REPO.parent.parent):
        pytest.skip("this clone sits in a ComfyUI's custom_nodes, which hosts.py takes first")
    roots, why, complete = hosts.find_hosts()
    assert roots == [] and not complete
    assert "ComfyUI 0.3.64" in why and "ComfyUI 0.3.52" in why and "does not exist" in why


def _report(tmp_path: Path, cases: str) -> Path:
    path = tmp_path / "report.xml"
    path.write_text(f'<testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


PASSED = '<testcase classname="tests.host.test_x" file="tests/host/test_x.py" name="test_ok" />'
SKIPPED = ('<testcase classname="tests.host.test_x" file="tests/host/test_x.py" name="test_gpu[a-b]">'
           '<skipped message="needs CUDA" /></testcase>')


def test_an_unlisted_skip_fails_only_in_ci(tmp_path):
    report = _report(tmp_path, PASSED + SKIPPED)
    failed, line = skips.result(report, 0, ci=True, allowed=[])
    assert failed and "tests/host/test_x.py::test_gpu[a-b] (needs CUDA)" in line
    failed, line = skips.result(report, 0, ci=False, allowed=[])
    assert not failed and line.startswith("passed (1 tests, 1 skipped")
    listed = [skips.Allowed("tests/host/test_x.py::test_gpu[*]", "needs a CUDA device")]
    failed, line = skips.result(report, 0, ci=True, allowed=listed)
    assert not failed and "1 in allowed_skips.txt" in line
    # brackets are literal: a pattern for other parameters does not allow it
    assert not skips.Allowed("tests/host/test_x.py::test_gpu[c*]", "x").matches("tests/host/test_x.py::test_gpu[a-b]")


def test_a_suite_that_ran_nothing_fails_in_ci_and_a_failure_always_fails(tmp_path):
    report = _report(tmp_path, SKIPPED)
    assert skips.result(report, 0, ci=True, allowed=[])[0]
    assert skips.result(report, 0, ci=False, allowed=[]) == (False, "skipped (needs CUDA)")
    assert skips.result(_report(tmp_path, PASSED), 1, ci=False, allowed=[])[0]


def test_the_allow_list_parses_and_every_entry_gives_a_reason(tmp_path):
    skips.allowed_skips()  # the shipped list parses
    bad = tmp_path / "allowed.txt"
    bad.write_text("tests/host/test_x.py::test_gpu\n")
    with pytest.raises(ValueError, match="gives no reason"):
        skips.allowed_skips(bad)
