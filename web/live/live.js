// Live page: WebRTC to `livecache serve`. An avatar engine hears the microphone and answers with video and voice
// (interactive: it speaks what you type and listens while you talk; mirror: it says back what it hears); the video
// engine gets a prompt and answers with video only. What the page shows follows /api/info: the engine's
// capabilities (elements marked data-needs appear only when the engine has what they name) and the session
// defaults the server chose for its device (the preselected resolution).
// Signaling is one POST (/api/offer) after ICE gathering, so no trickle-ICE channel is needed; controls are the
// HTTP session endpoints (state, interrupt, say, condition); metrics come from the server (/api/sessions/<id>)
// and from the browser's own WebRTC stats.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("stream");
const POLL_MS = 500;
const SLOW_FPS = 0.85; // a steady FPS below this fraction of the target shows the warning
const CALM_POLLS = 6; // healthy polls in a row before the warning goes away (3 s)

// Everything a test or a curious user may want to read back lives on window.live.
const live = {
  pc: null,
  session: null,
  server: null, // /api/info
  engine: null, // its capabilities: {takes, states, mouth, audio, conditions}
  info: null, // the session's answer (size, fps, mode, mouth_box or condition, ...)
  phase: "offline", // offline | connecting | live | failed | ended
  portrait: "default",
  mic: null, // the microphone's MediaStream while a session has one
  micLevel: 0, // 0..1, what the meter shows (0 while muted)
  muted: false,
  warning: null, // the text of the frame-rate warning while it shows
  stats: {},
  framesShown: 0,
  firstFrameMs: null,
  startedAt: 0,
  mouthLog: null, // an array while recording: the mouth opening of every frame shown (see recordMouth)
  /** How open the mouth is in the shown frame: the fraction of dark (luma < 70) pixels in the mouth box,
   *  the same measure as bench/loopback.py uses (null before the first frame, and for engines without a mouth). */
  sampleMouth() {
    if (!live.info || !live.info.mouth_box || video.videoWidth === 0) return null;
    const [x, y, w, h] = live.info.mouth_box;
    const k = video.videoWidth / live.info.size;
    const canvas = live._canvas || (live._canvas = document.createElement("canvas"));
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(video, 0, 0);
    const px = ctx.getImageData(Math.round(x * k), Math.round(y * k), Math.round(w * k), Math.round(h * k)).data;
    let dark = 0;
    for (let i = 0; i < px.length; i += 4) dark += 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2] < 70;
    return dark / (px.length / 4);
  },
  /** Start (true) or stop keeping the mouth opening of every shown frame in `mouthLog` (engines with a mouth). */
  recordMouth(on) {
    live.mouthLog = on ? [] : live.mouthLog;
    live._recording = on && Boolean(live.engine && live.engine.mouth);
  },
};
window.live = live;

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

const PHASE_TEXT = { offline: "not connected", connecting: "connecting…", live: "live", failed: "connection failed",
  ended: "session ended" };

function setPhase(phase) {
  live.phase = phase;
  $("conn").dataset.phase = phase;
  $("conn").textContent = PHASE_TEXT[phase];
}

/** Whether the engine has what a data-needs attribute names: what it takes (portrait, prompt) or a capability. */
function needs(name) {
  if (name === "portrait" || name === "prompt") return live.engine.takes === name;
  return Boolean(live.engine[name]);
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function showMetrics(values) {
  for (const dd of document.querySelectorAll("#metrics dd")) {
    const v = values[dd.dataset.key];
    if (v === undefined || v === null) continue;
    const text = typeof v === "number" && !Number.isInteger(v) ? v.toFixed(1) : String(v);
    dd.textContent = dd.dataset.key.endsWith("_ms") ? `${text} ms` : text;
  }
  if (live.engine.states && values.state) {
    $("state-badge").textContent = values.forced ? `${values.state} (pinned)` : values.state;
    $("state-badge").dataset.state = values.state;
  }
}

function countFrames() {
  if (!live.pc) return;
  live.framesShown += 1;
  if (live.firstFrameMs === null) {
    live.firstFrameMs = performance.now() - live.startedAt;
    setPhase("live");
    say(`first frame after ${live.firstFrameMs.toFixed(0)} ms`);
  }
  if (live._recording) live.mouthLog.push(live.sampleMouth());
  video.requestVideoFrameCallback(countFrames);
}

function waitForIce(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", check);
  });
}

