"""DeployService: make a deployment live in every region, promote, roll back, and put idle
previews on standby.

Guarantees: calls on one project run one at a time (key ``deploy:project:{project_id}``,
**(fix)**: the original's shared handlers did not serialize); the scale-down cron runs under
``deploy:global``. Each step of the original is a durable step under its name, so a deploy
killed anywhere resumes where it stopped: one topology row per region, one sentinel per
environment and region, one set of routes, one standby schedule for the previous live
deployment. Other services are subflows under their own keys (routing, deployment).
Side-effect steps: ``find workspace`` (namespace, once), ``get or create depot project``,
``build docker image from git``, ``update deployment build id``/``image``, the status updates,
``insert deployment topologies``, ``ensure sentinel exists in db``, ``upsert network policy``,
``inserting frontline route``, ``swapping project live deployment``; promote and rollback
``updating project live deployment``.
Failure: bad parameters are terminal before anything is written. After that, **every** way a
deploy ends without ``ready`` (terminal error, retries or resumptions exhausted, the instance
wait's timeout, cancellation, a kill the worker gives up resuming) leaves the deployment
``failed`` with the reason in ``deployment_failures``: the kernel's give-up hook. Promote and
rollback refuse (terminal, nothing written) what the original refuses, naming the id.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import get_run_logger
from prefect.context import FlowRunContext
from pydantic import Field, StringConstraints, ValidationInfo, field_validator

from flows.deploy_changes import promote, rollback, scale_down_idle_preview_deployments
from flows.params import Id, Params
from flows.rollout import (
    Rollout,
    assign_routes,
    plan_regions,
    result_rows,
    swap_live,
    wait_for_regions,
    write_desired_rows,
)
from tasks.artifacts import Progress, publish_table
from tasks.build.git_build import GitSpec, build_from_git, get_or_create_depot_project
from tasks.db.deploys import (
    find_deployment,
    find_deployment_project,
    find_environment,
    find_project,
    find_region_config,
    find_workspace,
    mark_deployment_failed,
    set_status_deploying,
    set_status_ready,
    update_deployment_build_id,
    update_deployment_image,
)
from worker.kernel.service import critical_section, parse, service_flow

__all__ = ["deploy", "promote", "rollback", "scale_down_idle_preview_deployments"]

PHASES = ("build", "topology", "instances", "domains", "routes", "live")

Image = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^\S+$")]
Path = Annotated[str, StringConstraints(max_length=512)]


class GitSource(Params):
    installation_id: int = Field(gt=0)
    repository: Annotated[
        str, StringConstraints(max_length=256, pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
    ]
    commit_sha: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{7,40}$")]
    context_path: Path = ""
    dockerfile_path: Path = ""


class DeployParams(Params):
    deployment_id: Id
    docker_image: Image | None = None
    # Validated also when absent, so "neither source" is reported as the 'git' parameter.
    git: GitSource | None = Field(default=None, validate_default=True)

    @field_validator("git")
    @classmethod
    def _one_source(cls, git: GitSource | None, info: ValidationInfo) -> GitSource | None:
        image = info.data.get("docker_image")
        if (image is None) == (git is None) and "docker_image" in info.data:
            raise ValueError("exactly one of 'docker_image' or 'git' must be given")
        return git


def _deploy_gave_up(parameters: dict[str, Any], reason: str) -> None:
    """Whatever ended the deploy without ``ready``: the deployment is ``failed``, with why."""
    params = parse(DeployParams, **parameters)
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None
    if mark_deployment_failed(params.deployment_id, reason, run_id):
        get_run_logger().error("deployment %s failed: %s", params.deployment_id, reason)


def _load(deployment_id: str) -> Rollout:
    # Fresh reads (again after every resume): the rows guard everything this call writes.
    deployment = find_deployment(deployment_id)
    workspace = find_workspace(deployment["workspace_id"])
    project = find_project(deployment["project_id"])
    environment = find_environment(deployment["environment_id"])
    return Rollout(deployment, workspace, project, environment)


async def _image(params: DeployParams, rollout: Rollout) -> str:
    """The image to run: the given one, or the one built from the git source."""
    if params.docker_image is not None:
        return params.docker_image
    assert params.git is not None
    deployment = rollout.deployment
    depot_project = get_or_create_depot_project(
        rollout.project["id"], rollout.project["depot_project_id"]
    )
    built = await build_from_git(
        GitSpec(
            workspace_id=deployment["workspace_id"],
            project_id=deployment["project_id"],
            deployment_id=deployment["id"],
            installation_id=params.git.installation_id,
            repository=params.git.repository,
            commit_sha=params.git.commit_sha,
            context_path=params.git.context_path,
            dockerfile_path=params.git.dockerfile_path,
        ),
        depot_project,
    )
    update_deployment_build_id(deployment["id"], built["build_id"])
    return built["image"]


@service_flow("deploy", on_give_up=_deploy_gave_up, run_name="deploy-{deployment_id}")
async def deploy(
    deployment_id: str, docker_image: str | None = None, git: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Deploy a deployment (an image, or a build of a git commit) to every region."""
    params = parse(DeployParams, deployment_id=deployment_id, docker_image=docker_image, git=git)
    project_id = find_deployment_project(params.deployment_id)
    async with critical_section(f"deploy:project:{project_id}"):
        progress = Progress(f"deploy {params.deployment_id}", PHASES)
        await progress.start()
        rollout = _load(params.deployment_id)
        image = await _image(params, rollout)
        await progress.done("build", image)
        update_deployment_image(params.deployment_id, image)
        set_status_deploying(params.deployment_id)
        plan = plan_regions(find_region_config(rollout.deployment["environment_id"]))
        topologies = write_desired_rows(rollout, plan)
        await progress.done("topology", ", ".join(plan))
        await wait_for_regions(rollout, plan, progress)
        commit = params.git.commit_sha if params.git is not None else None
        domains = await assign_routes(rollout, commit)
        await progress.done("domains", f"{len(domains)} domain(s)")
        await progress.done("routes")
        set_status_ready(params.deployment_id)
        previous = await swap_live(rollout)
        await progress.done("live", "live" if rollout.moves_live else "not live")
        rows = result_rows(plan, topologies, domains)
        await publish_table(
            f"deploy-{params.deployment_id}", rows, f"deployment {params.deployment_id}: ready"
        )
    return {
        "deployment_id": params.deployment_id,
        "status": "ready",
        "image": image,
        "regions": [dict(t) for t in topologies],
        "domains": domains,
        "live": rollout.moves_live,
        "previous_live": previous,
    }
