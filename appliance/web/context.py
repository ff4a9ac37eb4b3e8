"""What a blueprint needs from the app it runs in, without importing the app factory."""

from __future__ import annotations

from flask import Flask, current_app, g, has_request_context

from appliance import config
from appliance.config import Settings

LIVE_KEY = "APPLIANCE_LIVE_SETTINGS"


def live_settings(app: Flask | None = None) -> config.LiveSettings:
    """The app's :class:`config.LiveSettings`, made on first use from the settings ``create_app`` was given.

    Values the caller gave ``create_app`` directly (neither defaults, the file nor the environment made
    them, as in tests) stay as given; everything else follows the site's TOML file as it changes.
    """
    app = app or current_app
    live = app.config.get(LIVE_KEY)
    if live is None:
        live = config.LiveSettings.following(app.config["APPLIANCE_SETTINGS"], app.config.get("APPLIANCE_ENVIRON", {}))
        app.config[LIVE_KEY] = live
    return live


def settings_of(app: Flask | None = None) -> Settings:
    """The settings in force: those ``create_app`` was given, with the site's TOML file read again when it
    changed (checked once per request; a request sees one set of settings from start to end)."""
    if app is None and has_request_context():
        if "appliance_settings" not in g:
            g.appliance_settings = live_settings().current()
        return g.appliance_settings
    return live_settings(app).current()
