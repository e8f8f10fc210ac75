"""Runnable clients for the live API; `ws_client` is the reference websocket client from the README."""
