"""cluster.yaml and cluster-local.yaml pass Ray's own cluster-launcher validation, and say what the README says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _prepared(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / name).read_text())
    prepared = prepare_config(config)  # fills the provider's defaults, as `ray up` does
    validate_config(prepared)  # the launcher's JSON schema and node-type checks
    return prepared


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_launcher_configs_validate_with_token_auth(name):
    config = _prepared(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    # The token made by `ray get-auth-token --generate` reaches every node; the project is installed with one faiss
    # per node: the GPU extra on the GPU workers, the faiss extra on the coordinating head, never both.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    installs = {key: [c for c in config[key] if "pip install" in c and "-e " in c]
                for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")}
    assert installs["setup_commands"] == [], installs
    assert len(installs["worker_setup_commands"]) == 1 and '-e ".[gpu]"' in installs["worker_setup_commands"][0]
    assert len(installs["head_setup_commands"]) == 1 and '-e ".[faiss]"' in installs["head_setup_commands"][0]


def test_cloud_config_has_a_cpu_head_and_autoscaling_gpu_workers():
    config = _prepared("cluster.yaml")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = types["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 2
    assert workers["node_config"]["InstanceType"].startswith("g")  # an AWS GPU instance family


def test_a_broken_config_is_refused():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="many"):
        validate_config(prepare_config(config))
