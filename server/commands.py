"""`tunevec serve`: vLLM's own OpenAI server (`vllm serve`) with tunevec's plugins and middleware.

The command checks its settings and the vectors, factorises each vector once (cached by content), then replaces
itself with ``vllm serve``: every vLLM flag after ``--`` works as it does there (TLS, CORS, ``--root-path`` ...).
tunevec reaches the server only through vLLM's extension points: the ``tunevec_server`` endpoint plugin (routes
and steering state, ``server/plugin.py``), ``--middleware`` (``server/middleware.py``), and the ``tunevec_lora`` /
``tunevec_loader`` general plugins in the engine's processes (``tunevec.steering.vllm``).
"""

from __future__ import annotations

import argparse
import os

from tunevec.server.config import CONFIG_ENV, ServerConfig

SERVER_PLUGIN = "tunevec_server"
MIDDLEWARE = ("tunevec.server.middleware.SteeringMiddleware", "tunevec.server.middleware.ApiKeyMiddleware")


def configure_serve(parser: argparse.ArgumentParser) -> None:
    from tunevec.server.config import add_setting_arguments

    parser.add_argument(
        "--config", help="tunevec.yaml: any of the options below, plus `variants: {name: spec}`"
    )
    own = list(ServerConfig.__annotations__)  # the server's own options first, then the LoRA and engine ones
    add_setting_arguments(parser, ServerConfig, own + [n for n in ServerConfig.model_fields if n not in own])
    parser.add_argument(
        "extra_args", nargs=argparse.REMAINDER, help="after --: further `vllm serve` arguments"
    )
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    config = ServerConfig.load(
        args.config,
        {k: v for k, v in vars(args).items() if k not in ("config", "run", "command", "extra_args")}
        | {"extra_args": [a for a in args.extra_args if a != "--"] or None},
    )
    command, env = prepare(config)
    os.execve(command[0], command, env)  # the process becomes `vllm serve`; nothing after this runs
    return 0


def prepare(config: ServerConfig) -> tuple[list[str], dict[str, str]]:
    """Check the vectors and specs, factorise the vectors, and return the ``vllm serve`` command and environment."""
    from tunevec.core.checkpoint import Checkpoint
    from tunevec.server.config import engine_env, vllm_serve_command
    from tunevec.server.mixtures import MixtureRegistry
    from tunevec.steering.library import VectorLibrary
    from tunevec.steering.lora import lora_targets
    from tunevec.steering.vllm import LOADER, LORA, SNAPSHOT_ENV, WORKER_EXTENSION, write_snapshot

    base = Checkpoint(config.base)
    library = VectorLibrary.from_dir(config.vectors, base)
    registry = MixtureRegistry.prepare(library, config.cache_dir, config, base.num_layers)
    for text in config.variants.values():
        registry.mixture(
            registry.parse(text)
        )  # a bad variant fails here, not after a minute of engine start-up
    loader = None
    if config.inject:
        registry.parse(config.inject)
        loader = {"spec": config.inject, "vectors": library.paths(), "base": config.base}
    targets = lora_targets([m for f in registry.vectors.values() for m in f.carried])
    command = vllm_serve_command(
        config.base,
        config.served_model_name,
        config,
        host=config.host,
        port=config.port,
        lora=config,
        target_modules=targets,
        loader_config=loader,
        middleware=MIDDLEWARE,
        worker_extension=WORKER_EXTENSION,
    )
    env = engine_env(config, plugins=(LORA, SERVER_PLUGIN) + ((LOADER,) if loader else ()))
    env[CONFIG_ENV] = config.to_env()
    env[SNAPSHOT_ENV] = write_snapshot(registry.snapshot(), config.cache_dir)
    return command, env
