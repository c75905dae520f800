"""deploy/values.yaml parses, has the chart's shape, and carries the measured sizing.

The sizing comes from a run of scripts/student_cost.py, kept in
docs/student_cost.json; the README's "Sizing a JupyterHub" table shows the
same run. A new measurement that changes the sizing fails here until the
values file and the README follow it.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _values() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "values.yaml").read_text())


def _measured() -> dict:
    return json.loads((ROOT / "docs" / "student_cost.json").read_text())


def test_the_measured_run_is_one_to_four_students_with_qemu_and_no_errors():
    run = _measured()
    assert [r["students"] for r in run["runs"]] == [1, 2, 4]
    for r in run["runs"]:
        assert r["errors"] == {}, r["errors"]
        labs = [lab["lab"] for s in r["per_student"] for lab in s["labs"]]
        assert labs == ["00_welcome.ipynb", "04_virtqueues.ipynb",
                        "07_live_migration.ipynb"] * r["students"]


def test_singleuser_limits_are_the_measured_sizing():
    single, size = _values()["singleuser"], _measured()["sizing"]
    assert single["memory"] == {"guarantee": size["mem_guarantee"], "limit": size["mem_limit"]}
    assert single["cpu"] == {"guarantee": size["cpu_guarantee"], "limit": size["cpu_limit"]}
    # the guarantee covers the largest measured peak PSS per student
    peak = max(r["peak_tree_pss_mib"] for r in _measured()["runs"])
    assert int(size["mem_guarantee"].rstrip("M")) >= peak


def test_readme_shows_the_same_sizing():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Sizing a JupyterHub", 1)[1].split("\n## ", 1)[0]
    size = _measured()["sizing"]
    for key in ("mem_guarantee", "mem_limit", "cpu_guarantee", "cpu_limit", "students_per_node"):
        assert f"| {key} | {size[key]} |" in section, f"README's sizing table lacks {key}"
    for r in _measured()["runs"]:
        assert f"| {r['students']} | {r['wall_s']} |" in section


def test_image_culling_and_no_kvm():
    values = _values()
    single = values["singleuser"]
    assert single["image"]["name"] and single["image"]["tag"]
    assert single["extraEnv"]["VHOSTLAB_FRONTEND"] == "qemu"
    assert "kvm" not in json.dumps(single).lower()
    assert "privileged" not in json.dumps(single)
    assert values["cull"]["enabled"] is True and values["cull"]["timeout"] > 0
    assert values["hub"]["config"]["JupyterHub"]["authenticator_class"]
