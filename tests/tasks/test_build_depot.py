"""The Depot project of a project (tasks/build/depot.py) against a stand-in Depot API.

These protect reference §13 item 15 and SPEC §3: the Depot project is created on first use
(named ``unkey-<project>``, cache 50 GB / 14 days, the Depot token as bearer), found again by
name after a crash between create and store (no second project), stored by compare-and-set,
refusals terminal and transient failures retryable, and no message carries the token.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from werkzeug import Response

from tasks.build import ensure_depot_project, store_depot_project_id
from tasks.db.engine import engine_for
from tasks.db.schema import init_schema, projects
from tests.support.seed import SeedIds, insert_project, insert_workspace
from worker.kernel.errors import ConfigError, NotFoundError, RefusedError, RetryableError
from worker.settings import Settings, use_settings

DEPOT_TOKEN = "depot-secret-token-0123456789"
LIST = "/depot.core.v1.ProjectService/ListProjects"
CREATE = "/depot.core.v1.ProjectService/CreateProject"


def configure_depot(httpserver) -> None:
    use_settings(
        Settings(
            _env_file=None,
            depot_api_url=httpserver.url_for("").rstrip("/"),
            depot_project_region="eu-central-1",
            registry_password=DEPOT_TOKEN,
        )
    )


BEARER = {"Authorization": f"Bearer {DEPOT_TOKEN}"}


def test_depot_project_is_created_on_first_use(httpserver) -> None:
    """Without a stored Depot project one is created, named ``unkey-<project>``, in the
    configured region with the 50 GB / 14 day cache policy, authorized by the Depot token."""
    configure_depot(httpserver)
    httpserver.expect_request(LIST, method="POST", headers=BEARER).respond_with_json(
        {"projects": [{"projectId": "other", "name": "unkey-proj_other"}]}
    )
    expected = {
        "name": "unkey-proj_1",
        "regionId": "eu-central-1",
        "cachePolicy": {"keepGb": 50, "keepDays": 14},
    }
    httpserver.expect_request(
        CREATE, method="POST", headers=BEARER, json=expected
    ).respond_with_json({"project": {"projectId": "dp_new", "name": "unkey-proj_1"}})

    assert ensure_depot_project("proj_1", None) == "dp_new"
    assert [request.path for request, _ in httpserver.log] == [LIST, CREATE]
    httpserver.check_assertions()


def test_depot_project_accepts_flat_project_id_response(httpserver) -> None:
    """A CreateProject response with ``projectId`` at the top level is understood too."""
    configure_depot(httpserver)
    httpserver.expect_request(LIST, method="POST").respond_with_json({})
    httpserver.expect_request(CREATE, method="POST").respond_with_json({"projectId": "dp_flat"})
    assert ensure_depot_project("proj_1", "") == "dp_flat"


def test_depot_project_of_same_name_is_reused_not_created_again(httpserver) -> None:
    """A re-run after a crash between create and store finds the project by name (on a
    later page) and creates no second one."""
    configure_depot(httpserver)
    httpserver.expect_request(LIST, method="POST", json={}).respond_with_json(
        {"projects": [{"projectId": "a", "name": "unkey-proj_a"}], "nextPageToken": "t2"}
    )
    httpserver.expect_request(LIST, method="POST", json={"pageToken": "t2"}).respond_with_json(
        {"projects": [{"projectId": "dp_old", "name": "unkey-proj_1"}]}
    )

    assert ensure_depot_project("proj_1", None) == "dp_old"
    assert [request.path for request, _ in httpserver.log] == [LIST, LIST]


def test_depot_project_created_concurrently_is_found_after_conflict(httpserver) -> None:
    """CreateProject answering already_exists (409) means another create won: it is listed
    again and reused."""
    configure_depot(httpserver)
    pages = iter([{"projects": []}, {"projects": [{"projectId": "dp_won", "name": "unkey-p"}]}])
    httpserver.expect_request(LIST, method="POST").respond_with_handler(
        lambda _request: Response(json.dumps(next(pages)), content_type="application/json")
    )
    httpserver.expect_request(CREATE, method="POST").respond_with_json(
        {"code": "already_exists", "message": "project exists"}, status=409
    )
    assert ensure_depot_project("p", None) == "dp_won"


def test_stored_depot_project_is_used_without_calling_depot() -> None:
    """A project that has a Depot project keeps it: no API call, not even configuration."""
    use_settings(Settings(_env_file=None))
    assert ensure_depot_project("proj_1", "dp_stored") == "dp_stored"


def test_depot_refusal_is_terminal_without_the_token(httpserver) -> None:
    """A 4xx from Depot (here 401) is terminal; the message has the Connect code but not
    Depot's message or the token."""
    configure_depot(httpserver)
    httpserver.expect_request(LIST, method="POST").respond_with_json(
        {"code": "unauthenticated", "message": f"bad token {DEPOT_TOKEN}"}, status=401
    )
    with pytest.raises(RefusedError, match=r"HTTP 401 \(unauthenticated\)") as caught:
        ensure_depot_project("proj_1", None)
    assert DEPOT_TOKEN not in str(caught.value)


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_depot_transient_failure_is_retryable(httpserver, status) -> None:
    """408, 429 and 5xx from Depot are retryable."""
    configure_depot(httpserver)
    httpserver.expect_request(LIST, method="POST").respond_with_data("busy", status=status)
    with pytest.raises(RetryableError, match=f"HTTP {status}"):
        ensure_depot_project("proj_1", None)


