"""The ``safl`` command: ``serve``, ``recognize``, and the training commands ``synth``, ``train``, ``eval``."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import socket
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import SecretStr, ValidationError

from model.reading import MAX_TOP_K
from model.training.calibrate import add_calibrate_parser
from model.training.cli import add_eval_parser, add_synth_parser, add_train_parser, add_view_flags

from .access_log import configure_probe_access_log
from .http_protocol import header_timeout_protocol
from .settings import DEFAULT_WEIGHTS, Settings

if TYPE_CHECKING:  # imported where used: `safl recognize` starts without FastAPI or PyTorch
    from .predictor import Predictor
    from .runtime import Runtime


def default_weights() -> Path:
    """``SAFL_WEIGHTS`` if set, else the shipped weights (``model.checkpoint.shipped_weights``)."""
    return Path(os.environ.get("SAFL_WEIGHTS") or DEFAULT_WEIGHTS)


# --- safl serve


def _flag_type(annotation: Any) -> tuple[Any, Sequence[str] | None]:
    """argparse ``type`` and ``choices`` for a settings field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if annotation is SecretStr:
        return str, None
    return annotation, None


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """``safl serve``: one flag per ``Settings`` field; a flag beats its ``SAFL_*`` variable."""
    p = sub.add_parser(
        "serve",
        help="run the HTTP recognition service",
        description="Serve the model over HTTP. Every flag can also be set as the environment variable shown; the flag wins.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "unset" if field.default is None else field.default
        help_text = f"{field.description} (env SAFL_{name.upper()}, default: {default})"
        if name == "api_key":
            help_text += "; prefer the environment variable: flags show up in process lists"
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        kind, choices = _flag_type(field.annotation)
        # SUPPRESS: a flag not given leaves the field to the environment or its default.
        p.add_argument(flag, dest=name, type=kind, choices=choices, default=argparse.SUPPRESS, help=help_text)
    p.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``Settings`` from the environment, with the flags given on the command line on top."""
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    """``safl serve``: exit 0 after a graceful shutdown, 2 for bad settings or weights."""
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for line in setting_errors(exc):
            print(f"safl serve: {line}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)


def setting_errors(exc: ValidationError) -> list[str]:
    """One line per invalid setting, named as its environment variable; never the value
    given (it may be the API key)."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        name = ".".join(str(part) for part in error["loc"])
        flag = f"--{name.replace('_', '-')} (SAFL_{name.upper()})"
        lines.append(f"invalid {flag}: {message}" if name else f"invalid settings: {message}")
    return lines


#: glibc's mallopt parameter number of M_ARENA_MAX (malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for the threads created from now on; True if it took.

    glibc gives threads that allocate at once arenas of their own, up to 8 per core, and a
    served process's worker threads (image decoding, inference) keep growing them: in a
    5-minute soak at 32 clients the RSS crept up 8 MB after its first 30 s; with 2 arenas,
    1.9 MB (the training log, "Serving speed"). ``MALLOC_ARENA_MAX`` in the environment, if set,
    wins; elsewhere than glibc this does nothing.
    """
    return _mallopt("MALLOC_ARENA_MAX", _M_ARENA_MAX, arenas)


#: glibc's mallopt parameter number of M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3


def return_large_blocks(threshold: int = 2**20) -> bool:
    """Serve allocations of ``threshold`` bytes or more with mmap, so they go back to the
    system when freed; True if it took.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB),
    after which a decoded image's 16 MiB blocks come from the heap and stay in the process:
    16 concurrent requests of four 16-megapixel PNGs left the RSS 130 MB above where it
    started, with a fixed threshold 4 MB (bench/decode_memory.py). A set threshold is not
    adjusted. ``MALLOC_MMAP_THRESHOLD_`` in the environment, if set, wins.
    """
    return _mallopt("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, threshold)


def _mallopt(variable: str, param: int, value: int) -> bool:
    # glibc's mallopt, unless the environment variable that sets the same is set; elsewhere
    # than glibc (musl and others) nothing.
    if os.environ.get(variable) or not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(param, value) == 1
    except (OSError, AttributeError):
        return False


def serve(settings: Settings, predictor: Predictor | None = None) -> int:
    """Bind the port, load the model (unless given), then run uvicorn until SIGTERM/SIGINT; a
    first signal drains gracefully. Exit status 2 for a port that cannot be bound or a model
    that cannot load."""
    from .app import create_app
    from .listen import CannotListen, bind_listener
    from .predictor import Predictor, StartupError

    limit_malloc_arenas()
    return_large_blocks()
    try:
        listener = bind_listener(settings.host, settings.port)  # before loading: a taken port is told at once
    except CannotListen as exc:
        print(f"safl serve: {exc.strerror}", file=sys.stderr)
        return 2
    if predictor is None:
        try:
            # Loaded here, not in the lifespan, so a bad checkpoint is one clear line, not a traceback.
            predictor = Predictor.load(
                settings.weights, settings.device, settings.threads, settings.bf16, settings.lexicon, settings.backend, settings.cache_dir
            )
        except StartupError as exc:
            print(f"safl serve: {exc}", file=sys.stderr)
            listener.close()
            return 2
    app = create_app(settings, predictor=predictor)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        # No limit_concurrency: it counts open connections, idle ones too, and refuses every
        # path beyond it, the probes included. The app caps requests in progress itself (JSON
        # 503, probes exempt) and the protocol closes connections that send no request.
        http=header_timeout_protocol(settings.header_timeout_s),
    )
    # After uvicorn.Config, which (re)configures uvicorn's loggers.
    configure_probe_access_log(settings.access_log_probes)
    server = GracefulServer(config, app.state.runtime)
    server.run(sockets=[listener])
    return 0 if server.started else 3


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a drain phase before it stops listening.

    First SIGTERM/SIGINT: readiness turns 503 and new recognition requests get 503 at once
    (the listener stays open so they are answered, not reset); once the admitted ones
    have finished (or ``drain_timeout_s`` passed) uvicorn's own shutdown runs, and the
    process exits 0. A second signal exits at once: no drain wait, the requests in
    progress answered 503 ``shutting_down`` (``Runtime.abort``), exit 0.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self._runtime = runtime
        self._drain_requested = False
        self._drain_task: asyncio.Task[bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's own handler, the signal is not re-raised after shutdown: exit 0.
        if self._drain_requested:
            # uvicorn's force_exit skips its waits and the lifespan's shutdown; the requests
            # in progress are cancelled on the loop (not from this signal handler, which
            # may have interrupted it anywhere) and answered before the loop closes.
            self.force_exit = True
            self.should_exit = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._runtime.abort)
            return
        self._drain_requested = True
        self._runtime.begin_drain()  # a flag: safe in a signal handler

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit and self._runtime.aborted:
            # uvicorn skips the lifespan's shutdown on a forced exit, and the loop's teardown
            # then cancels it mid-wait (a traceback in the log). After abort it takes no time.
            await self.lifespan.shutdown()

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._runtime.drain(self._runtime.settings.drain_timeout_s))
        if self._drain_task is not None and self._drain_task.done():
            self.should_exit = True
        return await super().on_tick(counter)


# --- safl recognize


def add_recognize_parser(sub: argparse._SubParsersAction) -> None:
    """``safl recognize PATH [PATH...]``: the service's decode/preprocess/model path, locally
    (``service.recognize_cli``)."""
    from .recognize_cli import FORMATS, PROGRESS_MIN_FILES

    p = sub.add_parser(
        "recognize",
        help="recognise word images locally (no server)",
        description="Read word crops and print file<TAB>text<TAB>confidence for each (confidence: see the API docs). "
        "Exit status: 0 all read, 1 some files could not be read (one line each on standard error), "
        "2 no image found or the model cannot load.",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="PATH",
        help="an image file; a folder (its .png/.jpg/.jpeg/.webp/.bmp/.tif/.tiff/.gif files, recursively, sorted; "
        "hidden ones skipped); a glob pattern such as 'crops/*.png' (expanded here too, so it may be quoted; "
        "** matches folders); or - to read paths from standard input, one per line",
    )
    p.add_argument("--stdin-image", action="store_true", help="also read one image's bytes from standard input, shown as -")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="tsv",
        help="tsv: file<TAB>text<TAB>confidence, a tab, newline, carriage return or backslash in a file name written \\t \\n \\r \\\\; csv: the same with a "
        "header row; jsonl: one object per file (file, text, confidence, raw_confidence, char_confidences, alternatives with --top-k; or file and error); "
        'json: one document, the API\'s response shape with per-file errors in place, {"filename", "error": {"code", "message"}} (default: %(default)s)',
    )
    p.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"progress bar on standard error (default: for {PROGRESS_MIN_FILES} files or more when standard error is a terminal)",
    )
    p.add_argument("--weights", type=Path, default=default_weights(), help="checkpoint (env SAFL_WEIGHTS; default: %(default)s)")
    p.add_argument("--device", default=os.environ.get("SAFL_DEVICE", "auto"), help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the engine's, one per core)")
    p.add_argument(
        "--backend",
        choices=Settings.model_fields["backend"].annotation.__args__,
        default=os.environ.get("SAFL_BACKEND", "auto"),
        help="inference engine: onnx (ONNX Runtime, the CPU default), torch, auto (default: %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=os.environ.get("SAFL_CACHE_DIR") or None,
        help="folder of the ONNX graphs exported from a checkpoint, read instead of exporting again; with them a plain reading on the CPU "
        "starts without PyTorch (env SAFL_CACHE_DIR; default: $XDG_CACHE_HOME/safl, else ~/.cache/safl)",
    )
    p.add_argument("--allowlist", help="the only characters an answer may hold, e.g. 0123456789 (applied while decoding)")
    p.add_argument("--blocklist", help="characters an answer may not hold")
    p.add_argument("--lexicon", type=Path, metavar="FILE", help="closed vocabulary: a UTF-8 file of one word per line; each answer is its most probable word")
    p.add_argument(
        "--top-k", type=int, metavar="K", help=f"also give the K (1-{MAX_TOP_K}) most probable readings (beam search); in the json and jsonl formats"
    )
    p.add_argument("--batch-size", type=int, default=32, help="crops per model batch; files are read 4 batches at a time (default: 32)")
    p.add_argument("--max-pixels", type=int, default=Settings.model_fields["max_pixels"].default, help="per-image pixel limit")
    p.add_argument("--max-file-bytes", type=int, default=Settings.model_fields["max_file_bytes"].default, help="per-image size limit")
    add_view_flags(p)
    p.set_defaults(func=run_recognize)


def run_recognize(args: argparse.Namespace) -> int:
    """Exit 0 when every image was recognised, 1 when some could not be read, 2 when no
    image was found or the model cannot load."""
    from .recognize_cli import run

    return run(args)


# --- entry point


#: Modules of the ``train`` extra each training command needs; checked before any work starts.
TRAIN_EXTRA_MODULES = {"synth": ("fontTools", "wordfreq", "lmdb"), "train": ("fontTools", "wordfreq", "lmdb", "rapidfuzz"), "eval": ("rapidfuzz",)}


def _missing_train_extra(command: str) -> str | None:
    import importlib.util

    missing = [m for m in TRAIN_EXTRA_MODULES.get(command, ()) if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"safl {command}: needs the training extra ({', '.join(missing)} not installed): pip install 'safl[train]' (in a clone: pip install -e '.[train]')"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"safl {version('safl')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "safl (not installed)"


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the model as ONNX graphs for ONNX Runtime, Triton and the like",
        description="Write encoder.onnx (images -> the decoder's cross-attention keys/values), decoder_step.onnx (one greedy step "
        "with its key/value cache) and safl-onnx.json (names, sizes, config) into a folder. The greedy loop is yours: "
        "model/onnx_reader.py (OnnxReader.greedy, with the rule of model/greedy.py) is a complete reader in about 40 lines of NumPy.",
    )
    p.add_argument("--format", choices=("onnx",), default="onnx", help="the only format so far: %(default)s")
    p.add_argument("--weights", type=Path, default=default_weights(), help="checkpoint (env SAFL_WEIGHTS; default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write into (created)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from model import CheckpointError, load_checkpoint
    from model.onnx_export import export_onnx

    try:
        model, info = load_checkpoint(args.weights)
    except (CheckpointError, OSError) as exc:
        print(f"safl export: cannot load {args.weights}: {exc}", file=sys.stderr)
        return 2
    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it

        paths = export_onnx(model, info.model_id, args.out)
    except ImportError as exc:
        print(f"safl export: needs onnx ({exc}): pip install onnx", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``safl`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="safl", description="SAFL scene-text recognition: serve, recognise, make data, train, evaluate, export.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    add_recognize_parser(sub)
    add_synth_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub, default_weights())
    add_calibrate_parser(sub, default_weights())
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``safl`` console script (also ``python -m service``)."""
    args = build_parser().parse_args(argv)
    problem = _missing_train_extra(args.command)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    return int(args.func(args) or 0)
