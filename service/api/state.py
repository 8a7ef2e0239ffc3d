"""Typed keys of the application state that handlers share."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from service.api.auth import Authenticator
from service.api.budget import UploadBudget
from service.api.ratelimit import WriteLimits
from service.core import repository
from service.core.blobstore import BlobStore
from service.core.imagecache import ImageCache
from service.core.notifications import FinishWaiter
from service.core.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
POOL: web.AppKey[repository.Pool] = web.AppKey("pool", asyncpg.Pool)
BLOBS = web.AppKey("blobs", BlobStore)
WAITER = web.AppKey("waiter", FinishWaiter)
BUDGET = web.AppKey("budget", UploadBudget)
AUTH = web.AppKey("auth", Authenticator)
LIMITS = web.AppKey("limits", WriteLimits)
IMAGES = web.AppKey("images", ImageCache)
