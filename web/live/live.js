// Live page: WebRTC to `livecache serve`. An avatar engine gets the microphone and answers with video and voice;
// the video engine gets a prompt and answers with video only. What the page shows follows the engine's
// capabilities in /api/info (what it takes: a portrait or a prompt; whether it has states, a mouth, audio).
// Signaling is one POST (/api/offer) after ICE gathering, so no trickle-ICE channel is needed;
// metrics come from the server (/api/sessions/<id>) and from the browser's own WebRTC stats.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("stream");

// Everything a test or a curious user may want to read back lives on window.live.
const live = {
  pc: null,
  session: null,
  server: null, // /api/info
  engine: null, // its capabilities: {takes, states, mouth, audio, conditions}
  info: null, // the session's answer (size, mouth_box or condition, ...)
  portrait: "default",
  stats: {},
  framesShown: 0,
  firstFrameMs: null,
  startedAt: 0,
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
};
window.live = live;

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function showMetrics(values) {
  for (const dd of document.querySelectorAll("#metrics dd")) {
    const v = values[dd.dataset.key];
    if (v === undefined || v === null) continue;
    const text = typeof v === "number" && !Number.isInteger(v) ? v.toFixed(1) : String(v);
    dd.textContent = dd.dataset.key.endsWith("_ms") ? `${text} ms` : text;
  }
}

function countFrames() {
  if (!live.pc) return;
  live.framesShown += 1;
  if (live.firstFrameMs === null) {
    live.firstFrameMs = performance.now() - live.startedAt;
    say(`first frame after ${live.firstFrameMs.toFixed(0)} ms`);
  }
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

/** The offer's session fields: the portrait for an avatar engine, the prompt for a prompt engine. */
function sessionFields() {
  if (live.engine.takes === "prompt") return { prompt: $("prompt").value.trim() || "shapes" };
  return { portrait: live.portrait };
}

async function start() {
  $("start").disabled = true;
  const speaks = live.engine.takes === "portrait"; // an avatar listens to the microphone
  try {
    let mic = null;
    if (speaks) {
      say("asking for the microphone…");
      mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    }
    live.startedAt = performance.now();
    live.framesShown = 0;
    live.firstFrameMs = null;
    const pc = (live.pc = new RTCPeerConnection());
    if (mic) mic.getTracks().forEach((t) => pc.addTrack(t, mic));
    else if (live.engine.audio) pc.addTransceiver("audio", { direction: "recvonly" });
    pc.addTransceiver("video", { direction: "recvonly" });
    const remote = new MediaStream();
    pc.ontrack = (e) => {
      remote.addTrack(e.track);
      video.srcObject = remote;
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") say("connection failed", true);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    say("connecting…");
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
    $("stop").disabled = false;
    poll();
  } catch (err) {
    say(`could not start: ${err.message}`, true);
    await stop();
  }
}

async function stop() {
  const { pc, session } = live;
  live.pc = null;
  live.session = null;
  if (session) await fetch(`/api/sessions/${session}/stop`, { method: "POST" }).catch(() => {});
  if (pc) {
    pc.getSenders().forEach((s) => s.track && s.track.stop());
    pc.close();
  }
  video.srcObject = null;
  $("start").disabled = false;
  $("stop").disabled = true;
}

async function clientFps(pc) {
  const report = await pc.getStats();
  for (const s of report.values()) {
    if (s.type === "inbound-rtp" && s.kind === "video") return s.framesPerSecond ?? null;
  }
  return null;
}

async function poll() {
  while (live.pc && live.session) {
    try {
      const res = await fetch(`/api/sessions/${live.session}`);
      if (res.ok) live.stats = await res.json();
      live.stats.client_fps = await clientFps(live.pc);
      showMetrics(live.stats);
    } catch (err) {
      say(`metrics unavailable: ${err.message}`, true);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function setState(state) {
  for (const b of document.querySelectorAll(".states button")) b.classList.toggle("active", b.dataset.state === state);
  if (!live.session) return;
  const res = await fetch(`/api/sessions/${live.session}/state`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ state }),
  });
  if (!res.ok) say((await res.json()).error, true);
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
  const res = await fetch(`/api/sessions/${live.session}/condition`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: $("prompt").value }),
  });
  const body = await res.json();
  if (res.ok) say(`now drawing: ${body.name}`);
  else say(body.error, true);
}

/** Show what the engine takes and gives, and nothing it lacks. */
function describeEngine(server) {
  const engine = (live.engine = server.capabilities);
  live.server = server;
  const avatar = engine.takes === "portrait";
  $("title").textContent = avatar ? "LiveCache live avatar" : "LiveCache live video";
  $("intro").textContent = avatar
    ? "Speak into your microphone: the avatar says it back with moving lips. Use headphones to avoid echo."
    : `Type what to draw (for example ${engine.conditions.slice(-3).join(", ")}), press Start, and change it ` +
      "while it streams.";
  $("portrait-box").hidden = !avatar;
  $("prompt-box").hidden = avatar;
  document.querySelector(".states").hidden = !engine.states;
  for (const el of document.querySelectorAll("#metrics [data-needs]")) el.hidden = !engine[el.dataset.needs];
  if (avatar) {
    video.poster = "/api/portraits/default.png";
    $("portrait-preview").src = "/api/portraits/default.png";
  }
  $("conditions").replaceChildren(...engine.conditions.map((name) => new Option("", name)));
  $("start").disabled = false;
}

fetch("/api/info")
  .then((res) => (res.ok ? res.json() : Promise.reject(new Error(res.statusText))))
  .then(describeEngine)
  .catch((err) => say(`cannot reach the server: ${err.message}`, true));

$("prompt-box").onsubmit = setCondition;
$("start").onclick = start;
$("stop").onclick = stop;
for (const b of document.querySelectorAll(".states button")) b.onclick = () => setState(b.dataset.state);
$("portrait-file").onchange = (e) => e.target.files[0] && upload(e.target.files[0]);
$("portrait-default").onclick = () => {
  live.portrait = "default";
  $("portrait-preview").src = "/api/portraits/default.png";
  say("default portrait selected");
};
