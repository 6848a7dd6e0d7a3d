"""`tunevec serve`: vLLM's own OpenAI server (`vllm serve`) with tunevec's plugins and middleware.

The command checks its settings and the vectors, factorises each vector once (cached by content), then replaces
itself with ``vllm serve``: every vLLM flag after ``--`` works as it does there (TLS, CORS, ``--root-path`` ...).
tunevec reaches the server only through vLLM's extension points: the ``tunevec_server`` endpoint plugin (routes
and steering state, ``server/plugin.py``), ``--middleware`` (``server/middleware.py``), and the ``tunevec_lora`` /
``tunevec_loader`` general plugins in the engine's processes (``steering/vllm_plugin.py``).
"""

from __future__ import annotations

import argparse
import os

from tunevec.server.config import CONFIG_ENV, ServerConfig

SERVER_PLUGIN = "tunevec_server"
WORKER_EXTENSION = "tunevec.steering.vllm_lora.TunevecWorkerExtension"
MIDDLEWARE = ("tunevec.server.middleware.SteeringMiddleware", "tunevec.server.middleware.ApiKeyMiddleware")


def configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model: a folder or a Hugging Face id (through the hub cache)")
    parser.add_argument("--base-revision", help="branch, tag or commit of a hub --base")
    parser.add_argument("--vectors", help="folder of tuning-vector artifacts")
    parser.add_argument(
        "--config", help="tunevec.yaml: any of the options below, plus `variants: {name: spec}`"
    )
    parser.add_argument("--host", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, help="default 8000")
    parser.add_argument("--served-model-name", help="the base model's name in requests (default: base)")
    parser.add_argument(
        "--api-key", help="require this bearer token on every route but /health (or TUNEVEC_API_KEY)"
    )
    parser.add_argument("--inject", help="spec injected into the engine weights at load time (full speed)")
    parser.add_argument("--adapter-rank", type=int, help="LoRA rank per vector (default 16)")
    parser.add_argument(
        "--adapter-energy", type=float, help="instead of a rank: keep this share of ||tau||^2"
    )
    parser.add_argument("--max-lora-rank", type=int, help="engine's max LoRA rank (default 64)")
    parser.add_argument("--max-loras", type=int, help="distinct mixtures per batch (default 4)")
    parser.add_argument(
        "--allow-truncation",
        action="store_true",
        default=None,
        help="serve mixtures above --max-lora-rank by SVD re-truncation (error reported)",
    )
    parser.add_argument("--max-components", type=int, help="components per spec (default 4)")
    parser.add_argument("--max-abs-alpha", type=float, help="largest |alpha| accepted (default 4)")
    parser.add_argument(
        "--max-dropped-share",
        type=float,
        help="largest share of a vector's ||tau||^2 a mixture may leave out (biases, norms; default 0.001)",
    )
    parser.add_argument("--max-model-len", type=int, help="longest prompt + completion in tokens")
    parser.add_argument("--cache-capacity", type=int, help="mixtures kept registered (default 32)")
    parser.add_argument("--dtype", help="engine dtype (default auto)")
    parser.add_argument(
        "--enforce-eager", action="store_true", default=None, help="no graph capture / compile"
    )
    parser.add_argument("--tensor-parallel-size", type=int, help="passes through to vLLM")
    parser.add_argument("--kv-cache-gib", type=int, help="CPU backend: KV cache size (default 1)")
    parser.add_argument(
        "--expose-paths",
        action="store_true",
        default=None,
        help="show server paths in /v1/models and vector routes",
    )
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
    from tunevec.steering.lora import leaf_module
    from tunevec.steering.vllm_lora import VECTORS_ENV, vectors_env
    from tunevec.steering.vllm_plugin import LOADER, LORA

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
    targets = sorted({leaf_module(m) for f in registry.vectors.values() for m in f.module_ranks})
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
    env[VECTORS_ENV] = vectors_env({n: f.announcement() for n, f in registry.vectors.items()})
    return command, env
