"""The Cilium network policies of a deployment (reference §2.1 step 9), as pure functions.

Per deployment and region, two ``CiliumNetworkPolicy`` documents let the environment's
sentinels reach the deployment's pods on TCP ``deployments.port``:

- ``sentinel-ingress-to-<k8s name>`` in the workspace's namespace (ingress of the deployment's
  pods from the sentinel namespace);
- ``sentinel-egress-to-<k8s name>`` in the ``sentinel`` namespace (egress of the
  environment's sentinels to those pods).

Both carry the krane labels and a policy-id label. The id is derived from (deployment, region,
name), never random, so the same deployment always yields byte-identical documents: "unchanged
policies are skipped" is a plain comparison, and a step re-run after a crash inserts the row it
already wrote under the same id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

__all__ = ["SENTINEL_NAMESPACE", "NetworkPolicy", "network_policies", "policy_id"]

SENTINEL_NAMESPACE = "sentinel"


@dataclass(frozen=True)
class NetworkPolicy:
    """One policy row to write: its name, namespace, id and document."""

    id: str
    k8s_name: str
    k8s_namespace: str
    document: dict[str, Any]


def policy_id(deployment_id: str, region: str, k8s_name: str) -> str:
    """The stable row id of a policy (``cnp_`` + 20 hex digits of its identity)."""
    digest = hashlib.sha256(f"{deployment_id}\0{region}\0{k8s_name}".encode()).hexdigest()
    return f"cnp_{digest[:20]}"


def _labels(
    *, workspace_id: str, environment_id: str, deployment_id: str, policy: str
) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": "krane",
        "app.kubernetes.io/component": "cilium-network-policy",
        "unkey.com/workspace.id": workspace_id,
        "unkey.com/environment.id": environment_id,
        "unkey.com/deployment.id": deployment_id,
        "unkey.com/policy.id": policy,
    }


def network_policies(
    *,
    workspace_id: str,
    environment_id: str,
    deployment_id: str,
    deployment_k8s_name: str,
    workspace_namespace: str,
    region: str,
    port: int,
) -> list[NetworkPolicy]:
    """The ingress and egress policies of one deployment in one region.

    Args:
        workspace_id: the deployment's workspace.
        environment_id: the deployment's environment (its sentinels are the peers).
        deployment_id: the deployment.
        deployment_k8s_name: the deployment's ``k8s_name`` (part of the policy names).
        workspace_namespace: the workspace's ``k8s_namespace``.
        region: the region the rows are for.
        port: the deployment's TCP port.

    Returns:
        Two policies: ingress (workspace namespace), then egress (sentinel namespace).
    """
    ports = [{"ports": [{"port": str(port), "protocol": "TCP"}]}]
    deployment_pods = {"unkey.com/deployment.id": deployment_id}
    sentinel_pods = {
        "unkey.com/environment.id": environment_id,
        "app.kubernetes.io/component": "sentinel",
    }
    ingress_name = f"sentinel-ingress-to-{deployment_k8s_name}"
    egress_name = f"sentinel-egress-to-{deployment_k8s_name}"
    result = []
    for name, namespace, spec in (
        (
            ingress_name,
            workspace_namespace,
            {
                "endpointSelector": {"matchLabels": deployment_pods},
                "ingress": [
                    {
                        "fromEndpoints": [
                            {
                                "matchLabels": {
                                    "k8s:io.kubernetes.pod.namespace": SENTINEL_NAMESPACE,
                                    **sentinel_pods,
                                }
                            }
                        ],
                        "toPorts": ports,
                    }
                ],
            },
        ),
        (
            egress_name,
            SENTINEL_NAMESPACE,
            {
                "endpointSelector": {"matchLabels": sentinel_pods},
                "egress": [
                    {
                        "toEndpoints": [
                            {
                                "matchLabels": {
                                    "k8s:io.kubernetes.pod.namespace": workspace_namespace,
                                    **deployment_pods,
                                }
                            }
                        ],
                        "toPorts": ports,
                    }
                ],
            },
        ),
    ):
        pid = policy_id(deployment_id, region, name)
        document = {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": _labels(
                    workspace_id=workspace_id,
                    environment_id=environment_id,
                    deployment_id=deployment_id,
                    policy=pid,
                ),
            },
            "spec": spec,
        }
        result.append(NetworkPolicy(pid, name, namespace, document))
    return result
