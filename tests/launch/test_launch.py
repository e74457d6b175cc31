"""Tests of launch/: XManager work units, GKE manifests, the Vertex AI entry and tpu_vm.sh."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from absl import flags
from ml_collections import config_flags

from configs import chart
from launch import gke, vertex_entry, xm_launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, **kw)


def _config_file(tmp_path, body: str) -> str:
  path = tmp_path / "my_config.py"
  path.write_text(textwrap.dedent(body))
  return str(path)


# ---- xm_launch


def test_work_units_follow_the_sweep():
  units = xm_launch.work_units("configs/chart.py", "/gcs/b/root/", "lr_g", "h100x16")
  points = chart.sweep()
  assert len(units) == len(points) == 4
  for i, (unit, point) in enumerate(zip(units, points), start=1):
    assert unit.index == i
    assert unit.workdir == f"/gcs/b/root/lr_g/{i}"
    assert unit.args[:2] == ("--config=configs/chart.py", f"--workdir=/gcs/b/root/lr_g/{i}")
    assert dict(unit.overrides) == point
    assert len(unit.args) == 2 + len(point)
    assert unit.command[:2] == ("python", "launch/vertex_entry.py")
  assert units[0].args[2:] == ("--config.grpo.learning_rate=5e-07", "--config.grpo.group_size=4")
  assert len({u.workdir for u in units}) == 4


def test_work_unit_args_parse_back_into_the_config():
  """The --config.k=v strings are what ml_collections reads back to the swept values."""
  for unit in xm_launch.work_units("configs/chart.py:demo", "/w", "t", "cpu"):
    argv = ["prog", *(a for a in unit.args if not a.startswith("--workdir="))]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "test", flag_values=values, sys_argv=argv)
    values(argv)
    for key, value in unit.overrides:
      section, name = key.split(".")
      assert values.config[section][name] == value
    assert values.config.model.preset == "tiny"  # The :demo preset reached get_config.


def test_no_sweep_gives_one_unit(tmp_path):
  units = xm_launch.work_units("configs/web.py:demo", "/w", "t", "v5p-64", use_sweep=False)
  assert [u.args for u in units] == [("--config=configs/web.py:demo", "--workdir=/w/t/1")]
  path = _config_file(
    tmp_path,
    """
    from configs import common

    def get_config(arg=None):
      return common.base_config()
    """,
  )
  [unit] = xm_launch.work_units(path, "/w", "t", "cpu")
  assert unit.args == (f"--config={path}", "--workdir=/w/t/1")
  assert unit.command[:3] == ("python", "-m", "rrvf_jax.main")


@pytest.mark.parametrize(
  "point, message",
  [
    ({"grpo.learning_rat": 1e-6}, "unknown config key 'grpo.learning_rat'"),
    ({"nosuch.key": 1}, "unknown config key 'nosuch.key'"),
    ({"grpo": 1}, "config key 'grpo' is a section"),
    ({"grpo.group_size": 0.5}, "config key 'grpo.group_size' cannot take 0.5"),
  ],
)
def test_bad_sweep_point_is_one_clear_line(tmp_path, point, message):
  path = _config_file(
    tmp_path,
    f"""
    from configs import common

    def get_config(arg=None):
      return common.base_config()

    def sweep():
      return [{{"grpo.steps": 3}}, {point!r}]
    """,
  )
  with pytest.raises(ValueError, match="sweep point 2") as e:
    xm_launch.work_units(path, "/w", "t", "cpu")
  assert message in str(e.value)
  result = _run([sys.executable, "launch/xm_launch.py", f"--config={path}", "--workdir_root=/w"])
  assert result.returncode != 0
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert message in result.stderr


def test_bad_platform_and_missing_file():
  with pytest.raises(ValueError, match="unknown platform 'tpu9'"):
    xm_launch.work_units("configs/chart.py", "/w", "t", "tpu9")
  with pytest.raises(ValueError, match=r"config file configs/nope\.py does not exist"):
    xm_launch.work_units("configs/nope.py", "/w", "t", "cpu")


def test_dry_run_prints_each_work_unit():
  result = _run(
    [
      sys.executable,
      "launch/xm_launch.py",
      "--config=configs/chart.py",
      "--workdir_root=/gcs/b/rrvf",
      "--platform=v5p-64",
      "--experiment_title=sw",
      "--dry_run",
    ]
  )
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert out.startswith("4 work unit(s), platform v5p-64")
  assert out.count("8 host(s) x 4 TPU v5p per host = 32 (topology 2x4x4)") == 4
  assert "xm.JobRequirements(tpu_v5p='2x4x4')" in out
  for i in range(1, 5):
    assert f"--workdir=/gcs/b/rrvf/sw/{i}" in out
  assert (
    "command:      python -m rrvf_jax.main --config=configs/chart.py --workdir=/gcs/b/rrvf/sw/4"
    " --config.grpo.learning_rate=1e-06 --config.grpo.group_size=8"
  ) in out
  gpu = _run(
    [
      sys.executable,
      "launch/xm_launch.py",
      "--config=configs/web.py",
      "--workdir_root=/w",
      "--platform=h100x16",
      "--nosweep",
      "--dry_run",
    ]
  )
  assert gpu.returncode == 0, gpu.stderr
  assert gpu.stdout.startswith("1 work unit(s)")
  assert "2 host(s) x 8 NVIDIA H100 80GB per host = 16" in gpu.stdout
  assert "JAX_NUM_PROCESSES=2" in gpu.stdout and "JAX_COORDINATOR_ADDRESS=" in gpu.stdout


@pytest.mark.skipif(
  importlib.util.find_spec("xmanager") is not None, reason="xmanager is installed"
)
def test_real_launch_without_xmanager_is_one_clear_error():
  units = xm_launch.work_units("configs/chart.py", "/w", "t", "cpu", use_sweep=False)
  with pytest.raises(ValueError, match="xmanager is not installed"):
    xm_launch.launch(units, "t", {})


# ---- Vertex AI entry

_SPEC = {
  "cluster": {
    "workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
    "workerpool1": ["cmle-training-workerpool1-ab-0:2222", "cmle-training-workerpool1-ab-1:2222"],
  },
  "environment": "cloud",
  "task": {"type": "workerpool1", "index": 1},
}


def test_vertex_cluster_spec_to_jax_env():
  env = vertex_entry.jax_env(json.dumps(_SPEC))
  assert env == {
    "JAX_COORDINATOR_ADDRESS": "cmle-training-workerpool0-ab-0:1234",
    "JAX_NUM_PROCESSES": "3",
    "JAX_PROCESS_ID": "2",
  }
  chief = dict(_SPEC, task={"type": "workerpool0", "index": 0})
  assert vertex_entry.jax_env(json.dumps(chief))["JAX_PROCESS_ID"] == "0"
  alone = {"cluster": {"workerpool0": ["h:2222"]}, "task": {"type": "workerpool0", "index": 0}}
  assert vertex_entry.jax_env(json.dumps(alone)) == {}
  with pytest.raises(ValueError, match="CLUSTER_SPEC"):
    vertex_entry.jax_env("{not json")


# ---- GKE


def _docs(options: gke.Options) -> dict[str, list[dict]]:
  return {name: list(yaml.safe_load_all(text)) for name, text in gke.manifests(options).items()}


def _pod(jobset: dict) -> tuple[dict, dict]:
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  return job, job["template"]["spec"]


def test_tpu_jobset():
  docs = _docs(gke.Options(platform="v5p-64", image="img:1", workdir="/workdir/a", judge="vllm"))
  assert set(docs) == {"tpu_v5p64.yaml", "judge_vllm.yaml"}
  [jobset] = docs["tpu_v5p64.yaml"]
  assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
  annotations = jobset["metadata"]["annotations"]
  assert (
    annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
  )
  job, pod = _pod(jobset)
  assert job["parallelism"] == job["completions"] == 8 and job["backoffLimit"] == 0
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
    "cloud.google.com/gke-tpu-topology": "2x4x4",
  }
  assert pod["hostNetwork"] is True
  [trainer] = pod["containers"]
  chips = trainer["resources"]["limits"]["google.com/tpu"]
  assert chips == 4 and chips * job["parallelism"] == 32
  assert trainer["image"] == "img:1"
  assert trainer["command"][:5] == [
    "python",
    "-m",
    "rrvf_jax.main",
    "--config=configs/chart.py",
    "--workdir=/workdir/a",
  ]
  assert "--config.judge.base_url=http://rrvf-judge:8000/v1" in trainer["command"]
  assert not any(e["name"].startswith("JAX_") for e in trainer["env"])  # JAX finds the slice.
  assert trainer["volumeMounts"][0]["mountPath"] == "/workdir"
  assert pod["volumes"][0]["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"


def test_gpu_jobset_sets_jax_multihost_env():
  docs = _docs(gke.Options(platform="h100x16", judge="none", main_args=("--config.seed=3",)))
  assert set(docs) == {"gpu_h100x16.yaml"}
  [jobset] = docs["gpu_h100x16.yaml"]
  job, pod = _pod(jobset)
  assert job["parallelism"] == job["completions"] == 2
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
  [trainer] = pod["containers"]
  assert trainer["resources"]["limits"]["nvidia.com/gpu"] * job["parallelism"] == 16
  env = {e["name"]: e for e in trainer["env"]}
  name, replicated = jobset["metadata"]["name"], jobset["spec"]["replicatedJobs"][0]["name"]
  assert env["JAX_COORDINATOR_ADDRESS"]["value"] == f"{name}-{replicated}-0-0.{name}:1234"
  assert env["JAX_NUM_PROCESSES"]["value"] == "2"
  field = env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
  assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  assert not any(a.startswith("--config.judge") for a in trainer["command"])
  assert trainer["command"][-1] == "--config.seed=3"
  assert "initContainers" not in pod  # No judge to wait for.


@pytest.mark.parametrize("server", ["vllm", "sglang"])
def test_judge_deployment_and_service(server):
  options = gke.Options(platform="h100x16", judge=server, judge_model="org/judge-model")
  docs = _docs(options)
  deployment, service = docs[f"judge_{server}.yaml"]
  assert (deployment["apiVersion"], deployment["kind"]) == ("apps/v1", "Deployment")
  assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
  [container] = deployment["spec"]["template"]["spec"]["containers"]
  assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
  assert container["readinessProbe"]["httpGet"]["port"] == 8000
  assert container["image"].startswith({"vllm": "vllm/", "sglang": "lmsysorg/sglang"}[server])
  command = container["command"]
  model_flag = {"vllm": "--model", "sglang": "--model-path"}[server]
  assert command[command.index(model_flag) + 1] == "org/judge-model"
  tp_flag = {"vllm": "--tensor-parallel-size", "sglang": "--tp"}[server]
  assert command[command.index(tp_flag) + 1] == "8"
  assert (
    service["metadata"]["name"] == gke.JUDGE_NAME and service["spec"]["ports"][0]["port"] == 8000
  )
  [jobset] = docs["gpu_h100x16.yaml"]
  _, pod = _pod(jobset)
  command = pod["containers"][0]["command"]
  assert "--config.judge.name=openai" in command
  assert "--config.judge.model=org/judge-model" in command


def test_bad_gke_options():
  with pytest.raises(ValueError, match="must be under /workdir"):
    gke.manifests(gke.Options(platform="v5p-64", workdir="/tmp/run"))
  with pytest.raises(ValueError, match="unknown judge 'tgi'"):
    gke.manifests(gke.Options(platform="v5p-64", judge="tgi"))


def test_checked_in_manifests_equal_the_generator():
  directory = os.path.join(REPO, "launch", "gke")
  expected = gke.documented()
  assert sorted(os.listdir(directory)) == sorted(expected)
  for name, text in expected.items():
    with open(os.path.join(directory, name)) as f:
      assert f.read() == text, (
        f"launch/gke/{name} is stale: python launch/gke.py --documented --out launch/gke"
      )


def test_gke_cli_dry_run_is_one_yaml_stream():
  result = _run(
    [
      sys.executable,
      "launch/gke.py",
      "--platform",
      "h100x16",
      "--image",
      "img:2",
      "--judge",
      "sglang",
      "--dry_run",
      "--",
      "--config.grpo.steps=5",
    ]
  )
  assert result.returncode == 0, result.stderr
  kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
  assert kinds == ["JobSet", "Deployment", "Service"]
  assert "--config.grpo.steps=5" in result.stdout
  missing = _run([sys.executable, "launch/gke.py", "--platform", "h100x16", "--dry_run"])
  assert missing.returncode == 2 and "--image are required" in missing.stderr


# ---- tpu_vm.sh


def test_tpu_vm_dry_run_prints_the_gcloud_commands(tmp_path):
  # A gcloud first on PATH that leaves a mark: the dry run must never call it.
  fake = tmp_path / "gcloud"
  fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/called\n")
  fake.chmod(0o755)
  result = _run(
    [
      "bash",
      "launch/tpu_vm.sh",
      "--tpu",
      "rrvf-v5p",
      "--zone",
      "us-east5-a",
      "--create",
      "--dry_run",
      "--",
      "--config=configs/chart.py",
      "--workdir=/gcs/b/run1",
    ],
    env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
  )
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / "called").exists()
  lines = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud")]
  assert len(lines) == 4
  create, scp, setup, start = lines
  assert "tpu-vm create rrvf-v5p --zone=us-east5-a" in create
  assert "--accelerator-type=v5p-64" in create and "--version=" in create
  assert "tpu-vm scp" in scp and "--worker=all" in scp
  assert "--worker=all" in setup and "bash setup.sh" in setup and "jax[tpu]==0.10.2" in setup
  assert "--worker=all" in start and "nohup .venv/bin/python -m rrvf_jax.main" in start
  assert "--config=configs/chart.py --workdir=/gcs/b/run1" in start
  assert "dry run, nothing started" in result.stdout


def test_tpu_vm_without_create_skips_it():
  result = _run(
    [
      "bash",
      "launch/tpu_vm.sh",
      "--tpu=t",
      "--zone=z",
      "--dry_run",
      "--",
      "--config=c",
      "--workdir=w",
    ]
  )
  assert result.returncode == 0, result.stderr
  assert "tpu-vm create" not in result.stdout
  assert result.stdout.count("+ gcloud") == 3


@pytest.mark.parametrize(
  "args, message",
  [
    (["--zone", "z", "--dry_run", "--", "--config=c", "--workdir=w"], "--tpu is required"),
    (["--tpu", "t", "--dry_run", "--", "--config=c", "--workdir=w"], "--zone is required"),
    (["--tpu", "t", "--zone", "z", "--dry_run"], "--workdir=... after --"),
    (["--tpu", "t", "--zone", "z", "--bogus"], "unknown argument '--bogus'"),
  ],
)
def test_tpu_vm_usage_errors(args, message):
  result = _run(["bash", "launch/tpu_vm.sh", *args])
  assert result.returncode == 2
  assert message in result.stderr and "usage:" in result.stderr
  assert "+ gcloud" not in result.stdout


@pytest.mark.parametrize("name", ["tpu_v5p64.yaml", "gpu_h100x16.yaml"])
def test_documented_trainer_flags_are_valid_config_overrides(name):
  """The checked-in trainer commands parse into the config and pass its validation."""
  from rrvf_jax import pipeline

  (jobset,) = [o for o in yaml.safe_load_all(gke.documented()[name]) if o["kind"] == "JobSet"]
  pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  command = pod["containers"][0]["command"]
  config_arg = next(a for a in command if a.startswith("--config="))
  overrides = [a for a in command if a.startswith("--config.")]
  argv = ["prog", config_arg, *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "test", flag_values=values, sys_argv=argv)
  values(argv)
  config = values.config
  assert config.judge.name == "openai" and config.mesh.fsdp in (16, 32)
  assert config.model.checkpoint_dir == "/workdir/Qwen2.5-VL-7B-Instruct"
  config.model.checkpoint_dir = ""  # not on this machine; everything else must validate
  pipeline.validate_config(config)
