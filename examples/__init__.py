"""Small runnable programs for the live API; `ws_client` is the reference websocket client (docs/realtime-protocol.md).

Each runs on its own (`python examples/ws_client.py`, or `python -m livecache.examples.ws_client`) and
imports nothing else from the package, so it can be copied out as a starting point.
"""