/** The offer's session fields: the portrait and how it hears for an avatar, the prompt for a prompt engine. */
function sessionFields() {
  const size = { size: Number($("size").value) };
  if (live.engine.takes === "prompt") return { prompt: $("prompt").value.trim() || "shapes", ...size };
  const fields = { portrait: live.portrait, ...size };
  if (live.engine.audio) {
    fields.mode = mode();
    if (fields.mode === "interactive") fields.auto_interrupt = $("auto-interrupt").checked;
  }
  return fields;
}

/** The microphone (the chosen device), or null when the browser has none or the user refused it. */
async function openMic() {
  const device = $("mic").value;
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: device ? { deviceId: { exact: device } } : true });
  } catch (err) {
    say(`no microphone (${err.message}): the avatar cannot hear you`, true);
    return null;
  }
}

/** Fill the microphone choice; device names are only readable once the user allowed one. */
async function listMics() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const chosen = $("mic").value;
  const mics = devices.filter((d) => d.kind === "audioinput" && d.deviceId);
  if (mics.length === 0) return;
  $("mic").replaceChildren(...mics.map((d, i) => new Option(d.label || `microphone ${i + 1}`, d.deviceId)));
  if (mics.some((d) => d.deviceId === chosen)) $("mic").value = chosen;
}

/** The level meter: RMS of the microphone over each animation frame, on a log scale (-60..0 dBFS). */
function meter(stream) {
  const ctx = (live._audio = live._audio || new AudioContext());
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  ctx.createMediaStreamSource(stream).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  const draw = () => {
    if (live.mic !== stream) {
      $("mic-level").style.width = "0";
      live.micLevel = 0;
      return;
    }
    analyser.getFloatTimeDomainData(buf);
    const rms = Math.sqrt(buf.reduce((s, v) => s + v * v, 0) / buf.length);
    live.micLevel = live.muted ? 0 : Math.max(0, Math.min(1, (20 * Math.log10(rms + 1e-9) + 60) / 60));
    $("mic-level").style.width = `${(100 * live.micLevel).toFixed(0)}%`;
    requestAnimationFrame(draw);
  };
  ctx.resume().then(draw);
}

function setControls(running) {
  $("start").disabled = running;
  $("stop").disabled = !running;
  for (const el of document.querySelectorAll("#setup select, #setup input, #portrait-box input, #portrait-box button")) {
    el.disabled = running;
  }
  $("mic").disabled = running;
  $("interrupt").disabled = !running;
  $("mute").disabled = !(running && live.mic);
  $("say-send").disabled = !(running && live.info && live.info.mode === "interactive");
}

async function start() {
  say(""); // a new session starts with no error of the last one on screen
  showWarning(null);
  setControls(true);
  setPhase("connecting");
  try {
    const mic = live.engine.audio ? await openMic() : null; // an avatar hears the user (or what it mirrors)
    if (mic) await listMics();
    live.mic = mic;
    live.muted = false;
    $("mute").setAttribute("aria-pressed", "false");
    live.startedAt = performance.now();
    live.framesShown = 0;
    live.firstFrameMs = null;
    live.stats = {};
    const pc = (live.pc = new RTCPeerConnection());
    if (mic) {
      mic.getTracks().forEach((t) => pc.addTrack(t, mic));
      meter(mic);
    } else if (live.engine.audio) pc.addTransceiver("audio", { direction: "recvonly" });
    pc.addTransceiver("video", { direction: "recvonly" });
    const remote = new MediaStream();
    pc.ontrack = (e) => {
      remote.addTrack(e.track);
      video.srcObject = remote;
    };
    pc.onconnectionstatechange = () => {
      if (pc !== live.pc) return;
      if (pc.connectionState === "failed") {
        setPhase("failed");
        say("the connection failed: check the network (UDP) between you and the server, then Start again", true);
      } else if (pc.connectionState === "disconnected") setPhase("connecting");
      else if (pc.connectionState === "connected" && live.firstFrameMs !== null) setPhase("live");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    const res = await fetch("/api/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", ...sessionFields() }),
    });
    const answer = await res.json();
    if (!res.ok) throw new Error(answer.error || res.statusText);
    live.session = answer.session;
    live.info = answer;
    if (answer.condition) say(`drawing: ${answer.condition.name}`);
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    video.requestVideoFrameCallback(countFrames);
    setControls(true);
    poll();
  } catch (err) {
    await stop();
    setPhase("failed");
    say(`could not start: ${err.message}`, true);
  }
}

