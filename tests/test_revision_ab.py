"""lab.revision_ab: an earlier revision's layer imports beside this checkout's and is timed against it in one run."""
import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from launcher.run import REPO, _kill_tree
from lessons_lib.lab import revision_ab
from lessons_lib.moe.config import MoEConfig
from lessons_lib.moe.layer import MoELayer

pytestmark = pytest.mark.skipif(
    subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0,
    reason="needs this checkout's git history")

CFG = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu")


def test_a_revision_imports_as_a_package_of_its_own():
    package, sha = revision_ab.load_revision("HEAD")
    assert len(sha) == 40 and package.__name__ == f"lessons_lib_{sha[:12]}"
    assert package.MoELayer is not MoELayer  # its own classes, from its own files
    assert package.moe.layer.__file__ != sys.modules["lessons_lib.moe.layer"].__file__
    assert revision_ab.load_revision(sha[:8])[0] is package  # extracted once


def uncommitted_layer_changes() -> bool:
    return bool(revision_ab.git("status", "--porcelain", "--", "lessons_lib/moe").strip())


def test_the_same_code_at_both_ends_computes_the_same_numbers():
    package, _ = revision_ab.load_revision("HEAD")
    runs = revision_ab.revision_times(package, CFG, [("local", "loop"), ("local", "grouped")], 12,
                                      torch.device("cpu"), rounds=3, steps=2, warmup=1)
    assert list(runs) == ["local + loop", "local + grouped"]
    for r in runs.values():
        if not uncommitted_layer_changes():  # (while the layer is being edited, HEAD's differs from it)
            assert r["max_diff_y"] == 0.0 and r["max_diff_grad_x"] == 0.0
        assert len(r["before_ms"]) == len(r["after_ms"]) == len(r["ratio"]) == 3
        assert all(t > 0 for t in r["before_ms"] + r["after_ms"])
        assert r["ratio"] == pytest.approx([a / b for a, b in zip(r["after_ms"], r["before_ms"])])


def test_a_revision_that_does_not_exist_is_a_clear_error():
    with pytest.raises(ValueError, match="no-such-revision"):
        revision_ab.load_revision("no-such-revision")


def test_an_option_the_earlier_config_lacks_must_be_at_its_default():
    @dataclasses.dataclass
    class OldConfig:  # an earlier MoEConfig, before capacity_factor existed
        num_experts: int = 8
        top_k: int = 2
        hidden_dim: int = 64
        ffn_dim: int = 256
        activation: str = "gelu"

    old = SimpleNamespace(moe=SimpleNamespace(config=SimpleNamespace(MoEConfig=OldConfig)))
    fields = {f.name: getattr(CFG, f.name) for f in dataclasses.fields(OldConfig)}
    assert revision_ab.config_at(old, CFG) == OldConfig(**fields)
    with pytest.raises(ValueError, match="capacity_factor"):
        revision_ab.config_at(old, dataclasses.replace(CFG, capacity_factor=1.0))


def test_the_command_writes_its_record_on_two_ranks(tmp_path):
    out = tmp_path / "ab.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "lessons_lib.lab.revision_ab", "--before", "HEAD", "--dispatchers", "alltoall",
           "--experts", "grouped", "--rounds", "2", "--steps", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)  # no orphan rank left behind on the CI machine
        pytest.fail(f"revision_ab hung and was killed:\n{proc.stdout.read()[-3000:]}")
    assert proc.returncode == 0, printed[-3000:]
    record = json.loads(out.read_text())
    assert record["world_size"] == 2 and record["device"] == "cpu"
    assert record["before"] == subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                              text=True).stdout.strip()
    run = record["runs"]["alltoall + grouped"]
    assert len(run["ratio"]) == 2 and "alltoall + grouped" in printed
    assert out.with_suffix(".png").stat().st_size > 0  # its figure beside it
    if not uncommitted_layer_changes():
        assert run["max_diff_y"] == 0.0 and record["after_uncommitted_changes"] is False


@pytest.mark.parametrize("name, before, rounds", [("revision_ab_small_cpu", "1bb554b", 60),
                                                  ("revision_ab_small_cpu_control", None, 60),
                                                  ("revision_ab_small_swiglu_cpu", "3d0d34a", 20),
                                                  ("revision_ab_small_swiglu_cpu_control", None, 20)])
def test_the_committed_records_say_what_the_readme_quotes(name, before, rounds):
    import statistics

    record = json.loads((REPO / "images" / f"{name}.json").read_text())
    assert record["device"] == "cpu" and record["world_size"] == 2 and not record["after_uncommitted_changes"]
    assert record["before"].startswith(before or record["after"])  # the control: the checkout against its commit
    assert record.get("activation", "gelu") == ("swiglu" if "swiglu" in name else "gelu")
    medians = [statistics.median(r["ratio"]) for r in record["runs"].values()]
    assert len(medians) == 6 and all(len(r["ratio"]) == rounds for r in record["runs"].values())
    assert all(r["max_diff_y"] == 0.0 and r["max_diff_grad_x"] < 1e-6 for r in record["runs"].values())
    quoted = f"{min(medians):.3f} and {max(medians):.3f}" if before else f"{min(medians):.3f} to {max(medians):.3f}"
    readme = " ".join((REPO / "README.md").read_text().split())
    assert quoted in readme and f"mean {statistics.mean(medians):.3f}" in readme
