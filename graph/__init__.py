"""Headless runner for saved workflows (ComfyUI UI and API format) built from our node classes."""