async function stop() {
  const { pc, session, mic } = live;
  live.pc = null;
  live.session = null;
  live.mic = null;
  if (session) await fetch(`/api/sessions/${session}/stop`, { method: "POST" }).catch(() => {});
  if (pc) pc.close();
  if (mic) mic.getTracks().forEach((t) => t.stop());
  video.srcObject = null;
  showWarning(null);
  setControls(false);
  setPhase(session ? "ended" : "offline");
}

async function clientFps(pc) {
  const report = await pc.getStats();
  for (const s of report.values()) {
    if (s.type === "inbound-rtp" && s.kind === "video") return s.framesPerSecond ?? null;
  }
  return null;
}

function showWarning(text) {
  live.warning = text;
  $("warning").hidden = text === null;
  $("warning").textContent = text || "";
}

/** The frame-rate warning: frames dropped since the last poll, or a steady FPS well below the target, once the
 *  stream has run a second; it stays until CALM_POLLS healthy polls in a row. */
function checkHealth(stats, previous) {
  const target = live.info.fps;
  if (!stats.frames || stats.frames < target) return;
  const dropped = stats.dropped_frames - (previous.dropped_frames ?? stats.dropped_frames);
  const slow = stats.steady_fps > 0 && stats.steady_fps < SLOW_FPS * target;
  if (dropped > 0 || slow) {
    live._calm = 0;
    const smaller = live.server.session_defaults.sizes.filter((s) => s < live.info.size);
    const advice = smaller.length ? ` Try ${smaller[smaller.length - 1]} px.` : "";
    showWarning(`The server is falling behind: ${stats.steady_fps.toFixed(1)} of ${target} fps, ` +
      `${stats.dropped_frames} frames dropped.${advice}`);
  } else if (live.warning !== null && ++live._calm >= CALM_POLLS) showWarning(null);
}

