"""A client generated from /openapi.json by openapi-python-client writes, reads and fetches image bytes from
both image routes, in both delivery modes."""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import SecretStr

from service.api import openapi
from service.core.images import CONTENT_TYPES
from service.core.settings import ImageDelivery, Settings
from tests.support import JWT_SECRET, MakeClient, StartWorker, delivering, png, token

PACKAGE = "profiles_client"
# openapi-python-client knows JSON, text and application/octet-stream bodies; its documented
# content_type_overrides makes it read each image type as bytes (without it, image routes lose their 200).
GENERATOR_CONFIG = {
    "content_type_overrides": dict.fromkeys(CONTENT_TYPES.values(), "application/octet-stream"),
    "post_hooks": [],
}


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The client package, generated once per session from the document /openapi.json serves, imported."""
    folder = tmp_path_factory.mktemp("generated-client")
    (folder / "openapi.json").write_text(json.dumps(openapi.document()))
    (folder / "config.yaml").write_text(json.dumps(GENERATOR_CONFIG))  # JSON is YAML
    generator = Path(sys.executable).parent / "openapi-python-client"
    command = [str(generator), "generate", "--path", "openapi.json", "--config", "config.yaml", "--meta", "none"]
    result = subprocess.run([*command, "--output-path", PACKAGE], cwd=folder, capture_output=True, text=True)
    assert result.returncode == 0 and "Warning" not in result.stdout, result.stdout + result.stderr
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def _part(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


@pytest.mark.parametrize("delivery", list(ImageDelivery))
async def test_a_generated_client_writes_reads_and_fetches_the_bytes_of_both_image_routes(
    generated: ModuleType,
    make_client: MakeClient,
    settings: Settings,
    start_worker: StartWorker,
    delivery: ImageDelivery,
) -> None:
    await start_worker()
    api = await make_client(delivering(settings, delivery, auth_jwt_secret=SecretStr(JWT_SECRET)))
    assert await (await api.get("/openapi.json")).json() == openapi.document()
    models, types = _part("models"), _part("types")
    image = types.File(payload=io.BytesIO(png(1, (40, 30))), file_name="ada.png", mime_type="image/png")
    body = models.PutV1ProfilesUserIdBody(metadata=models.Metadata(display_name="Ada"), image=image)
    # Redirects are followed the way a browser follows them: to the blob store, for the bytes.
    client = generated.AuthenticatedClient(
        base_url=str(api.make_url("")), token=token("ada"), follow_redirects=delivery is ImageDelivery.REDIRECT
    )
    async with client:
        put = await _part("api.default.put_v1_profiles_user_id").asyncio_detailed(
            "ada", client=client, body=body, prefer="wait=20"
        )
        assert put.status_code == 200, put.content
        profile = await _part("api.default.get_v1_profiles_user_id").asyncio("ada", client=client)
        assert isinstance(profile, models.ProfileOut)
        assert profile.metadata.display_name == "Ada" and profile.version == put.parsed.version == 1
        assert (profile.image.width, profile.image.height, profile.image.content_type) == (40, 30, "image/png")
        live = await _part("api.default.get_v1_profiles_user_id_image").asyncio("ada", client=client)
        versioned = await _part("api.default.get_v1_profiles_user_id_versions_version_image").asyncio(
            "ada", 1, client=client
        )
    assert isinstance(live, types.File) and isinstance(versioned, types.File)
    assert live.payload.read() == versioned.payload.read() == png(1, (40, 30))
