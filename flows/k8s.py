"""The Kubernetes work pool of GPU workers: its base job template and an offline rendering of it.

The template is prefect-kubernetes' default one plus what a GPU study needs: a limit of
``nvidia.com/gpu`` (variable ``gpus``), the shared store as a PersistentVolumeClaim (``store_claim``)
mounted at ``store_mount`` (the image's MEMOE_RUNS, MEMOE_CACHE and ../shared live there), CPU and
memory requests, and a toleration for GPU-tainted nodes. It is kept in
``docker/k8s-gpu-job-template.json`` (``python -m flows.k8s --write`` regenerates it) and given to
``prefect work-pool create memoe-gpu --type kubernetes --base-job-template docker/k8s-gpu-job-template.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = PROJECT_ROOT / "docker" / "k8s-gpu-job-template.json"
EXTRA_VARIABLES = {
    "gpus": {
        "title": "GPUs",
        "type": "integer",
        "default": 1,
        "minimum": 0,
        "description": "nvidia.com/gpu limit of the flow run's pod",
    },
    "cpu": {"title": "CPU request", "type": "string", "default": "4"},
    "memory": {"title": "Memory request and limit", "type": "string", "default": "32Gi"},
    "store_claim": {
        "title": "Shared store PVC",
        "type": "string",
        "default": "memoe-store",
        "description": "PersistentVolumeClaim (ReadWriteMany) every worker pod mounts: runs/, cache/, shared/",
    },
    "store_mount": {"title": "Shared store mount path", "type": "string", "default": "/mnt/memoe"},
}


def gpu_job_template() -> dict:
    """prefect-kubernetes' default base job template with a GPU limit and the shared store volume."""
    from prefect_kubernetes.worker import KubernetesWorker

    t = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    t["variables"]["properties"].update(copy.deepcopy(EXTRA_VARIABLES))
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["resources"] = {
        "limits": {"nvidia.com/gpu": "{{ gpus }}", "memory": "{{ memory }}"},
        "requests": {"cpu": "{{ cpu }}", "memory": "{{ memory }}"},
    }
    container["volumeMounts"] = [{"name": "memoe-store", "mountPath": "{{ store_mount }}"}]
    pod["volumes"] = [{"name": "memoe-store", "persistentVolumeClaim": {"claimName": "{{ store_claim }}"}}]
    pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return t


def load_template() -> dict:
    return json.loads(TEMPLATE.read_text())


def deployment_job_variables(name: str = "gpu", prefect_yaml: Path = PROJECT_ROOT / "prefect.yaml") -> dict:
    """The job variables of a deployment in prefect.yaml (its ``{{ $VAR }}`` placeholders left as they are)."""
    import yaml

    doc = yaml.safe_load(prefect_yaml.read_text())
    for d in doc["deployments"]:
        if d["name"] == name:
            return dict(d.get("work_pool", {}).get("job_variables") or {})
    raise KeyError(f"{prefect_yaml}: no deployment named {name}")


def render_job(template: dict, job_variables: dict, flow_run=None, deployment=None, flow=None) -> dict:
    """The Kubernetes Job manifest a worker of this pool would submit for a flow run, offline (no
    cluster, no Prefect server): the variables' defaults overlaid with ``job_variables`` are put into
    the template by Prefect's own templating, as ``from_template_and_values`` does (minus its lookup
    of block and variable references, which this template has none of), then prefect-kubernetes'
    job configuration prepares it for ``flow_run`` (env, labels, image, command, name)."""
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    props = template["variables"]["properties"]
    unknown = set(job_variables) - set(props)
    if unknown:
        raise ValueError(f"job variables {sorted(unknown)} are not variables of the template")
    values = {k: v["default"] for k, v in props.items() if "default" in v} | job_variables
    cfg = KubernetesWorkerJobConfiguration(**apply_values(template["job_configuration"], values))
    if flow_run is not None:
        cfg.prepare_for_flow_run(flow_run, deployment, flow)
    return cfg.job_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.k8s", description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"write the template to {TEMPLATE.relative_to(PROJECT_ROOT)}")
    args = p.parse_args(argv)
    text = json.dumps(gpu_job_template(), indent=2) + "\n"
    if args.write:
        TEMPLATE.write_text(text)
        print(f"wrote {TEMPLATE}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