async function poll() {
  const { pc, session } = live;
  while (live.pc === pc && live.session === session) {
    try {
      const res = await fetch(`/api/sessions/${session}`);
      if (res.ok && live.session === session) {
        const previous = live.stats;
        live.stats = await res.json();
        live.stats.client_fps = await clientFps(pc);
        showMetrics(live.stats);
        checkHealth(live.stats, previous);
      } else if (res.status === 404 && live.session === session) {
        await stop();
        say("the server ended the session", true);
      }
    } catch (err) {
      say(`metrics unavailable: ${err.message}`, true);
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

/** POST a control to the session; the reply's body, or null after showing its error. */
async function control(path, body) {
  if (!live.session) return null;
  const res = await fetch(`/api/sessions/${live.session}/${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const reply = await res.json();
  if (res.ok) return reply;
  say(reply.error, true);
  return null;
}

async function setState(state) {
  for (const b of document.querySelectorAll(".states button")) b.classList.toggle("active", b.dataset.state === state);
  const stats = await control("state", { state });
  if (stats) showMetrics(stats);
}

async function interrupt() {
  const event = await control("interrupt", {});
  if (event) say(event.dropped_ms > 0 ? `interrupted: ${(event.dropped_ms / 1000).toFixed(1)} s of speech dropped`
    : "interrupted (the avatar was not speaking)");
}

async function sayText(event) {
  event.preventDefault();
  const text = $("say-text").value.trim();
  if (!text) return say("type something for the avatar to say", true);
  $("say-send").disabled = true;
  try {
    const spoken = await control("say", { text });
    if (spoken) {
      say(`speaking for ${(spoken.duration_ms / 1000).toFixed(1)} s`);
      $("say-text").value = "";
    }
  } finally {
    $("say-send").disabled = !live.session;
  }
}

function toggleMute() {
  if (!live.mic) return;
  live.muted = !live.muted;
  live.mic.getAudioTracks().forEach((t) => (t.enabled = !live.muted));
  $("mute").setAttribute("aria-pressed", String(live.muted));
  $("mute").textContent = live.muted ? "Unmute mic" : "Mute mic";
}

async function upload(file) {
  say("checking the portrait…");
  const res = await fetch("/api/portraits", { method: "POST", body: file });
  const body = await res.json();
  if (!res.ok) {
    say(body.error, true);
    return;
  }
  live.portrait = body.portrait;
  $("portrait-preview").src = URL.createObjectURL(file);
  say("portrait ready: press Start (or Stop and Start) to use it");
}

/** A prompt engine's condition, changed mid-stream (before Start, the prompt is the session's first one). */
async function setCondition(event) {
  event.preventDefault();
  if (!live.session) return say("the stream starts with this prompt: press Start");
  const body = await control("condition", { prompt: $("prompt").value });
  if (body) say(`now drawing: ${body.name}`);
}

function describeMode() {
  const interactive = mode() === "interactive";
  $("auto-interrupt").closest("label").hidden = !interactive;
  $("intro").textContent = interactive
    ? "Type below and the avatar says it; talk and it listens (and stops when you talk over it)."
    : "Speak into your microphone: the avatar says it back with moving lips. Use headphones to avoid echo.";
  $("say-box").hidden = !interactive;
}

/** Show what the engine takes and gives, and nothing it lacks. */
function describeEngine(server) {
  const engine = (live.engine = server.capabilities);
  live.server = server;
  const avatar = engine.takes === "portrait";
  $("title").textContent = avatar ? "LiveCache live avatar" : "LiveCache live video";
  $("engine-badge").textContent = `${server.engine} engine`;
  $("engine-badge").hidden = false;
  for (const el of document.querySelectorAll("[data-needs]")) el.hidden = !needs(el.dataset.needs);
  const defaults = server.session_defaults;
  $("size").replaceChildren(...defaults.sizes.map((s) => new Option(`${s} × ${s}`, String(s))));
  $("size").value = String(defaults.size);
  $("size-note").textContent = defaults.size < Math.max(...defaults.sizes)
    ? `${defaults.size} px is this server's default for the ${server.engine} engine on its device: larger ` +
      `sizes cost more per frame and may fall below ${defaults.fps} fps.`
    : `The ${server.engine} engine streams at ${defaults.fps} fps.`;
  if (avatar) {
    video.poster = "/api/portraits/default.png";
    $("portrait-preview").src = "/api/portraits/default.png";
  }
  if (engine.audio) describeMode();
  else {
    $("intro").textContent = `Type what to draw (for example ${engine.conditions.slice(-3).join(", ")}), press ` +
      "Start, and change it while it streams.";
  }
  $("conditions").replaceChildren(...engine.conditions.map((name) => new Option("", name)));
  setControls(false);
}

fetch("/api/info")
  .then((res) => (res.ok ? res.json() : Promise.reject(new Error(res.statusText))))
  .then(describeEngine)
  .catch((err) => {
    setPhase("failed");
    say(`cannot reach the server: ${err.message}`, true);
  });

$("prompt-box").onsubmit = setCondition;
$("say-box").onsubmit = sayText;
$("start").onclick = start;
$("stop").onclick = stop;
$("interrupt").onclick = interrupt;
$("mute").onclick = toggleMute;
for (const radio of document.querySelectorAll("input[name=mode]")) radio.onchange = describeMode;
for (const b of document.querySelectorAll(".states button")) b.onclick = () => setState(b.dataset.state);
$("portrait-file").onchange = (e) => e.target.files[0] && upload(e.target.files[0]);
$("portrait-default").onclick = () => {
  live.portrait = "default";
  $("portrait-preview").src = "/api/portraits/default.png";
  say("default portrait selected");
};
