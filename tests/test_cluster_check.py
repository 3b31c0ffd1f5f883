"""The cluster check before queueing (issue 18): the parsers on recorded sinfo output, the checks against those
nodes, whole-node GPU steps and mail in the plan and in the rendered sbatch scripts. No cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftjobs.errors import SftjobsError
from sftjobs.executors.slurm import SlurmExecutor
from sftjobs.executors.slurm_cluster import (
    Cluster,
    check_plan,
    check_step,
    constraint_matches,
    gpu_count,
    mem_mb,
    parse_partition_limits,
    parse_sinfo_json,
    parse_sinfo_nodes,
)
from sftjobs.planning.dag import build_plan
from sftjobs.profile import load_profile

RECORDED = Path(__file__).parent / "slurm_output"


def cluster(name: str) -> Cluster:
    nodes, default = parse_sinfo_nodes((RECORDED / f"sinfo_nodes_{name}.txt").read_text())
    return Cluster(nodes, parse_partition_limits((RECORDED / f"sinfo_limits_{name}.txt").read_text()), default)


def plan(profile="toy", *sets, dry_run_first=False):
    return build_plan(load_profile(profile, list(sets)), dry_run_first=dry_run_first)


def test_recorded_test_cluster_parses():
    c = cluster("test_cluster")
    assert c.default == "debug"
    assert sorted(n.name for n in c.nodes) == ["n1", "n2"]
    for node in c.nodes:
        assert (node.cpus, node.mem_mb, node.gpus, node.features) == (8, 8000, 8, frozenset())
        assert sorted(node.partitions) == ["debug", "short"]
    assert c.limits["short"].max_minutes == 10 and c.limits["debug"].max_minutes is None
    assert c.limits["*default*"].name == "debug" and c.limits["short"].default_minutes is None


def test_recorded_json_gives_the_same_nodes_as_the_parsable_form():
    nodes, _ = parse_sinfo_nodes((RECORDED / "sinfo_nodes_test_cluster.txt").read_text())
    from_json = parse_sinfo_json((RECORDED / "sinfo_test_cluster.json").read_text())
    key = lambda n: (n.name, n.cpus, n.mem_mb, n.gpus, n.features, tuple(sorted(n.partitions)))  # noqa: E731
    assert sorted(map(key, from_json)) == sorted(map(key, nodes))


def test_json_with_newer_number_objects_and_feature_lists():
    text = ('{"nodes": [{"name": "g1", "cpus": {"set": true, "number": 32}, "real_memory": {"set": true, '
            '"number": 256000}, "gres": "gpu:h100:4(S:0-1)", "features": ["h100", "ib"], "partitions": ["gpu"]}]}')
    (node,) = parse_sinfo_json(text)
    assert (node.cpus, node.mem_mb, node.gpus, node.features, node.partitions) == (
        32, 256000, 4, frozenset({"h100", "ib"}), ("gpu",))
    with pytest.raises(ValueError):
        parse_sinfo_json("sinfo: error: no json plugin")


def test_constructed_mixed_cluster_parses():
    c = cluster("mixed_constructed")
    by_name = {n.name: n for n in c.nodes}
    assert c.default == "gpu"
    assert by_name["a100-02"].gpus == 8  # "(S:0,1)" holds a comma
    assert by_name["h100-01"].gpus == 8 and sorted(by_name["h100-01"].partitions) == ["gpu", "long"]
    assert by_name["v100-01"].gpus == 4  # shards are not GPUs
    assert by_name["cpu-01"].gpus == 0 and by_name["cpu-01"].features == frozenset()
    assert c.limits["gpu"].max_minutes == 2 * 24 * 60 and c.limits["gpu"].default_minutes == 60


@pytest.mark.parametrize("gres,count", [("gpu:8", 8), ("(null)", 0), ("gpu", 1), ("gpu:a100:2,gpu:v100:1", 3),
                                        ("gpu:a100:4(S:0,1),mps:400", 4), ("", 0)])
def test_gpu_count(gres, count):
    assert gpu_count(gres) == count


@pytest.mark.parametrize("text,mb", [("64G", 65536), ("16000M", 16000), ("500", 500), ("1T", 1048576), ("2048K", 2),
                                     ("0", 0)])
def test_mem_mb(text, mb):
    assert mem_mb(text) == mb


def test_constraint_matches():
    feats = frozenset({"a100", "ib"})
    assert constraint_matches("a100", feats) and constraint_matches("a100&ib", feats)
    assert constraint_matches("h100|a100", feats) and not constraint_matches("h100", feats)
    assert not constraint_matches("a100&h100", feats)
    assert constraint_matches("[a100|h100]*2", feats) is None  # Slurm's own syntax: Slurm judges


def test_toy_and_whole_node_prod_fit_the_test_cluster():
    c = cluster("test_cluster")
    assert "partition debug" in check_plan(plan("toy", "resources.cpus_per_task=2", "resources.mem=500M",
                                                "resources.cpu_step_mem=300M"), c)
    # prod asks for the whole node (--exclusive, --mem=0, every CPU), so its GPU steps fit any node size
    prod = plan("prod", "resources.cpu_step_mem=4G", dry_run_first=True)
    for step in prod.steps:
        assert check_step(step, c) is None, step.name


def test_prod_as_shipped_stops_at_the_cpu_steps_memory():
    with pytest.raises(SftjobsError) as exc:
        check_plan(plan("prod", dry_run_first=True), cluster("test_cluster"))
    msg = str(exc.value)
    assert msg.startswith("step data asks for 16G of memory on a node (resources.cpu_step_mem)")
    assert "partition debug" in msg and "8000M memory" in msg and "Nothing was queued" in msg


@pytest.mark.parametrize("sets,words", [
    (["resources.max_gpus_per_node=16", "resources.gpus_per_node=12"],
     ["step train asks for 12 GPUs on a node (resources.gpus_per_node)", "2 nodes with 8 CPUs, 8000M memory, 8 GPUs"]),
    (["resources.mem=20G"], ["step train asks for 20G of memory on a node (resources.mem)", "with 1 GPU and 2 CPUs has that"]),
    (["resources.cpus_per_task=12", "resources.mem=1G"], ["step train asks for 12 CPUs on a node "
                                                         "(resources.cpus_per_task)", "null takes every CPU"]),
    (["resources.cpu_step_cpus=9", "resources.cpus_per_task=9"], ["step data asks for 9 CPUs on a node "
                                                                  "(resources.cpu_step_cpus)"]),
    (["resources.constraint=a100"], ["step data asks for nodes with features 'a100' (resources.constraint)",
                                     "features none"]),
    (["resources.nodes=3", "resources.gpus_per_node=2", "resources.mem=1G"],
     ["step train asks for 3 nodes with 2 GPUs and 2 CPUs and 1G memory (resources.nodes)",
      "partition debug (the default; resources.partition is null) has 2 such node(s)", "Lower resources.nodes to 2"]),
    (["resources.partition=short", "resources.cpu_step_time=04:00:00"],
     ["step data asks for --time=04:00:00 (resources.cpu_step_time)", "partition short allows at most 10 minutes"]),
    (["resources.partition=short", "resources.cpu_step_time=5", "resources.time=5"],
     ["step validate asks for --time=01:00:00 but partition short", "MaxTime is at least 1 hour"]),
    (["resources.partition=gpu"], ["resources.partition 'gpu' is not a partition", "debug, short"]),
])
def test_requests_no_node_can_satisfy_name_the_key(sets, words):
    base = ["resources.cpus_per_task=2", "resources.mem=500M", "resources.cpu_step_mem=300M",
            "resources.cpu_step_cpus=1"]
    with pytest.raises(SftjobsError) as exc:
        check_plan(plan("toy", *base, *sets), cluster("test_cluster"))
    for word in words:
        assert word in str(exc.value), str(exc.value)


def test_mixed_cluster_combines_requirements_on_one_node():
    c = cluster("mixed_constructed")
    ok = plan("prod", "resources.constraint=h100")
    assert "partition gpu" in check_plan(ok, c)
    # 8 GPUs exist (a100, h100) and 200 CPUs nowhere; 4 v100s have 191000M: no node has 8 GPUs and 600G
    with pytest.raises(SftjobsError) as exc:
        check_plan(plan("prod", "resources.mem=1100G"), c)
    assert "1100G of memory on a node (resources.mem)" in str(exc.value) and "with 8 GPUs" in str(exc.value)
    long = plan("prod", "resources.partition=long", "resources.cpu_step_mem=4G", "resources.constraint=a100")
    with pytest.raises(SftjobsError) as exc:
        check_plan(long, c)
    assert "partition long" in str(exc.value) and "features 'a100'" in str(exc.value)


def test_a_flag_set_in_sbatch_extra_is_left_to_sbatch():
    c = cluster("test_cluster")
    base = ["resources.cpus_per_task=2", "resources.cpu_step_mem=300M"]
    with pytest.raises(SftjobsError, match=r"64G of memory on a node \(resources.mem\)"):
        check_plan(plan("toy", *base), c)
    # --mem=0 in sbatch_extra wins in the script (submitit writes it after resources.mem): nothing to refuse
    assert "partition debug" in check_plan(plan("toy", *base, 'resources.sbatch_extra=["--mem=0"]'), c)
    assert "not checked" in check_plan(plan("toy", "resources.mem=500M", *base, "resources.partition=nosuch",
                                            'resources.sbatch_extra=["--partition=debug"]'), c)


def test_whole_node_gpu_steps_ask_for_the_node():
    prod = plan("prod", dry_run_first=True)
    for step in prod.steps:
        res = step.resources
        if step.kind in ("data", "model") or step.name == "validate":  # the final validation: one GPU, not the node
            assert not res.exclusive and res.mem == "16G" and res.cpus_per_task == 4
            assert res.gpus_per_node == (1 if step.name == "validate" else 0)
        else:
            assert res.exclusive and res.mem == "0" and res.cpus_per_task is None, step.name
    # what the profile sets is kept; taking every GPU still takes the node
    sized = plan("prod", "resources.mem=400G", "resources.cpus_per_task=32")
    assert sized.step("train").resources.exclusive and sized.step("train").resources.mem == "400G"
    assert sized.step("train").resources.cpus_per_task == 32 and sized.step("validate").resources.cpus_per_task == 4
    # part of a node: no --exclusive, and no --mem=0
    part = plan("prod", "resources.gpus_per_node=4")
    assert not part.step("train").resources.exclusive and part.step("train").resources.mem is None
    toy = plan("toy")
    assert not toy.step("train").resources.exclusive and toy.step("train").resources.mem == "64G"


def test_mail_fail_on_every_step_and_the_users_types_on_the_last():
    steps = plan("toy", "resources.mail_type=END", "resources.mail_user=alice@example.org", dry_run_first=True).steps
    assert [s.resources.mail_type for s in steps] == ["FAIL"] * 6 + ["END,FAIL"]
    assert {s.resources.mail_user for s in steps} == {"alice@example.org"}
    assert plan("toy", "resources.mail_type=ALL").steps[-1].resources.mail_type == "ALL"
    only_user = plan("toy", "resources.mail_user=bob").steps
    assert only_user[-1].resources.mail_type == "END,FAIL" and only_user[0].resources.mail_type == "FAIL"
    assert all(s.resources.mail_type is None for s in plan("toy", "resources.mail_type=NONE").steps)
    assert all(s.resources.mail_type is None and s.resources.mail_user is None for s in plan("toy").steps)


def rendered(*sets, dry_run_first=False, tmp: Path) -> dict[str, str]:
    executor = SlurmExecutor(need_sbatch=False)
    executor._limits = {}  # no cluster: the time Slurm would give is not asked for here
    requests = executor.prepare(plan("prod", *sets, dry_run_first=dry_run_first), tmp / "run")
    return {r.step: r.text for r in requests}


def test_rendered_sbatch_scripts_carry_the_node_and_mail_flags(tmp_path):
    text = rendered("resources.mail_type=END,TIME_LIMIT_80", "resources.mail_user=alice@example.org",
                    dry_run_first=True, tmp=tmp_path)
    train = text["train"].splitlines()
    assert "#SBATCH --exclusive" in train and "#SBATCH --mem=0" in train
    assert not any(line.startswith("#SBATCH --cpus-per-task") for line in train)
    assert "#SBATCH --cpus-per-task=4" in text["data"] and "#SBATCH --exclusive" not in text["data"]
    for step, script in text.items():
        lines = script.splitlines()
        assert "#SBATCH --mail-user=alice@example.org" in lines
        want = "END,TIME_LIMIT_80,FAIL" if step == "validate" else "FAIL"
        assert f"#SBATCH --mail-type={want}" in lines, step
    plain = rendered(tmp=tmp_path)
    assert all("--mail" not in script for script in plain.values())
    sized = rendered("resources.mem=400G", "resources.cpus_per_task=32", tmp=tmp_path)["train"].splitlines()
    assert "#SBATCH --exclusive" in sized and "#SBATCH --mem=400G" in sized and "#SBATCH --cpus-per-task=32" in sized
