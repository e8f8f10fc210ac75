"""Live runtime: a one-port server (page, WebRTC, websocket API) driving avatar engines in real time.

Layout (each stage small and replaceable, data flowing one way):
audio in (WebRTC / websocket) -> `audio.AudioTimeline` on the session clock -> `states.StateTracker`
-> `worker.RenderWorker` batching `engines` render requests off the event loop -> paced frames out
(`webrtc` tracks, `wsapi` JPEG messages) with `metrics.SessionMetrics` on both.
"""
