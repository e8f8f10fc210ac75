"""`livecache serve`: the live page, WebRTC and the websocket API on one port.

Only the standard library is imported at module level: `livecache --help` builds every subcommand's
parser, and aiortc/OpenCV should load only when a server actually starts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace


def _within(cast: type, low: float, high: float, unit: str = ""):
    """An argparse type for a `cast` value in [low, high], so mistakes (NaN included) fail at parse time with a
    clear message."""

    def parse(text: str) -> float:
        value = cast(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}{unit}, got {value:g}")
        return value

    return parse


def _bounded(low: int, high: int):
    """Integers in [low, high]."""
    return _within(int, low, high)


def _seconds(low: float, high: float):
    """A duration in seconds within [low, high]."""
    return _within(float, low, high, " seconds")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the live avatar: open http://HOST:PORT/ in a browser (microphone in, avatar video and voice out), "
        "or stream over the websocket API at ws://HOST:PORT/ws (protocol: docs/realtime-protocol.md)."
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; use 0.0.0.0 only on a trusted network)")
    parser.add_argument("--port", type=_bounded(0, 65535), default=8765,
                        help="TCP port for everything (default 8765; 0 = any free)")
    parser.add_argument("--engine", default="embedded",
                        help="engine: 'embedded' (default; weight-free avatar, real time on 2 CPU cores), "
                             "'diffusion' (the few-step latent diffusion avatar), 'musetalk' (MuseTalk-format "
                             "lip-sync weights, needs --weights) or 'video' (the causal AR video model; change "
                             "what it shows with condition messages)")
    parser.add_argument("--weights", help="--engine diffusion: a local avatar weights folder (safetensors; layout in "
                        "docs/avatar.md; default: the small model shipped with the pack). --engine musetalk: a "
                        "MuseTalk folder (musetalkV15/, sd-vae/, whisper/ in safetensors; convert the authors' "
                        "files with `livecache convert musetalk SRC DST`)")
    parser.add_argument("--w8a8", action="store_true",
                        help="--engine diffusion or musetalk: int8 U-Net (W8A8, calibrated at start-up)")
    parser.add_argument("--bbox-shift", type=_bounded(-64, 64), default=0,
                        help="--engine musetalk: MuseTalk's bbox_shift in portrait pixels (+ moves the face box's "
                             "upper edge down: more mouth opening; default 0)")
    parser.add_argument("--resolution", type=_bounded(16, 1024),
                        help="--engine musetalk: side of the square face crop the VAE and U-Net see, a multiple of "
                             "8 (default 256, what MuseTalk's weights were trained at; smaller renders faster and "
                             "blurrier)")
    parser.add_argument("--compile", action="store_true",
                        help="--engine musetalk: torch.compile the U-Net with CUDA graphs (CUDA only; ignored on CPU)")
    parser.add_argument("--max-sessions", type=_bounded(1, 64), default=4,
                        help="concurrent sessions; further clients get a clear 'busy' error (default 4)")
    parser.add_argument("--connect-timeout", type=_seconds(0.5, 600),
                        help="seconds a WebRTC offer has to connect (ICE and DTLS) before its session is closed "
                             "and its slot freed (default 20)")
    parser.add_argument("--request-timeout", type=_seconds(0.5, 600),
                        help="seconds a new connection has to send a complete request head (default 10)")
    parser.add_argument("--body-timeout", type=_seconds(0.5, 3600),
                        help="seconds a request has to deliver its body, e.g. a portrait upload (default 60)")
    parser.add_argument("--max-connections-per-address", type=_bounded(1, 4096),
                        help="open connections one client address may hold; more are refused with 503 "
                             "(default 32)")
    parser.add_argument("--certfile", help="TLS certificate (PEM): serve https/wss, which browsers on other "
                        "machines need before they allow the microphone")
    parser.add_argument("--keyfile", help="TLS private key (PEM) for --certfile")
    ray = parser.add_argument_group("scale-out on Ray Serve (pip install 'comfyui-livecache[ray]'; docs/ray.md)")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run the engines as Ray Serve replicas behind this server: join the Ray cluster at "
                          "ADDRESS (such as ray://head:10001 or auto), or start a local one on 127.0.0.1")
    ray.add_argument("--sessions-per-replica", type=_bounded(1, 64), default=4,
                     help="--ray: sessions one engine replica holds (default 4)")
    ray.add_argument("--min-replicas", type=_bounded(1, 256), default=1,
                     help="--ray: replicas kept running when idle (default 1)")
    ray.add_argument("--max-replicas", type=_bounded(1, 256), default=2,
                     help="--ray: the most replicas the autoscaler adds as sessions approach capacity; new "
                          "sessions get 'busy' only when all of them are full (default 2)")
    ray.add_argument("--replica-cpus", type=_within(float, 0, 256), default=1.0,
                     help="--ray: CPUs each replica reserves (default 1)")
    ray.add_argument("--replica-gpus", type=_within(float, 0, 16), default=0.0,
                     help="--ray: GPUs each replica reserves; a fraction shares one GPU (0.25: four replicas "
                          "per GPU; default 0)")


def main(args: argparse.Namespace) -> int:
    import asyncio

    from .engines import available_engines

    if args.engine not in available_engines():
        print(f"unknown engine {args.engine!r}; available: {', '.join(available_engines())}", file=sys.stderr)
        return 2
    if (args.weights or args.w8a8) and args.engine not in ("diffusion", "musetalk"):
        print("--weights and --w8a8 apply to --engine diffusion or musetalk only", file=sys.stderr)
        return 2
    if (args.bbox_shift or args.compile or args.resolution) and args.engine != "musetalk":
        print("--bbox-shift, --resolution and --compile apply to --engine musetalk only", file=sys.stderr)
        return 2
    if args.resolution is not None and args.resolution % 8:
        print(f"--resolution must be a multiple of 8 (the VAE halves it three times), got {args.resolution}",
              file=sys.stderr)
        return 2
    if args.engine == "musetalk" and not args.weights:
        print("--engine musetalk needs --weights DIR (a MuseTalk folder in safetensors; docs/avatar.md)",
              file=sys.stderr)
        return 2
    if bool(args.certfile) != bool(args.keyfile):
        print("--certfile and --keyfile go together", file=sys.stderr)
        return 2
    if args.ray is not None and args.min_replicas > args.max_replicas:
        print("--min-replicas cannot exceed --max-replicas", file=sys.stderr)
        return 2
    if args.ray is not None and args.max_sessions != 4:
        print("with --ray the capacity is --max-replicas x --sessions-per-replica; drop --max-sessions",
              file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(args))
    except OSError as exc:  # port in use, address not available, unreadable certificate
        print(f"cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # the engine refused its options or weights (WeightsError names the file)
        print(f"cannot start the {args.engine} engine: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # --ray without the ray extra
        print(f"{exc}; install it with: pip install 'comfyui-livecache[ray]'", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # Ray could not start, join the cluster, or deploy the replicas
        print(f"cannot start on Ray: {exc}", file=sys.stderr)
        return 1
    return 0


def _server(args: argparse.Namespace, limits, context, options: dict[str, object]):
    """The single-process server, or with --ray the ingress in front of Ray Serve engine replicas."""
    from .server import LiveServer

    if args.ray is None:
        return LiveServer(args.host, args.port, args.engine, limits, context, options)
    from .ray_live import RayLiveServer
    from .ray_serve import ClusterConfig

    cluster = ClusterConfig(engine=args.engine, sessions_per_replica=args.sessions_per_replica,
                            min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                            replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus)
    return RayLiveServer(args.host, args.port, cluster, replace(limits, max_sessions=cluster.max_sessions), context,
                         options, address=args.ray or None)


async def _serve(args: argparse.Namespace) -> None:
    import asyncio
    import signal
    import ssl

    from .server import ServerLimits

    context = None
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
    chosen_options = (("weights", args.weights), ("w8a8", args.w8a8), ("bbox_shift", args.bbox_shift),
                      ("resolution", args.resolution), ("compile", args.compile))
    options = {k: v for k, v in chosen_options if v}
    chosen = {"max_sessions": args.max_sessions, "connect_timeout_s": args.connect_timeout,
              "head_timeout_s": args.request_timeout, "body_timeout_s": args.body_timeout,
              "max_connections_per_address": args.max_connections_per_address}
    limits = ServerLimits(**{k: v for k, v in chosen.items() if v is not None})  # unset: ServerLimits' default
    server = await _server(args, limits, context, options).start()
    where = "" if args.ray is None else f", {args.min_replicas}-{args.max_replicas} Ray Serve replicas"
    print(f"livecache live server ({args.engine} engine{where}) on {server.url}/  websocket API: "
          f"{server.url.replace('http', 'ws', 1)}/ws  (Ctrl-C stops)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("stopping: closing sessions", flush=True)
        await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="livecache serve")
    configure(parser)
    sys.exit(main(parser.parse_args()))