def test_depot_not_configured_is_a_config_error_naming_the_variables() -> None:
    """Creating a Depot project needs UNKEY_DEPOT_API_URL and UNKEY_REGISTRY_PASSWORD."""
    use_settings(Settings(_env_file=None, registry_password=DEPOT_TOKEN))
    with pytest.raises(ConfigError, match="UNKEY_DEPOT_API_URL"):
        ensure_depot_project("proj_1", None)
    use_settings(Settings(_env_file=None, depot_api_url="http://127.0.0.1:1"))
    with pytest.raises(ConfigError, match="UNKEY_REGISTRY_PASSWORD"):
        ensure_depot_project("proj_1", None)


@pytest.fixture
def project_db(sqlite_url: str):
    """A fresh SQLite control plane with one project, installed as the worker's DB."""
    init_schema(sqlite_url)
    use_settings(Settings(_env_file=None, database_primary=sqlite_url))
    ids = SeedIds()
    project_id = insert_project(sqlite_url, ids, insert_workspace(sqlite_url, ids))
    return sqlite_url, project_id


def stored_depot_project(url: str, project_id: str) -> str | None:
    with engine_for(url).connect() as connection:
        return connection.execute(
            sa.select(projects.c.depot_project_id).where(projects.c.id == project_id)
        ).scalar_one()


def test_depot_project_id_is_stored_once_and_never_overwritten(project_db) -> None:
    """The Depot project is stored only while the column is empty (NULL or ''); a second
    store returns the first id and leaves it in place."""
    url, project_id = project_db
    assert store_depot_project_id(project_id, "dp_first") == "dp_first"
    assert store_depot_project_id(project_id, "dp_second") == "dp_first"
    assert stored_depot_project(url, project_id) == "dp_first"

    with engine_for(url).begin() as connection:
        connection.execute(
            sa.update(projects).where(projects.c.id == project_id).values(depot_project_id="")
        )
    assert store_depot_project_id(project_id, "dp_third") == "dp_third"


def test_depot_project_id_of_missing_project_is_not_found(project_db) -> None:
    """Storing on a project that does not exist is a terminal not-found."""
    with pytest.raises(NotFoundError, match="proj_missing"):
        store_depot_project_id("proj_missing", "dp_1")
