"""What a blueprint needs from the app it runs in, without importing the app factory."""

from __future__ import annotations

from flask import Flask, current_app

from appliance.config import Settings


def settings_of(app: Flask | None = None) -> Settings:
    """The settings ``create_app`` was given (the current app's when ``app`` is None)."""
    return (app or current_app).config["APPLIANCE_SETTINGS"]
