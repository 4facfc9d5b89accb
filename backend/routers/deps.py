"""FastAPI dependencies: the services the app factory built, as annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from config import Settings
from services.asset_persistence import AssetPersistenceService
from services.character_references import CharacterReferenceService
from services.generation.policy import GenerationPolicy
from services.image_delivery import ImageDelivery


def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings


def get_assets(request: Request) -> AssetPersistenceService:
    """The app's AssetPersistenceService."""
    return request.app.state.assets


def get_character_references(request: Request) -> CharacterReferenceService:
    """The app's CharacterReferenceService."""
    return request.app.state.character_references


def get_generation_policy(request: Request) -> GenerationPolicy:
    """The app's GenerationPolicy."""
    return request.app.state.generation


def get_image_delivery(request: Request) -> ImageDelivery:
    """The app's ImageDelivery."""
    return request.app.state.delivery


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
AssetsDep = Annotated[AssetPersistenceService, Depends(get_assets)]
CharacterReferencesDep = Annotated[CharacterReferenceService, Depends(get_character_references)]
GenerationPolicyDep = Annotated[GenerationPolicy, Depends(get_generation_policy)]
ImageDeliveryDep = Annotated[ImageDelivery, Depends(get_image_delivery)]
