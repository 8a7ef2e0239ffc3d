"""Variants: configured by name and box, made by the worker from each version's own bytes with no
metadata, published with their version, served like originals, refused when unknown."""

from __future__ import annotations

import io
import uuid

import pytest
from PIL import Image, ImageCms, ImageOps
from pydantic import SecretStr, ValidationError

from service.core.blobstore import BlobStore
from service.core.repository import Pool
from service.core.settings import Settings
from service.core.variants import VariantFailed, VariantFormat, VariantSpec, render_variants
from tests.support import (
    ADMIN_SCOPE,
    JWT_SECRET,
    Client,
    MakeClient,
    StartWorker,
    accepted,
    assert_problem,
    bearer,
    close_to,
    colour_of,
    finished_intent,
    publish_due,
    put_profile,
    solid,
    version_keys,
    wait_live,
)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("Thumb:64", "lowercase identifier"),
        ("thumb:0", "size from 1 to 4096"),
        ("thumb:4097", "size from 1 to 4096"),
        ("thumb", "size from 1 to 4096"),
        ("thumb:64,thumb:128", "named twice"),
    ],
)
def test_a_variant_setting_that_breaks_a_rule_is_refused_saying_which(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.model_validate({"database_url": "postgresql://x", "variants": value})


def test_variants_default_to_three_webp_boxes_and_an_empty_setting_means_none() -> None:
    default = Settings(database_url="postgresql://x")
    assert [str(spec) for spec in default.variants] == ["thumb:64", "small:256", "medium:512"]
    assert default.variant_format is VariantFormat.WEBP
    assert default.environment()["PROFILES_VARIANTS"] == "thumb:64,small:256,medium:512"
    assert Settings.model_validate({"database_url": "postgresql://x", "variants": ""}).variants == ()


async def test_each_version_gets_every_variant_made_from_its_own_image(
    client: Client, settings: Settings, start_worker: StartWorker
) -> None:
    await start_worker()
    colours = {
        ("ana", 1): (200, 30, 30),
        ("ana", 2): (30, 200, 30),
        ("ben", 1): (30, 30, 200),
        ("ben", 2): (220, 220, 0),
    }
    for version in (1, 2):  # each version goes live (a version superseded before that has no reads)
        for user in ("ana", "ben"):
            await accepted(client, user, {"display_name": user}, solid(colours[(user, version)]))
        for user in ("ana", "ben"):
            await wait_live(client, user, version)
    for (user, version), colour in colours.items():
        for spec in settings.variants:
            response = await client.get(f"/v1/profiles/{user}/versions/{version}/image?variant={spec.name}")
            assert response.status == 200 and response.content_type == "image/webp"
            assert close_to(colour_of(await response.read()), colour), (user, version, spec)
    body = await (await client.get("/v1/profiles/ana")).json()
    assert set(body["variants"]) == {"thumb", "small", "medium"}
    # 300x200 fit inside each box, aspect kept; the medium box is larger than the image: never enlarged.
    sizes = {name: (v["width"], v["height"]) for name, v in body["variants"].items()}
    assert sizes == {"thumb": (64, 43), "small": (256, 171), "medium": (300, 200)}
    small = await client.get(body["variants"]["small"]["url"])
    data = await small.read()
    assert body["variants"]["small"]["size"] == len(data)
    assert close_to(colour_of(data), colours[("ana", 2)])


async def test_a_variant_is_served_with_the_etag_cache_and_head_rules_of_originals(
    client: Client, start_worker: StartWorker
) -> None:
    await start_worker()
    await accepted(client, "cat", {"display_name": "Cat"}, solid((10, 120, 240)))
    await wait_live(client, "cat", 1)
    thumb = (await (await client.get("/v1/profiles/cat")).json())["variants"]["thumb"]
    live = await client.get("/v1/profiles/cat/image?variant=thumb")
    assert live.headers["ETag"] == f'"{thumb["sha256"]}"' and live.headers["Cache-Control"] == "no-cache"
    again = await client.get("/v1/profiles/cat/image?variant=thumb", headers={"If-None-Match": live.headers["ETag"]})
    assert again.status == 304
    head = await client.head("/v1/profiles/cat/image?variant=thumb")
    assert head.status == 200 and int(head.headers["Content-Length"]) == thumb["size"]
    versioned = await client.get(thumb["url"])
    assert versioned.headers["Cache-Control"] == "public, max-age=60, immutable"
    assert versioned.headers["ETag"] == live.headers["ETag"]
    head = await client.head(thumb["url"])
    assert head.status == 200 and head.headers["Content-Type"] == "image/webp"


async def test_an_unknown_variant_is_400_listing_the_names_one_not_made_yet_is_404_and_a_removed_one_is_gone(
    make_client: MakeClient, client: Client, settings: Settings, start_worker: StartWorker
) -> None:
    await start_worker()
    await accepted(client, "dan", {"display_name": "Dan"}, solid((1, 2, 3)))
    await wait_live(client, "dan", 1)
    body = await assert_problem(await client.get("/v1/profiles/dan/image?variant=huge"), 400)
    assert "thumb, small, medium" in body["detail"] and body["errors"][0]["field"] == "variant"
    await assert_problem(await client.get("/v1/profiles/dan/versions/1/image?variant=huge"), 400)
    # An API configured with a variant this version was published without: never another image.
    wider = await make_client(
        settings.model_copy(update={"variants": (*settings.variants, VariantSpec("large", 1024))})
    )
    missing = await assert_problem(await wider.get("/v1/profiles/dan/image?variant=large"), 404)
    assert missing["title"] == "Variant not yet made"
    assert (await wider.head("/v1/profiles/dan/versions/1/image?variant=large")).status == 404
    # One removed from the configuration is no longer listed, nor served.
    narrower = await make_client(settings.model_copy(update={"variants": settings.variants[:2]}))
    assert set((await (await narrower.get("/v1/profiles/dan")).json())["variants"]) == {"thumb", "small"}
    await assert_problem(await narrower.get("/v1/profiles/dan/image?variant=medium"), 400)


def exif_photo() -> bytes:
    """A 60x30 JPEG, red on the left and blue on the right, stored sideways (EXIF orientation 6),
    with GPS position, a camera serial, an ICC profile, XMP and a comment."""
    image = Image.new("RGB", (60, 30), (220, 0, 0))
    image.paste((0, 0, 220), (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    exif[0xA431] = "SERIAL-12345"  # BodySerialNumber
    exif.get_ifd(0x8825).update({1: "N", 2: (51.0, 28.0, 38.0), 3: "W", 4: (0.0, 0.0, 5.0)})  # GPS
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif, icc_profile=srgb, xmp=xmp, comment=b"taken at home", quality=95)
    return out.getvalue()


def test_a_variant_is_upright_and_carries_no_metadata_at_all() -> None:
    photo = exif_photo()
    with Image.open(io.BytesIO(photo)) as original:
        assert original.getexif().get_ifd(0x8825), "the test photo must carry GPS"
        upright = ImageOps.exif_transpose(original).convert("RGB")
    for fmt in VariantFormat:
        (made,) = render_variants(photo, [(VariantSpec("small", 256), fmt)])
        with Image.open(io.BytesIO(made.data)) as variant:
            assert (variant.width, variant.height) == (30, 60) == (made.width, made.height)
            assert not variant.getexif() and not set(variant.info) & {"exif", "icc_profile", "xmp", "comment"}
            for point in ((15, 5), (15, 55)):
                assert close_to(variant.convert("RGB").getpixel(point), upright.getpixel(point))  # type: ignore[arg-type]
        assert b"SERIAL-12345" not in made.data and b"xmpmeta" not in made.data


async def test_exif_with_gps_goes_in_and_none_comes_out_while_the_original_stays_byte_for_byte(
    client: Client, start_worker: StartWorker
) -> None:
    await start_worker()
    photo = exif_photo()
    await accepted(client, "eve", {"display_name": "Eve"}, photo)
    await wait_live(client, "eve", 1)
    assert await (await client.get("/v1/profiles/eve/image")).read() == photo
    thumb = await (await client.get("/v1/profiles/eve/image?variant=thumb")).read()
    with Image.open(io.BytesIO(thumb)) as variant:
        assert not variant.getexif() and variant.size == (30, 60)


def cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(out, "JPEG")  # red, in ink
    return out.getvalue()


def grey16_png() -> bytes:
    out = io.BytesIO()
    Image.new("I;16", (80, 80), 0x8000).save(out, "PNG")
    return out.getvalue()


def many_frames_gif(frames: int = 3000) -> bytes:
    images = [Image.new("P", (16, 16), n % 200) for n in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=10)
    return out.getvalue()


def transparent_palette_png() -> bytes:
    image = Image.new("P", (80, 80), 1)
    image.putpalette([0, 0, 0, 40, 160, 40] + [0] * 762)
    out = io.BytesIO()
    image.save(out, "PNG", transparency=0)
    return out.getvalue()


@pytest.mark.parametrize(
    ("make", "colour"),
    [
        (cmyk_jpeg, (255, 0, 0)),
        (grey16_png, (128, 128, 128)),
        (many_frames_gif, None),
        (transparent_palette_png, (40, 160, 40)),
    ],
)
def test_awkward_images_become_srgb_variants_of_their_first_frame(make: object, colour: tuple[int, ...] | None) -> None:
    assert callable(make)
    for fmt in VariantFormat:
        (made,) = render_variants(make(), [(VariantSpec("thumb", 64), fmt)])
        with Image.open(io.BytesIO(made.data)) as variant:
            assert variant.mode in ("RGB", "RGBA") and getattr(variant, "n_frames", 1) == 1
        if colour is not None:
            assert close_to(colour_of(made.data), colour), (make, fmt)


async def test_thousands_of_frames_publish_only_the_first_frames_variants(client: Client, settings: Settings) -> None:
    body = await accepted(client, "gus", {"display_name": "Gus"}, many_frames_gif())
    assert await publish_due(settings) == 1
    assert (await finished_intent(settings.database_url, body["intent_id"]))["state"] == "done"
    assert (await client.get("/v1/profiles/gus/image?variant=medium")).status == 200


def test_bytes_pillow_cannot_turn_into_variants_raise_a_final_failure_with_the_reason() -> None:
    with pytest.raises(VariantFailed, match="cannot be made into variants"):
        render_variants(solid((1, 1, 1))[:60], [(VariantSpec("thumb", 64), VariantFormat.WEBP)])


async def test_an_image_that_cannot_be_made_into_variants_kills_its_intent_at_once_with_the_reason(
    client: Client, settings: Settings, pool: Pool, blobs: BlobStore
) -> None:
    body = await accepted(client, "hal", {"display_name": "Hal"}, solid((5, 5, 5)))
    keys = await version_keys(settings.database_url, "hal", 1)
    # Staged bytes that no longer decode (the API checked them; here they are spoilt on purpose).
    spoilt = "UPDATE staged_images SET data = substring(data for 60) WHERE intent_id = $1"
    await pool.execute(spoilt, uuid.UUID(body["intent_id"]))
    assert await publish_due(settings) == 1
    dead = await finished_intent(settings.database_url, body["intent_id"])
    assert (dead["state"], dead["attempts"]) == ("dead", 1), "no retry can make it work"
    assert "cannot be made into variants" in dead["last_error"]
    # Its keys are retired like any dead version's; nothing was uploaded.
    assert {row["blob_key"] for row in await pool.fetch("SELECT blob_key FROM blob_deletions")} == keys
    assert not await blobs.list_keys(settings.s3_key_prefix)


async def test_with_public_originals_off_only_the_variants_are_served_to_anyone_but_an_admin(
    make_client: MakeClient, settings: Settings
) -> None:
    private = settings.model_copy(update={"auth_jwt_secret": SecretStr(JWT_SECRET), "public_originals": False})
    client = await make_client(private)
    photo = exif_photo()
    response = await put_profile(client, "ivy", {"display_name": "Ivy"}, photo, bearer("ivy"))
    assert response.status == 202
    assert await publish_due(private) == 1
    assert (await client.get("/v1/profiles/ivy")).status == 200
    for route in ("/v1/profiles/ivy/image", "/v1/profiles/ivy/versions/1/image", "/v1/profiles/ivy?embed=image"):
        refused = await assert_problem(await client.get(route, headers=bearer("ivy")), 403)
        assert refused["title"] == "Original not public"
    assert (await client.get("/v1/profiles/ivy/image?variant=small")).status == 200
    admin = await client.get("/v1/profiles/ivy/image", headers=bearer("ops", scope=ADMIN_SCOPE))
    assert admin.status == 200 and await admin.read() == photo
