"""Renderers several front ends share: the ComfyUI nodes, the benches, training and the live engines.

The avatar renderer (`avatar`), the procedural avatar (`procedural`, on the face rig `rig`), the causal
video stream (`video`), the face layout (`portrait`), voice-activity states (`states`) and the stage
runner (`stages`) know no front end: a live engine is one of these renderers plus the runtime's session
interface, so nodes and benches render exactly what the server streams without importing the server.
"""
