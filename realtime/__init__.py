"""Live runtime: a one-port server (page, WebRTC, websocket API) driving avatar engines in real time.

Each engine (`engines/`) is a shared renderer from `pipelines/` joined to the runtime's interface; the
benches and examples reach this package only through its command (`livecache serve`) and its wire protocol.

Layout (each stage small and replaceable, data flowing one way):
audio in (WebRTC / websocket) -> `audio.AudioTimeline` on the session clock -> `pipelines.states.StateTracker`
-> `worker.RenderWorker` batching `engines` render requests off the event loop -> paced frames out
(`webrtc` tracks, `wsapi` JPEG messages) with `metrics.SessionMetrics` on both.
"""
